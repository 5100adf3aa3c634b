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

    from bitcompiler.backends.exact_float import no_contraction
    from bitcompiler.backends.fast_math import legalize_map
    from bitcompiler.backends.injective import Injective
    from bitcompiler.backends.parallel_min import SerialBelow
    from bitcompiler.backends.reduction import LaneReduction

    rules = (dl.cpu.GEMV(), LaneReduction(), dl.cpu.Reduction(), Injective())

    @tvm.transform.module_pass(opt_level=0)
    def _pipeline(mod: Any, _ctx: Any) -> Any:
        with target:
            passes = (
                kernel_passes(target)
                # (before legalization: a reshape or transpose of an input is still a Relax op)
                + [finite_entry()]
                + cpu_generic.library_dispatch_passes(target)
                + [relax.transform.LegalizeOps(customize_legalize_map=legalize_map())]
                + cpu_generic.legalize_passes(target)
                # (each on one thread where its work is too small for a parallel launch to pay)
                + [dl.ApplyDefaultSchedule(*map(SerialBelow, rules))]
                + [batch_one_entry()]
                + cpu_generic.dataflow_lower_passes(target)
            )
            seq = tvm.transform.Sequential(
                instrumented(passes)
                + after_shape_lowering(cpu_generic.finalize_passes(target), kernel_checked_entry())
                # every float a*b+c rounds twice, as in PyTorch (no FMA contraction)
                + [no_contraction()]
            )
            return seq(mod)

    return _pipeline


def finite_entry() -> Any:
    """The pass adding the Relax function ``bitc_checks_finite`` (returns 1) when every float input
    of ``main`` is read in full by a kernel that raises on NaN or Inf
    (:mod:`bitcompiler.kernels.finite`), directly or through ops that only move its values
    (:data:`bitcompiler.backends.relax_emit.LAYOUT_OPS`): ``cm(x)`` then leaves that check to the compiled code. It runs before
    legalization, while those ops are still Relax ops."""
    import tvm
    from tvm import relax

    from bitcompiler.kernels import finite

    @tvm.transform.module_pass(opt_level=0, name="bitc_finite_entry")
    def _finite_entry(mod: Any, _ctx: Any) -> Any:
        main = _relax_main(mod)
        if main is None or not _inputs_checked(mod, main, finite.checked_params):
            return mod
        bb = relax.BlockBuilder(mod)
        with bb.function(finite.SYMBOL, []):
            bb.emit_func_output(relax.expr.prim_value(1, "int64"))
        return bb.get()

    return _finite_entry


def batch_one_entry() -> Any:
    """The pass adding ``main_b1``: ``main`` with its batch bound to 1, so a batch-1 call skips the
    VM's shape bookkeeping (shape heap, matches, shape function: about 0.7 µs a call). It calls the
    same kernels (built for any batch) and is made after legalization, so it costs no kernel build."""
    import tvm

    @tvm.transform.module_pass(opt_level=0, name="bitc_batch_one_entry")
    def _batch_one_entry(mod: Any, _ctx: Any) -> Any:
        main = _relax_main(mod)
        batch = None if main is None else _batch_var(main)
        if batch is None:
            return mod
        mod = tvm.IRModule(dict(mod.functions), attrs=mod.attrs)
        mod[BATCH_ONE] = main.bind_symbolic_vars({batch: 1}).with_attr("global_symbol", BATCH_ONE)
        return mod

    return _batch_one_entry


BATCH_ONE = "main_b1"
SHAPE_LOWERING = "VMShapeLower"  # the pass that writes the VM's checks of each parameter
PARAM_CHECKS = ("vm.builtin.check_tensor_info", "vm.builtin.match_shape")


def after_shape_lowering(passes: list, extra: Any) -> list:
    """``passes`` with ``extra`` right after the VM's shape lowering (unchanged without one)."""
    names = [p.info.name for p in passes]
    if SHAPE_LOWERING not in names:
        return passes
    i = names.index(SHAPE_LOWERING) + 1
    return passes[:i] + [extra] + passes[i:]


