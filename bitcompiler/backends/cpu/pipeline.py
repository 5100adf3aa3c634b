"""The Relax pipeline of the CPU backend."""

from __future__ import annotations

from typing import Any


def relax_pipeline(target: Any) -> Any:
    """TVM's CPU pipeline plus default schedules (dlight, and bitcompiler's element-wise rule) for the
    float ops bitcompiler leaves to Relax.

    The bitc kernels are already scheduled and marked opaque, so fusion and
    dlight leave them as they are.
    """
    import tvm
    from tvm import relax
    from tvm.relax.backend.cpu_generic import pipeline as cpu_generic
    from tvm.s_tir import dlight as dl

    from bitcompiler.backends.exact_float import no_contraction
    from bitcompiler.backends.fast_math import legalize_map
    from bitcompiler.backends.injective import Injective

    @tvm.transform.module_pass(opt_level=0)
    def _pipeline(mod: Any, _ctx: Any) -> Any:
        with target:
            seq = tvm.transform.Sequential(
                # one activation packing per tensor, however many bit layers read it; the float
                # output of a threshold conv whose consumers read its packed variant goes
                [relax.transform.EliminateCommonSubexpr(), relax.transform.DeadCodeElimination()]
                + cpu_generic.library_dispatch_passes(target)
                + [relax.transform.LegalizeOps(customize_legalize_map=legalize_map())]
                + cpu_generic.legalize_passes(target)
                + [dl.ApplyDefaultSchedule(dl.cpu.GEMV(), dl.cpu.Reduction(), Injective())]
                + cpu_generic.dataflow_lower_passes(target)
                + cpu_generic.finalize_passes(target)
                # every float a*b+c rounds twice, as in PyTorch (no FMA contraction)
                + [no_contraction()]
            )
            return seq(mod)

    return _pipeline
