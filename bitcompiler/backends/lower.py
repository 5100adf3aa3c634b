"""Rewritten FX graph -> Relax IRModule.

The graph, exported with a dynamic batch dimension (:func:`bitcompiler.capture.export_graph`),
is handed to TVM's own Relax frontend (``from_exported_program``); only the ``bitc`` ops (and a few float ops
whose order must match the reference) need converters, which emit ``call_tir`` of the TIR
kernels built for the target being compiled for. Everything else is Relax's lowering.

The converters: :mod:`~bitcompiler.backends.lower_bit` (bit layers),
:mod:`~bitcompiler.backends.lower_tiled` (tiled layers), :mod:`~bitcompiler.backends.lower_conv`
(float convs), :mod:`~bitcompiler.backends.lower_pool` (pooling); what they share:
:mod:`~bitcompiler.backends.relax_emit`.
"""

from __future__ import annotations

from typing import Any

import torch

from bitcompiler.backends import lower_bit, lower_conv, lower_pool, lower_tiled
from bitcompiler.backends.exact_float import convert_exact_unary
from bitcompiler.backends.relax_emit import lowering
from bitcompiler.errors import LoweringError
from bitcompiler.target import Target

CONVERTERS = {
    "adaptive_max_pool2d.default": lower_pool.convert_adaptive_max_pool2d,
    "max_pool2d.default": lower_pool.convert_max_pool2d,
    "max_pool2d_with_indices.default": lower_pool.convert_max_pool2d,
    "bit_linear.default": lower_bit.convert_bit_linear,
    "bit_conv2d.default": lower_bit.convert_bit_conv2d,
    "tiled_linear.default": lower_tiled.convert_tiled_linear,
    "tiled_conv2d.default": lower_tiled.convert_tiled_conv2d,
    "conv2d.default": lower_conv.convert_conv2d,
    "convolution.default": lower_conv.convert_convolution,
    "window_mean.default": lower_pool.convert_window_mean,
    "exact_unary.default": convert_exact_unary,
}


def to_relax(ep: torch.export.ExportedProgram, target: Target | None = None, deferred: bool = False) -> Any:
    """ExportedProgram -> Relax IRModule (TVM's frontend + bitc converters), its kernels built
    for ``target`` (default: the host CPU). ``deferred``: the kernels the CPU's fusion passes may
    replace are stubs, which the CPU Relax pipeline builds after those passes
    (:func:`bitcompiler.backends.cpu.fusions.build_deferred`); the module is only fit for that
    pipeline."""
    from tvm.relax.frontend.torch import from_exported_program

    try:
        with lowering(ep, target, deferred):
            # a single output comes back as the tensor itself: unpacking a 1-tuple costs microseconds per call
            return from_exported_program(ep, custom_convert_map=CONVERTERS, unwrap_unit_return_tuple=True)
    except Exception as e:
        op = _unsupported_op(str(e))
        hint = (
            f"op {op} has no TVM lowering" if op else f"{type(e).__name__}: {str(e).strip().splitlines()[0]}"
        )
        raise LoweringError(
            f"cannot lower the graph to TVM: {hint}. Replace that op in the model or "
            "report it; the PyTorch reference (CompiledModel.reference) still runs."
        ) from e


def _unsupported_op(message: str) -> str | None:
    for line in message.splitlines():
        if "Unsupported function type" in line or "not supported" in line.lower():
            return line.strip()
    return None
