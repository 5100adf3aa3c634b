"""Kernels that reject NaN and Inf inputs themselves, so the call skips Python's check.

``cm(x)`` must refuse an input holding NaN or Inf (quantized kernels would turn it into
arbitrary finite numbers). A Python check costs one pass over the input with torch's dispatch
(about 2 µs at batch 1: a tenth of a 4096² W1A1 layer). A kernel that reads every input value
anyway (the W1A1 dense kernels pack the signs themselves) checks them on the way at almost no
cost: the largest exponent field over the input, kept in a vector register (one ``and`` and one
``max`` per 8 floats), then an ``assert`` after the loop that raises ``ValueError(MESSAGE)``.

Such a kernel says which of its parameters it checks in full (:func:`mark`); the CPU pipeline
(:func:`bitcompiler.backends.cpu.pipeline.finite_entry`) records whether every float input of
the model reaches one, and ``cm(x)`` then leaves the check to the compiled code (on an error,
Python looks again and raises the usual :class:`~bitcompiler.errors.InputError`).
"""

from __future__ import annotations

from typing import Any

from tvm import ir, tirx
from tvm.script import tirx as T

ATTR = "bitc.checks_finite"  # PrimFunc attribute: the parameter indices the kernel checks in full
EXPONENT = 0x7F800000  # float32's exponent field: all ones for Inf and NaN
MESSAGE = "bitc: the input holds NaN or Inf"
SYMBOL = "bitc_checks_finite"  # the Relax function saying the model's kernels check every input


def mark(func: tirx.PrimFunc, *params: int) -> tirx.PrimFunc:
    """``func`` saying it raises on a NaN or Inf anywhere in its parameters ``params``."""
    return func.with_attr(ATTR, [int(p) for p in params])


def checked_params(func: Any) -> list[int]:
    """The parameters ``func`` checks in full (none unless :func:`mark`-ed)."""
    attrs = getattr(func, "attrs", None)
    if attrs is None or ATTR not in attrs:
        return []
    return [int(i) for i in attrs[ATTR]]


def exponents(E: Any, values: Any, mask: Any) -> Any:
    """``max(E, bits(values) & mask)`` lane-wise: ``values`` 8 floats, ``mask`` 8 ``EXPONENT``s."""
    return T.max(E, T.reinterpret("int32x8", values) & mask)


def exponent_field(value: Any) -> Any:
    """``bits(value) & EXPONENT`` (int32): :data:`EXPONENT` itself exactly for NaN and Inf."""
    return tirx.reinterpret("int32", value) & tirx.const(EXPONENT, "int32")


def magnitude_bits(value: Any) -> Any:
    """``bits(|value|)`` (int32): ordered as ``|value|`` is for finite floats, and at least
    :data:`EXPONENT` exactly for NaN and Inf (so a row's largest is its ``max|x|`` and its check)."""
    return tirx.reinterpret("int32", value) & tirx.const(0x7FFFFFFF, "int32")


def check_rows(func: tirx.PrimFunc, name: str, *params: int) -> tirx.PrimFunc:
    """``func`` raising ``ValueError(MESSAGE)`` after its body where any ``name[m]`` (an int32
    buffer of one value per batch row: a row's largest :func:`exponent_field` or
    :func:`magnitude_bits`) reaches :data:`EXPONENT`, and :func:`mark`-ed as checking ``params``.

    ``name`` is one of ``func``'s buffers (a TE kernel's intermediate) or one of its parameters
    (a TE kernel built with the reduction as an extra output): a parameter becomes a buffer of the
    kernel's own, so its callers pass the arguments they did before.
    """
    from tvm import s_tir

    realize = func.body
    if not isinstance(realize, s_tir.SBlockRealize):
        raise TypeError(f"check_rows needs a TE kernel's root block, got {type(realize).__name__}")
    block = realize.block
    params_now, buffers = list(func.params), list(block.alloc_buffers)
    found = [p for p in params_now if p.name == name]
    if found:
        params_now.remove(found[0])
        buffers.append(found[0])
    found = found or [b for b in buffers if b.name == name]
    if not found:
        raise ValueError(f"check_rows: the kernel has no buffer {name!r}")
    rows = found[0]
    m = tirx.Var("m", "int64")  # the batch (batch_var: int64)
    ok = tirx.BufferLoad(rows, [m]) < tirx.const(EXPONENT, "int32")
    check = tirx.For(
        m,
        tirx.const(0, "int64"),
        rows.shape[0],
        tirx.ForKind.SERIAL,
        _assert(ok),
    )
    body = s_tir.SBlock(
        block.iter_vars,
        block.reads,
        block.writes,
        block.name_hint,
        tirx.SeqStmt([block.body, check]),
        block.init,
        buffers,
        block.match_buffers,
        block.annotations,
    )
    out = tirx.PrimFunc(
        params_now,
        s_tir.SBlockRealize(realize.iter_values, realize.predicate, body),
        func.ret_type,
        func.attrs,
    )
    return mark(out, *params)


def _assert(ok: Any) -> Any:
    """``assert ok, ValueError(MESSAGE)`` as a TIR statement. TVM 0.27's Python ``AssertStmt``
    passes ``(kind, condition)`` to a constructor that takes ``(condition, kind)``; the order
    the constructor accepts is used (either way the statement is the same)."""
    kind, parts = ir.StringImm("ValueError"), [ir.StringImm(MESSAGE)]
    try:
        return tirx.AssertStmt(kind, ok, parts)
    except TypeError:
        return tirx.AssertStmt(ok, kind, parts)  # type: ignore[arg-type]
