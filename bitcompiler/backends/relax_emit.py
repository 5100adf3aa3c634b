"""What the Relax converters share: the lowering in progress (program and kernel target),
shape helpers, and how a TIR kernel is emitted as a ``call_tir``."""

from __future__ import annotations

import contextlib
import contextvars
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from bitcompiler.target import Target


def shape_of(expr: Any) -> list:
    return list(expr.ty.shape)


def as_int(v: Any) -> int:
    return int(v)


def as_rows(bb: Any, x: Any, k: int) -> tuple[Any, list, Any]:
    """``x (..., K)`` as a matrix of rows ``(R, K)``, for a dense kernel: ``(rows, leading shape,
    R)``; a 1-D input (no batch) or several leading dimensions are reshaped, one row each."""
    from tvm import relax

    lead = shape_of(x)[:-1]
    if len(lead) == 1:
        return x, lead, lead[0]
    rows = math.prod(lead)
    return bb.emit(relax.op.reshape(x, (rows, k))), lead, rows


def from_rows(bb: Any, y: Any, lead: list, n: int) -> Any:
    """The rows ``y (R, N)`` of :func:`as_rows` back in the input's leading shape ``(..., N)``."""
    from tvm import relax

    return y if len(lead) == 1 else bb.emit(relax.op.reshape(y, (*lead, n)))


# the PrimFunc attribute that tells the CPU's fusion passes (:mod:`bitcompiler.backends.cpu.fusions`)
# what a kernel computes: a JSON object, ``{"op": "bit_conv2d", "name": ..., "spec": {...}}`` or
# ``{"op": "pack_sign_nchw", "groups": g}``
KERNEL_ATTR = "bitc_kernel"


def kernel_func(prim: Any, about: dict | None = None, scheduled: bool = True) -> Any:
    """``prim`` as a Relax module holds a bitc kernel: opaque (never fused with neighbours), its
    symbol taken from its name, ``scheduled`` (dlight leaves it alone; a GPU lowering leaves it
    to its GPU schedules); ``about`` (JSON-able) describes it for the fusion passes
    (:data:`KERNEL_ATTR`)."""
    prim = prim.with_attr("op_pattern", 8).without_attr("global_symbol")
    if scheduled:
        prim = prim.with_attr("tirx.is_scheduled", True)
    return prim if about is None else prim.with_attr(KERNEL_ATTR, json.dumps(about, sort_keys=True))


def defers_kernels() -> bool:
    """Whether the lowering in progress emits the kernels a fusion may replace as stubs."""
    lowering = _LOWERING.get()
    return lowering is not None and lowering.deferred


def deferred_kernel(args: list, out_ty: Any) -> Any:
    """A stub kernel with the buffer signature of a ``call_tir`` on ``args`` writing ``out_ty``
    and an empty body: the CPU lowering emits it where a fusion pass may replace the kernel, and
    ``backends.cpu.fusions.build_deferred`` builds the real one (from the ``about`` the call
    records) only for the stubs still called after the fusions (building a binary conv kernel is
    a tenth of a second; ResNet-18 built 11 that its fused variants replaced)."""
    from tvm import te, tirx

    def shape(ty: Any, i: int) -> list:
        return [
            d if isinstance(d, tirx.IntImm) else te.var(f"n{i}_{k}", "int64") for k, d in enumerate(ty.shape)
        ]

    ins = [te.placeholder(shape(a.ty, i), a.ty.dtype, f"a{i}") for i, a in enumerate(args)]
    out = te.compute(shape(out_ty, len(args)), lambda *_: tirx.const(0, out_ty.dtype), name="y")
    return te.create_prim_func([*ins, out])


def kernel_about(func: Any) -> dict | None:
    """What :func:`kernel_func` recorded about a kernel, or None."""
    attrs = getattr(func, "attrs", None)
    if attrs is None or KERNEL_ATTR not in attrs:
        return None
    return json.loads(str(attrs[KERNEL_ATTR]))


def emit_kernel(
    bb: Any, prim: Any, name: str, args: list, out_ty: Any, about: dict | None = None, scheduled: bool = True
) -> Any:
    """``call_tir`` of the kernel ``prim`` (added to ``bb``'s module as ``name``, see
    :func:`kernel_func`) on ``args``."""
    from tvm import relax

    gv = bb.add_func(kernel_func(prim, about, scheduled), name)
    return bb.emit(relax.call_tir(gv, relax.Tuple(args), out_ty))


@dataclass(frozen=True)
class Lowering:
    """What the converters read besides the node: the program being converted (for weights they
    store in another layout) and the target its kernels are built for (a TVM target string)."""

    program: torch.export.ExportedProgram
    target: str
    deferred: bool = False  # marked kernels are emitted as stubs (see :func:`deferred_kernel`)


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
def lowering(
    ep: torch.export.ExportedProgram, target: Target | None, deferred: bool = False
) -> Iterator[Lowering]:
    """Converters called inside read ``ep``'s weights and build kernels for ``target`` (default:
    host); ``deferred``: the kernels a fusion may replace are stubs, built later
    (:func:`deferred_kernel`)."""
    scope = Lowering(ep, str((target or Target()).tvm_target()), deferred)
    token = _LOWERING.set(scope)
    try:
        yield scope
    finally:
        _LOWERING.reset(token)


# Relax ops whose output holds every value of their input and nothing else (moved, not computed)
LAYOUT_OPS = ("relax.reshape", "relax.permute_dims", "relax.flatten", "relax.squeeze", "relax.expand_dims")


def layout_input(value: Any) -> Any:
    """The input of ``value`` where it is a call of one of :data:`LAYOUT_OPS`, else None."""
    from tvm import ir, relax

    if isinstance(value, relax.Call) and value.args and value.op in {ir.Op.get(n) for n in LAYOUT_OPS}:
        return value.args[0]
    return None


def layout_source(x: Any, up: Any) -> Any:
    """The var whose values ``x`` holds: ``up`` (a var -> the input of the layout op it is bound
    to, None where it is bound to none) followed to its end (SSA: a chain, never a cycle)."""
    while (src := up(x)) is not None:
        x = src
    return x
