"""What the Relax converters share: the lowering in progress (program and kernel target),
shape helpers, and how a TIR kernel is emitted as a ``call_tir``."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from bitcompiler.target import Target


def shape_of(expr: Any) -> list:
    return list(expr.ty.shape)


def as_int(v: Any) -> int:
    return int(v)


@dataclass(frozen=True)
class Deferred:
    """A kernel built only if the program still calls it once the conversion is done: a converter
    emits it where a later one may replace its call (a conv whose float output a packed-output or
    residual variant takes over), and the kernel's TIR is made only when it survives."""

    build: Callable[[], Any]


def _prepared(prim: Any) -> Any:
    # opaque: never fused with neighbours; scheduled: dlight leaves it alone; the symbol comes from the name
    return prim.with_attr("op_pattern", 8).with_attr("tirx.is_scheduled", True).without_attr("global_symbol")


def emit_kernel(bb: Any, prim: Any, name: str, args: list, out_ty: Any) -> Any:
    """``call_tir`` of ``prim`` (a PrimFunc, or :class:`Deferred`: a placeholder until
    :func:`resolve_deferred`)."""
    from tvm import relax

    if isinstance(prim, Deferred):
        scope = _LOWERING.get()
        if scope is None:
            prim = prim.build()
        else:
            gv = bb.add_func(_placeholder(args, out_ty, len(scope.deferred)), name)
            scope.deferred.append((gv.name_hint, prim.build))
            return bb.emit(relax.call_tir(gv, relax.Tuple(args), out_ty))
    gv = bb.add_func(_prepared(prim), name)
    return bb.emit(relax.call_tir(gv, relax.Tuple(args), out_ty))


def _placeholder(args: list, out_ty: Any, index: int) -> Any:
    """A PrimFunc with the kernel's parameters (the call's argument and output shapes) and no work,
    which no other function equals (the block builder merges equal functions): the call is typed
    by it until :func:`resolve_deferred` puts the kernel in its place."""
    from tvm import te, tirx

    ins = [te.placeholder(shape_of(a), a.ty.dtype, f"a{i}") for i, a in enumerate(args)]
    out = te.compute(list(out_ty.shape), lambda *_: tirx.const(0, out_ty.dtype), "y")
    return _prepared(te.create_prim_func([*ins, out])).with_attr("bitc_deferred", index)


def resolve_deferred(mod: Any) -> Any:
    """``mod`` without the calls nothing reads, its surviving :class:`Deferred` kernels built."""
    from tvm import relax

    scope = _LOWERING.get()
    if scope is None or not scope.deferred:
        return mod
    mod = relax.transform.DeadCodeElimination(["main"])(mod)  # drops the calls nothing reads
    names = {gv.name_hint for gv in relax.analysis.all_global_vars(mod["main"])}
    for name, build in dict(scope.deferred).items():  # equal placeholders share one function
        if name in names:
            mod[mod.get_global_var(name)] = _prepared(build())
        elif any(gv.name_hint == name for gv in mod.get_global_vars()):
            del mod[name]
    return mod


@dataclass(frozen=True)
class Lowering:
    """What the converters read besides the node: the program being converted (for weights they
    store in another layout) and the target its kernels are built for (a TVM target string)."""

    program: torch.export.ExportedProgram
    target: str
    deferred: list = field(default_factory=list)  # (function name, build) of Deferred kernels


_LOWERING: contextvars.ContextVar[Lowering | None] = contextvars.ContextVar("bitc_lowering", default=None)


def kernel_target() -> str:
    """The TVM target the kernels being lowered are built for (the host CPU outside a lowering)."""
    lowering = _LOWERING.get()
    return lowering.target if lowering is not None else str(Target().tvm_target())


def constant_of(node: Any) -> torch.Tensor | None:
    """The tensor behind a lifted buffer/constant/parameter input of the program, or None."""
    lowering = _LOWERING.get()
    if lowering is None or not isinstance(node, fx.Node) or node.op != "placeholder":
        return None
    ep = lowering.program
    sig = ep.graph_signature
    for table in (sig.inputs_to_buffers, sig.inputs_to_parameters, sig.inputs_to_lifted_tensor_constants):
        if node.name in table:
            # persistent buffers and parameters are in the state dict, the others in constants
            value = ep.state_dict.get(table[node.name], ep.constants.get(table[node.name]))
            return value.detach() if isinstance(value, torch.Tensor) else None
    return None


@contextlib.contextmanager
def lowering(ep: torch.export.ExportedProgram, target: Target | None) -> Iterator[Lowering]:
    """Converters called inside read ``ep``'s weights and build kernels for ``target`` (default: host)."""
    scope = Lowering(ep, str((target or Target()).tvm_target()))
    token = _LOWERING.set(scope)
    try:
        yield scope
    finally:
        _LOWERING.reset(token)
