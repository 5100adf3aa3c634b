"""The Relax pipeline of the CPU backend."""

from __future__ import annotations

from typing import Any


def relax_pipeline(target: Any) -> Any:
    """bitcompiler's fusions (:mod:`bitcompiler.backends.cpu.fusions`), then TVM's CPU pipeline
    plus default schedules (dlight, and bitcompiler's row-reduction and element-wise rules) for the float ops
    bitcompiler leaves to Relax.

    The bitc kernels are already scheduled and marked opaque, so fusion and
    dlight leave them as they are.
    """
    import tvm
    from tvm import relax
    from tvm.relax.backend.cpu_generic import pipeline as cpu_generic
    from tvm.s_tir import dlight as dl

    from bitcompiler.backends.cpu.fusions import build_deferred, fusion_passes
    from bitcompiler.backends.exact_float import no_contraction
    from bitcompiler.backends.fast_math import legalize_map
    from bitcompiler.backends.injective import Injective
    from bitcompiler.backends.reduction import LaneReduction

    @tvm.transform.module_pass(opt_level=0)
    def _pipeline(mod: Any, _ctx: Any) -> Any:
        with target:
            passes = (
                # the CPU kernels' fused epilogues (packed outputs, residual + hardtanh)
                fusion_passes(target)
                # one activation packing per tensor, however many bit layers read it; the calls
                # the fusions replaced go unless something else reads them
                + [relax.transform.EliminateCommonSubexpr(), relax.transform.DeadCodeElimination()]
                # the deferred kernels still called (see lower.to_relax)
                + [build_deferred(target)]
                + cpu_generic.library_dispatch_passes(target)
                + [relax.transform.LegalizeOps(customize_legalize_map=legalize_map())]
                + cpu_generic.legalize_passes(target)
                + [dl.ApplyDefaultSchedule(dl.cpu.GEMV(), LaneReduction(), dl.cpu.Reduction(), Injective())]
                + cpu_generic.dataflow_lower_passes(target)
            )
            seq = tvm.transform.Sequential(
                instrumented(passes)
                + cpu_generic.finalize_passes(target)
                # every float a*b+c rounds twice, as in PyTorch (no FMA contraction)
                + [no_contraction()]
            )
            return seq(mod)

    return _pipeline


def instrumented(passes: list) -> list:
    """``passes`` with a checkpoint after each: under ``BITC_DEBUG`` the module must stay well
    formed (``relax.analysis.well_formed``), else a LoweringError names the pass; with
    ``BITC_DUMP=dir`` the module is written to ``dir/relax/NNN_<pass>.py`` after each pass and
    every kernel's TIR to ``dir/tir/<kernel>.py`` after the last."""
    import os

    debug = os.environ.get("BITC_DEBUG", "") not in ("", "0")
    dump = os.environ.get("BITC_DUMP")
    if not debug and not dump:
        return passes
    out = []
    for i, p in enumerate(passes, start=1):
        out += [p, checkpoint(f"{i:03d}_{p.info.name}", debug, dump, last=i == len(passes))]
    return out


def checkpoint(name: str, check: bool, dump: str | None, last: bool = False) -> Any:
    """The pass that checks and/or dumps the module after the pass ``name`` (see :func:`instrumented`)."""
    from pathlib import Path

    import tvm
    from tvm import relax, tirx

    from bitcompiler.errors import LoweringError

    @tvm.transform.module_pass(opt_level=0, name=f"bitc_checkpoint_{name}")
    def _checkpoint(mod: Any, _ctx: Any) -> Any:
        if check:
            try:
                relax.analysis.well_formed(mod)  # raises on the first violation
            except Exception as e:
                raise LoweringError(
                    f"the Relax module is not well formed after pass {name[4:]!r}: "
                    f"{str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__}; "
                    "set BITC_DUMP=dir to see it"
                ) from e
        if dump:
            (Path(dump) / "relax").mkdir(parents=True, exist_ok=True)
            (Path(dump) / "relax" / f"{name}.py").write_text(mod.script())
            if last:
                (Path(dump) / "tir").mkdir(parents=True, exist_ok=True)
                for gv, func in mod.functions.items():
                    if isinstance(func, tirx.PrimFunc):
                        (Path(dump) / "tir" / f"{gv.name_hint}.py").write_text(func.script())
        return mod

    return _checkpoint
