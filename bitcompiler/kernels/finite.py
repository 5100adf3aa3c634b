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

from tvm import tirx
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
