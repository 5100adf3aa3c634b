"""Rewritten graph -> Relax for a GPU target: the CPU lowering's frontend, with the bitc converters
building each kernel's plain (unscheduled) TIR for the GPU target instead of its host schedule.

The compute definitions are the CPU's (:mod:`bitcompiler.kernels`); only the schedule differs.
CPU-only rewrites (weights relaid for AVX2 lanes, packed-output and residual-fused convs, compact
weight streams) are left out: every kernel reads the layer's planes as they are stored.
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
from typing import Any

import torch
from torch import fx

from bitcompiler import ops
from bitcompiler.backends import lower_pool, lower_tiled
from bitcompiler.backends.exact_float import convert_exact_unary
from bitcompiler.backends.lower_bit import conv_shapes, quantized_input
from bitcompiler.backends.relax_emit import as_rows, constant_of, emit_kernel, from_rows, lowering, shape_of
from bitcompiler.errors import LoweringError
from bitcompiler.kernels.gpu import dp4a
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
    planes = constant_of(call.tensors["planes"])
    if act == "binary" and code == "pm1" and bits == 1:
        from bitcompiler.kernels.gpu import w1a1_dense_func

        prim = w1a1_dense_func(spec)  # no word views: its GPU schedule stages rows in shared memory
    elif dp4a.dp4a_fits(spec) and planes is not None:
        y = _dp4a_dense(bb, spec, inputs, planes, _epilogue(env, call)[1:], name)
        return from_rows(bb, y, lead, n)
    else:
        prim = kernels.dense_kernel(spec, _KIND.get())
    y = _emit(bb, prim, name, inputs + _epilogue(env, call), relax.TensorType((rows, n), "float32"))
    return from_rows(bb, y, lead, n)


def _dp4a_dense(bb: Any, spec: Any, inputs: list, planes: Any, epi: list, name: str) -> Any:
    """The int8 dense layer on ``__dp4a``: activation codes four to a word, weight codes as bytes."""
    from tvm import relax

    xq, xs = inputs
    rows, k = shape_of(xq)[0], spec.in_features
    x4 = _emit(bb, dp4a.pack4_func((k,)), "bitc_pack4", [xq], relax.TensorType((rows, k // 4), "int32"))
    w4 = relax.const(dp4a.dp4a_codes(planes.numpy(), k, spec.code))
    sx = [bb.emit(relax.op.sum(relax.op.astype(xq, "int32"), axis=[1]))] if dp4a.needs_sumx(spec) else []
    out = relax.TensorType((rows, spec.out_features), "float32")
    return _emit(bb, dp4a.dp4a_dense_func(spec), f"{name}_dp4a", [x4, xs, w4, *sx, *epi], out)


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
    out = relax.TensorType((m, o, oh, ow), "float32")
    planes = constant_of(call.tensors["planes"])
    if dp4a.conv_fits(spec) and planes is not None:  # int8 codes on __dp4a, four channels to a word
        xq, xs = inputs
        x4 = _emit(
            bb,
            dp4a.pack4_func((c, h, w)),
            "bitc_pack4_nchw",
            [xq],
            relax.TensorType((m, c // 4, h, w), "int32"),
        )
        w4 = relax.const(dp4a.dp4a_codes(planes.numpy(), c, code))
        epi = _epilogue(env, call)[1:]
        return _emit(bb, dp4a.dp4a_conv_func(spec), f"{name}_dp4a", [x4, xs, w4, *epi], out)
    prim = kernels.conv2d_kernel(spec, _KIND.get())
    return _emit(bb, prim, name, inputs + _epilogue(env, call), out)


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


def convert_tiled_linear(node: fx.Node, importer: Any) -> Any:
    """Row-aligned: the CPU's two stages (:class:`kernels.TiledStages`), the R distinct rows' dense
    kernel (W1A1: the shared-memory tiled one) then the p-fold expand; else the unaligned kernel."""
    from tvm import relax

    from bitcompiler import kernels
    from bitcompiler.kernels.gpu import w1a1_dense_func

    bb, env = importer.block_builder, importer.env
    call = ops.bind(node)
    a: ops.TiledLinearAttrs = call.attrs
    x, t = env[call.x], {name: env[v] for name, v in call.tensors.items()}
    spec = kernels.TiledDenseSpec.from_attrs(a, int(shape_of(t["scale"])[0]))
    x2, lead, rows = as_rows(bb, x, a.k)
    name = f"bitc_tiled_{a.act}_{a.k}x{a.n}_p{a.p}" + ("_thr" if a.threshold else "")
    inputs = _quantized_input(bb, x2, a.act, None, -(-a.k // 32))
    if spec.aligned:
        plan = kernels.tiled_linear_stages(spec, _KIND.get())
        if a.act == "binary":  # the rows' W1A1 dense: the GPU's shared-memory tiled kernel
            plan = dataclasses.replace(
                plan, stage1=dataclasses.replace(plan.stage1, build=lambda: w1a1_dense_func(spec.rows_spec()))
            )
        shapes = {"rows": (rows, spec.rows), "y": (rows, a.n)}
        y = lower_tiled.emit_stages(bb, plan, name, inputs, t, shapes, emit=_emit)
    else:
        epi = [t["thr_sign"], t["thr"]] if a.threshold else [t["scale"], t["bias"]]
        prim = kernels.tiled_unaligned_kernel(spec, _KIND.get())
        y = _emit(bb, prim, name, [*inputs, t["tile"], *epi], relax.TensorType((rows, a.n), "float32"))
    return from_rows(bb, y, lead, a.n)


def convert_tiled_conv2d(node: fx.Node, importer: Any) -> Any:
    """The CPU's two stages (:func:`lower_tiled.convert_tiled_conv2d`) with the GPU kernels."""

    def quantize(bb: Any, x: Any, act: str, nchw: tuple, words: tuple) -> list:
        return _quantized_input(bb, x, act, nchw, words[0])

    return lower_tiled.convert_tiled_conv2d(node, importer, quantize, _KIND.get, _emit)


CONVERTERS = {
    "adaptive_max_pool2d.default": lower_pool.convert_adaptive_max_pool2d,
    "max_pool2d.default": lower_pool.convert_max_pool2d,
    "max_pool2d_with_indices.default": lower_pool.convert_max_pool2d,
    "bit_linear.default": convert_bit_linear,
    "bit_conv2d.default": convert_bit_conv2d,
    "tiled_linear.default": convert_tiled_linear,
    "tiled_conv2d.default": convert_tiled_conv2d,
    "hardtanh.default": convert_hardtanh,
    "window_mean.default": convert_window_mean,
    "exact_unary.default": convert_exact_unary,
}


def to_relax_gpu(ep: torch.export.ExportedProgram, kind: str) -> Any:
    """ExportedProgram -> Relax IRModule whose bitc kernels are the plain TIR for target ``kind``."""
    from tvm.relax.frontend.torch import from_exported_program

    token = _KIND.set(kind)
    try:
        with lowering(ep, None):  # converters read weights from ep (constant_of)
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
