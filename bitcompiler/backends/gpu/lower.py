"""Rewritten graph -> Relax for a GPU target: the CPU lowering's frontend, with the bitc converters
building each kernel's plain (unscheduled) TIR for the GPU target instead of its host schedule.

The compute definitions are the CPU's (:mod:`bitcompiler.kernels`); only the schedule differs.
CPU-only rewrites (weights relaid for AVX2 lanes, packed-output and residual-fused convs, compact
weight streams) are left out: every kernel reads the layer's planes as they are stored.
"""

from __future__ import annotations

import contextvars
import functools
from typing import Any

import torch
from torch import fx

from bitcompiler import ops
from bitcompiler.backends import lower_pool
from bitcompiler.backends.lower_bit import conv_shapes, quantized_input
from bitcompiler.backends.relax_emit import as_rows, emit_kernel, from_rows, shape_of
from bitcompiler.errors import LoweringError
from bitcompiler.ops import conv_out_size

# the target kind the kernel builders see while converting (set by to_relax_gpu)
_KIND: contextvars.ContextVar[str] = contextvars.ContextVar("bitc_gpu_kind", default="cuda")


# a call of a kernel kept opaque (never fused) and left unscheduled for the GPU schedules
_emit = functools.partial(emit_kernel, scheduled=False)


def _quantized_input(bb: Any, x: Any, act: str, nchw: tuple | None, words: int) -> list:
    return quantized_input(bb, x, act, nchw, (words,), _KIND.get(), _emit)


def _epilogue(env: dict, call: ops.BoundCall) -> list:
    names = ("planes", "thr_sign", "thr") if call.attrs.threshold else ("planes", "scale", "offset", "bias")
    return [env[call.tensors[n]] for n in names]


def convert_bit_linear(node: fx.Node, importer: Any) -> Any:
    from tvm import relax

    from bitcompiler import kernels

    bb, env = importer.block_builder, importer.env
    call = ops.bind(node)
    a: ops.BitLinearAttrs = call.attrs
    x = env[call.x]
    k, code, act, threshold = a.k, a.code, a.act, a.threshold
    bits, n, kw = (int(d) for d in shape_of(env[call.tensors["planes"]]))
    x2, lead, rows = as_rows(bb, x, k)
    spec = kernels.DenseSpec.from_attrs(a, n, bits)
    name = f"bitc_dense_{act}_{code}{bits}_{k}x{n}" + ("_thr" if threshold else "")
    inputs = _quantized_input(bb, x2, act, None, kw)
    if act == "binary" and code == "pm1" and bits == 1:
        from bitcompiler.kernels.gpu import w1a1_dense_func

        prim = w1a1_dense_func(spec)  # no word views: its GPU schedule stages rows in shared memory
    else:
        prim = kernels.dense_kernel(spec, _KIND.get())
    y = _emit(bb, prim, name, inputs + _epilogue(env, call), relax.TensorType((rows, n), "float32"))
    return from_rows(bb, y, lead, n)


def convert_bit_conv2d(node: fx.Node, importer: Any) -> Any:
    from tvm import relax

    from bitcompiler import kernels

    bb, env = importer.block_builder, importer.env
    call = ops.bind(node)
    a: ops.BitConv2dAttrs = call.attrs
    x, bits, o, cwg, m, h, w = conv_shapes(env, call)
    c, kernel, act, threshold, code = a.in_channels, a.kernel, a.act, a.threshold, a.code
    inputs = _quantized_input(bb, x, act, (c, h, w, a.groups), cwg)
    spec = kernels.ConvSpec.from_attrs(a, o, h, w, bits)
    oh, ow = spec.out_h, spec.out_w
    name = f"bitc_conv2d_{act}_{code}{bits}_{c}x{o}_{kernel[0]}x{kernel[1]}" + ("_thr" if threshold else "")
    prim = kernels.conv2d_kernel(spec, _KIND.get())
    kargs = inputs + _epilogue(env, call)
    return _emit(bb, prim, name, kargs, relax.TensorType((m, o, oh, ow), "float32"))


def convert_hardtanh(node: fx.Node, importer: Any) -> Any:
    from tvm import relax

    x = importer.env[node.args[0]]
    lo = node.args[1] if len(node.args) > 1 else node.kwargs.get("min_val", -1.0)
    hi = node.args[2] if len(node.args) > 2 else node.kwargs.get("max_val", 1.0)
    return importer.block_builder.emit(relax.op.clip(x, lo, hi))


def convert_window_mean(node: fx.Node, importer: Any) -> Any:
    from tvm import relax

    from bitcompiler import kernels

    args: Any = node.args
    x = importer.env[args[0]]
    m, c, h, w = shape_of(x)
    kernel, stride, padding, include_pad = (tuple(a) if isinstance(a, list) else a for a in args[1:5])
    prim = kernels.window_mean_kernel(
        int(c), int(h), int(w), kernel, stride, padding, bool(include_pad), _KIND.get()
    )
    oh = conv_out_size(int(h), kernel[0], stride[0], padding[0], 1)
    ow = conv_out_size(int(w), kernel[1], stride[1], padding[1], 1)
    name = f"bitc_window_mean_{kernel[0]}x{kernel[1]}_s{stride[0]}x{stride[1]}"
    return _emit(importer.block_builder, prim, name, [x], relax.TensorType((m, c, oh, ow), "float32"))


def _unsupported(what: str) -> Any:
    def convert(node: fx.Node, _importer: Any) -> Any:
        raise LoweringError(
            f"`{node.name}`: {what} layers have no GPU kernel yet; compile this model for target='cpu' "
            "or use a non-tiled scheme"
        )

    return convert


CONVERTERS = {
    "adaptive_max_pool2d.default": lower_pool.convert_adaptive_max_pool2d,
    "max_pool2d.default": lower_pool.convert_max_pool2d,
    "max_pool2d_with_indices.default": lower_pool.convert_max_pool2d,
    "bit_linear.default": convert_bit_linear,
    "bit_conv2d.default": convert_bit_conv2d,
    "tiled_linear.default": _unsupported("tiled linear"),
    "tiled_conv2d.default": _unsupported("tiled conv2d"),
    "hardtanh.default": convert_hardtanh,
    "window_mean.default": convert_window_mean,
}


def to_relax_gpu(ep: torch.export.ExportedProgram, kind: str) -> Any:
    """ExportedProgram -> Relax IRModule whose bitc kernels are the plain TIR for target ``kind``."""
    from tvm.relax.frontend.torch import from_exported_program

    token = _KIND.set(kind)
    try:
        return from_exported_program(ep, custom_convert_map=CONVERTERS, unwrap_unit_return_tuple=True)
    except LoweringError:
        raise
    except Exception as e:
        raise LoweringError(
            f"cannot lower the graph for target {kind!r}: {type(e).__name__}: "
            f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}. Replace that op in the model or "
            "report it; the PyTorch reference (CompiledModel.reference) still runs."
        ) from e
    finally:
        _KIND.reset(token)