def kernel_checked_entry() -> Any:
    """The pass removing ``main_b1``'s checks of an input that only kernels take: each kernel's
    own argument checks (TVM's, at every call) refuse another device, dtype, rank, shape or a
    strided layout, so the VM's two checks before them repeat work (0.3-0.6 µs of a 25 µs
    W1A1 layer, on the caches a kernel streaming megabytes of weights left cold). An input that
    anything else reads (a reshape, the result) keeps them. ``cm(x)`` calls again on any error
    and names what is wrong."""
    import tvm
    from tvm import ir, relax, tirx

    def among(e: Any, exprs: list) -> bool:
        return any(e.same_as(x) for x in exprs)

    def is_check(value: Any) -> bool:
        return (
            isinstance(value, relax.Call)
            and isinstance(value.op, relax.ExternFunc)
            and str(value.op.global_symbol) in PARAM_CHECKS
        )

    def is_kernel_call(mod: Any, value: Any) -> bool:
        return (
            isinstance(value, relax.Call)
            and isinstance(value.op, ir.GlobalVar)
            and isinstance(mod[value.op], tirx.PrimFunc)
        )

    @tvm.transform.module_pass(opt_level=0, name="bitc_kernel_checked_entry")
    def _kernel_checked_entry(mod: Any, _ctx: Any) -> Any:
        gv = next((g for g in mod.functions if g.name_hint == BATCH_ONE), None)
        func = None if gv is None else mod[gv]
        if not isinstance(func, relax.Function) or not isinstance(func.body, relax.SeqExpr):
            return mod
        params = list(func.params)
        read_otherwise: list = []  # parameters read anywhere but as a kernel's own argument

        def note_params_in(expr: Any) -> None:
            relax.analysis.post_order_visit(
                expr,
                lambda e: read_otherwise.append(e) if isinstance(e, relax.Var) and among(e, params) else None,
            )

        note_params_in(func.body.body)  # the result
        for b in (b for block in func.body.blocks for b in block.bindings):
            if is_kernel_call(mod, b.value):
                for a in b.value.args:
                    if not isinstance(a, relax.Var):  # a kernel's own argument needs no VM check
                        note_params_in(a)
            elif not is_check(b.value):
                note_params_in(b.value)  # an alias, a reshape, a tuple, any other call
        kernel_only = [p for p in params if not among(p, read_otherwise)]
        if not kernel_only:
            return mod
        blocks = [
            relax.BindingBlock(
                [b for b in block.bindings if not (is_check(b.value) and among(b.value.args[0], kernel_only))]
            )
            for block in func.body.blocks
        ]
        mod = tvm.IRModule(dict(mod.functions), attrs=mod.attrs)
        body = relax.SeqExpr(blocks, func.body.body)
        mod[gv] = relax.Function(params, body, func.ret_ty, func.is_pure, func.attrs)
        return mod

    return _kernel_checked_entry


def _relax_main(mod: Any) -> Any:
    """The module's Relax ``main`` (None where it has none)."""
    from tvm import relax

    main = next((f for gv, f in mod.functions.items() if gv.name_hint == "main"), None)
    return main if isinstance(main, relax.Function) else None


def _batch_var(main: Any) -> Any:
    """The symbolic batch of ``main``: its only symbolic variable, the first dimension of every
    input (None for a fixed batch or any other symbolic shape)."""
    from tvm import relax, tirx

    free = list(relax.analysis.defined_symbolic_vars(main))
    if len(free) != 1:
        return None
    for p in main.params:
        shape = getattr(p.ty, "shape", None)
        dims = getattr(shape, "values", None)
        if not dims or not isinstance(dims[0], tirx.Var) or not dims[0].same_as(free[0]):
            return None
    return free[0]


def _inputs_checked(mod: Any, main: Any, checked_params: Any) -> bool:
    """Whether each float tensor parameter of ``main`` is an argument a called kernel checks in full."""
    from tvm import ir, relax

    from bitcompiler.backends.relax_emit import layout_input, layout_source

    floats = {p for p in main.params if str(getattr(p.ty, "dtype", "")).startswith("float")}
    if not floats or not isinstance(main.body, relax.SeqExpr):
        return False
    call_tir = ir.Op.get("relax.call_tir")
    source: dict = {}  # a var bound to a layout op -> the var whose values it holds
    seen: set = set()
    for block in main.body.blocks:
        for binding in block.bindings:
            call = binding.value
            if (src := layout_input(call)) is not None:
                source[binding.var] = src
            if not isinstance(call, relax.Call) or call.op != call_tir or len(call.args) < 2:
                continue
            args = call.args[1].fields if isinstance(call.args[1], relax.Tuple) else []
            for i in checked_params(mod[call.args[0]]):
                if i < len(args):
                    seen.add(layout_source(args[i], source.get))
    return floats <= seen


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


def kernel_passes(target: Any) -> list:
    """The first passes of :func:`relax_pipeline`: those that choose and build the bit kernels of a
    deferred lowering (``to_relax(..., deferred=True)``). Tuning runs just these to find the
    kernels a compile builds, fused ones included."""
    from tvm import relax

    from bitcompiler.backends.cpu.fusions import build_deferred, fusion_passes

    return (
        # the CPU kernels' fused epilogues (packed outputs, residual + hardtanh, shortcuts)
        fusion_passes(target)
        # one activation packing per tensor, however many bit layers read it; the calls the
        # fusions replaced go unless something else reads them
        + [relax.transform.EliminateCommonSubexpr(), relax.transform.DeadCodeElimination()]
        # the deferred kernels still called (see lower.to_relax)
        + [build_deferred(target)]
    )
