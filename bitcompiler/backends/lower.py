"""Rewritten FX graph -> Relax IRModule.

The graph is exported with a dynamic batch dimension and handed to TVM's own
Relax frontend (``from_exported_program``); only the ``bitc`` ops need
converters, which emit ``call_tir`` of the TIR bit kernels. Everything else is
Relax's lowering.
"""

from __future__ import annotations

import contextvars
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from bitcompiler.backends import lower_conv, lower_pool
from bitcompiler.capture import export_dynamic, first_line
from bitcompiler.errors import LoweringError
from bitcompiler.ops import conv_out_size
from bitcompiler.target import Target


def export_graph(gm: fx.GraphModule, example_inputs: tuple) -> torch.export.ExportedProgram:
    """``torch.export`` with dimension 0 of every input dynamic (the batch); static when the graph
    fixes the batch (``ep.bitc_fixed_batch`` then says why)."""
    try:
        ep, fixed = export_dynamic(gm, example_inputs)
    except Exception as e:
        raise LoweringError(f"torch.export of the rewritten graph failed: {first_line(e)}") from e
    ep.bitc_fixed_batch = fixed  # type: ignore[attr-defined]
    return ep


def _shape(expr: Any) -> list:
    return list(expr.ty.shape)


def _int(v: Any) -> int:
    return int(v)


def _emit_kernel(bb: Any, prim: Any, name: str, args: list, out_ty: Any) -> Any:
    from tvm import relax

    # opaque: never fused with neighbours; scheduled: dlight leaves it alone; the symbol comes from the name
    prim = prim.with_attr("op_pattern", 8).with_attr("tirx.is_scheduled", True).without_attr("global_symbol")
    gv = bb.add_func(prim, name)
    return bb.emit(relax.call_tir(gv, relax.Tuple(args), out_ty))


# threshold convs whose +-1 output a packed-output variant can write directly (see
# ``_packed_by_producer``): [(output var, (spec, kernel name, argument list))] on the block builder
_PACKABLE = "_bitc_packable"


def _packed_by_producer(bb: Any, x: Any, nchw: tuple) -> Any | None:
    """``x`` packed for a groups-1 binary layer by the threshold conv that produced it, or None.

    The conv is emitted again with its packed-output kernel (same arguments); its float output
    then has no use left and dead-code elimination drops the float call and the packing.
    """
    from tvm import relax

    from bitcompiler import kernels

    entry = _recall(bb, _PACKABLE, x)
    if entry is None or nchw[3] != 1:
        return None
    spec, name, args = entry
    m = _shape(x)[0]
    prim = kernels.conv2d_kernel(spec, kernel_target(), packed_output=True)
    return _emit_kernel(
        bb,
        prim,
        f"{name}_packed",
        args,
        relax.TensorType((m, spec.out_h, spec.out_w, 1, spec.out_channels // 32), "int32"),
    )


def _quantized_input(bb: Any, x: Any, act: str, nchw: tuple | None, words: tuple) -> list:
    """Activation -> the kernel's input buffers for act mode ``act``."""
    from tvm import relax

    from bitcompiler import kernels

    shape = _shape(x)
    m, rest = shape[0], [_int(d) for d in shape[1:]]
    if act == "float":
        return [x]
    if act == "int8":
        prim = kernels.quantize_rows_int8(tuple(rest), kernel_target())
        out = _emit_kernel(
            bb,
            prim,
            "bitc_quantize_int8",
            [x],
            [relax.TensorType(shape, "int8"), relax.TensorType((m,), "float32")],
        )
        return [bb.emit(relax.TupleGetItem(out, 0)), bb.emit(relax.TupleGetItem(out, 1))]
    if nchw is None:
        (k,) = rest
        prim = kernels.pack_sign_rows(k, kernel_target())
        return [_emit_kernel(bb, prim, "bitc_pack_sign", [x], relax.TensorType((m, words[0]), "int32"))]
    c, h, w, groups = nchw
    packed = _packed_by_producer(bb, x, nchw)
    if packed is not None:
        return [packed]
    prim = kernels.pack_sign_nchw(c, h, w, groups, kernel_target())
    return [
        _emit_kernel(
            bb, prim, "bitc_pack_sign_nchw", [x], relax.TensorType((m, h, w, groups, words[0]), "int32")
        )
    ]


def _epilogue_args(env: dict, args: tuple, threshold: bool, bb: Any = None, cg: int = 0) -> list:
    """The kernel's weight and epilogue buffers; with ``bb`` and ``cg`` (codes per row), a layer
    that stores compactly (:func:`numerics.stores_compact`) keeps its stream and expands it."""
    planes, scale, offset, bias, thr_sign, thr = (env[a] for a in args[1:7])
    expanded = _expanded_planes(bb, args[1], cg) if bb is not None else None
    if expanded is not None:
        planes = expanded
    return [planes, thr_sign, thr] if threshold else [planes, scale, offset, bias]


# relaid kernels whose stored order wastes nothing (they fit only whole words, or store bytes)
_NO_PADDING = ("lanes", "il", "codes")


def _compact(node: Any, cg: int) -> bool:
    """Whether the layer's planes are stored as a stream (same rule as the report's bytes)."""
    from bitcompiler.quant import numerics

    weights = _constant(node)
    if weights is None:
        return False
    bits, rows = weights.shape[0], math.prod(weights.shape[1:-1])
    return numerics.stores_compact(bits, rows, cg, weights.numel())


def _expanded_planes(bb: Any, node: Any, cg: int) -> Any | None:
    """The planes expanded from their stream on every call, or None when stored as they are."""
    from tvm import relax

    from bitcompiler.kernels.expand import expand_planes_kernel
    from bitcompiler.quant import numerics

    if not _compact(node, cg):
        return None
    weights = _constant(node)
    assert weights is not None
    shape = tuple(weights.shape)
    stream = relax.const(numerics.planes_to_stream(weights, cg).numpy())
    flat = _emit_kernel(
        bb,
        expand_planes_kernel(shape, cg),
        "bitc_expand_planes",
        [stream],
        relax.TensorType((math.prod(shape),), "int32"),
    )
    return bb.emit(relax.op.reshape(flat, shape))


def convert_bit_linear(node: fx.Node, importer: Any) -> Any:
    from tvm import relax

    from bitcompiler import kernels

    bb, env = importer.block_builder, importer.env
    args: Any = (
        node.args
    )  # (x, planes, scale, offset, bias, thr_sign, thr, k, code, act, threshold, has_offset)
    x = env[args[0]]
    k, code, act, threshold, has_offset = args[7:12]
    planes = env[args[1]]
    bits, n, kw = (_int(d) for d in _shape(planes))
    shape = _shape(x)
    lead = shape[:-1]
    flat = len(lead) != 1  # a 1-D input (no batch) or several leading dimensions: one row each
    rows = math.prod(lead) if flat else lead[0]
    x2 = bb.emit(relax.op.reshape(x, (rows, k))) if flat else x
    spec = kernels.DenseSpec(k, n, bits, code, act, bool(has_offset), bool(threshold))
    name = f"bitc_dense_{act}_{code}{bits}_{k}x{n}" + ("_thr" if threshold else "")
    epilogue = _epilogue_args(env, args, threshold, bb, k)
    weights = _constant(args[1])
    relaid = (
        kernels.relaid_dense_kernel(spec, weights.numpy(), kernel_target()) if weights is not None else None
    )
    if relaid is not None and relaid.suffix not in _NO_PADDING and _compact(args[1], k):
        relaid = None  # its order pads the rows: the compact stream, expanded, is smaller
    if relaid is not None:  # the weights stored in the order that kernel reads (same bits)
        epilogue[0] = relax.const(relaid.weights)
        prim, name = relaid.func, f"{name}_{relaid.suffix}"
        inputs = [x2] if relaid.float_input else _quantized_input(bb, x2, act, None, (kw,))
    else:
        prim, inputs = kernels.dense_kernel(spec, kernel_target()), _quantized_input(bb, x2, act, None, (kw,))
    y = _emit_kernel(bb, prim, name, inputs + epilogue, relax.TensorType((rows, n), "float32"))
    return bb.emit(relax.op.reshape(y, (*lead, n))) if flat else y


def convert_bit_conv2d(node: fx.Node, importer: Any) -> Any:
    from tvm import relax

    from bitcompiler import kernels

    bb, env = importer.block_builder, importer.env
    args: Any = (
        node.args
    )  # (x, planes, ...6 tensors, in_channels, kernel, stride, padding, dilation, groups, ...)
    x = env[args[0]]
    c, kernel, stride, padding, dilation, groups, code, act, threshold, has_offset = args[7:17]
    planes = env[args[1]]
    bits, o, _, _, cwg = (_int(d) for d in _shape(planes))
    m, _, h, w = _shape(x)
    h, w = _int(h), _int(w)
    if act != "binary" and (*kernel, *padding, *dilation, groups) == (1, 1, 0, 0, 1, 1, 1):
        # a 1x1 conv (a classifier head, a pointwise or squeeze conv) is a dense layer over pixels:
        # its weight-order kernel, with the sample's activation scale on every pixel's row
        geometry = (c, o, h, w, tuple(stride), bits, code, act, bool(threshold), bool(has_offset))
        dense = _conv_as_dense(bb, env, args, x, geometry)
        if dense is not None:
            return dense
    inputs = _quantized_input(bb, x, act, (c, h, w, groups), (cwg,))
    spec = kernels.ConvSpec(
        c,
        o,
        h,
        w,
        tuple(kernel),
        tuple(stride),
        tuple(padding),
        tuple(dilation),
        groups,
        bits,
        code,
        act,
        bool(has_offset),
        bool(threshold),
    )
    oh = conv_out_size(h, kernel[0], stride[0], padding[0], dilation[0])
    ow = conv_out_size(w, kernel[1], stride[1], padding[1], dilation[1])
    name = f"bitc_conv2d_{act}_{code}{bits}_{c}x{o}_{kernel[0]}x{kernel[1]}" + ("_thr" if threshold else "")
    kargs = inputs + _epilogue_args(env, args, threshold, bb, c // groups)
    y = _emit_kernel(
        bb,
        kernels.conv2d_kernel(spec, kernel_target()),
        name,
        kargs,
        relax.TensorType((m, o, oh, ow), "float32"),
    )
    from bitcompiler.kernels.conv_binary import fuses_residual, packs_output

    if packs_output(spec):
        _remember(bb, _PACKABLE, y, (spec, name, kargs))
    if fuses_residual(spec) and _only_feeds_add_then_hardtanh(node):
        _remember(bb, _RESIDUAL, y, (spec, name, kargs))
    return y


def _conv_as_dense(bb: Any, env: dict, args: Any, x: Any, geometry: tuple) -> Any | None:
    """``Y (M, O, OH, OW)`` of a 1x1 conv (no padding, groups 1) through the dense kernel that
    reads its weights in a better order, or None when there is none.

    Every output pixel is a row: ``(M, C, H, W)`` strided, moved to ``(M·OH·OW, C)``. With int8
    activations the codes and the per-sample scale ``s`` come from the conv's own quantizer (one
    ``s`` per sample), and each row gets its sample's ``s``: the same numbers as the conv's epilogue.
    """
    from tvm import relax

    from bitcompiler import kernels

    c, o, h, w, stride, bits, code, act, threshold, has_offset = geometry
    weights = _constant(args[1])
    spec = kernels.DenseSpec(c, o, bits, code, act, has_offset, threshold)
    relaid = (
        None
        if weights is None
        else kernels.relaid_dense_kernel(spec, weights.numpy().reshape(bits, o, -1), kernel_target())
    )
    if relaid is None or (not relaid.float_input and act != "int8"):
        return None
    if relaid.suffix not in _NO_PADDING and _compact(args[1], c):
        return None  # its order pads the rows: the conv reads the compact stream, expanded
    m = _shape(x)[0]
    oh, ow = -(-h // stride[0]), -(-w // stride[1])
    if act == "int8":
        codes, s = _quantized_input(bb, x, act, (c, h, w, 1), ())
    else:
        codes, s = x, None
    if stride != (1, 1):
        codes = bb.emit(
            relax.op.strided_slice(codes, axes=[2, 3], begin=[0, 0], end=[h, w], strides=list(stride))
        )
    rows = bb.emit(relax.op.reshape(relax.op.permute_dims(codes, [0, 2, 3, 1]), (m * oh * ow, c)))
    inputs = [rows] if s is None else [rows, bb.emit(relax.op.repeat(s, oh * ow, axis=0))]
    epilogue = _epilogue_args(env, args, threshold)
    epilogue[0] = relax.const(relaid.weights)
    name = f"bitc_dense_{act}_{code}{bits}_{c}x{o}_{relaid.suffix}" + ("_thr" if threshold else "")
    y = _emit_kernel(bb, relaid.func, name, inputs + epilogue, relax.TensorType((m * oh * ow, o), "float32"))
    if oh * ow == 1:
        return bb.emit(relax.op.reshape(y, (m, o, 1, 1)))
    return bb.emit(relax.op.permute_dims(relax.op.reshape(y, (m, oh, ow, o)), [0, 3, 1, 2]))


def _remember(bb: Any, registry: str, var: Any, entry: tuple) -> None:
    if not hasattr(bb, registry):
        setattr(bb, registry, [])
    getattr(bb, registry).append((var, entry))


def _recall(bb: Any, registry: str, var: Any) -> tuple | None:
    return next((e for v, e in getattr(bb, registry, []) if v.same_as(var)), None)


# affine binary convs whose only use is ``hardtanh(conv + residual)`` (a ResNet block's end)
_RESIDUAL = "_bitc_residual"


def _only_feeds_add_then_hardtanh(node: fx.Node) -> bool:
    users = list(node.users)
    if len(users) != 1 or "add" not in str(users[0].target):
        return False
    after = list(users[0].users)
    return len(after) == 1 and "hardtanh" in str(after[0].target)


def convert_hardtanh(node: fx.Node, importer: Any) -> Any:
    """``hardtanh(conv + residual)`` of a binary conv: one conv kernel with the add and the clamp
    in its epilogue (the unfused conv and add are left unused and dead-code elimination drops
    them); any other hardtanh: ``clip``, as the frontend converts it."""
    import tvm
    from tvm import relax

    from bitcompiler import kernels

    bb = importer.block_builder
    x = importer.env[node.args[0]]
    lo = node.args[1] if len(node.args) > 1 else node.kwargs.get("min_val", -1.0)
    hi = node.args[2] if len(node.args) > 2 else node.kwargs.get("max_val", 1.0)
    bound = bb.lookup_binding(x) if isinstance(x, relax.Var) else None
    if isinstance(bound, relax.Call) and bound.op.same_as(tvm.ir.Op.get("relax.add")):
        for conv, res in (bound.args, bound.args[::-1]):
            entry = _recall(bb, _RESIDUAL, conv)
            if entry is None or [_int(d) for d in _shape(res)[1:]] != [_int(d) for d in _shape(conv)[1:]]:
                continue
            spec, name, kargs = entry
            if res.ty.dtype != "float32" or str(_shape(res)[0]) != str(_shape(conv)[0]):
                continue
            prim = kernels.conv2d_kernel(spec, kernel_target(), residual_clip=(float(lo), float(hi)))  # type: ignore[arg-type]
            return _emit_kernel(
                bb, prim, f"{name}_res", [*kargs, res], relax.TensorType(_shape(conv), "float32")
            )
    return bb.emit(relax.op.clip(x, lo, hi))


def convert_tiled_linear(node: fx.Node, importer: Any) -> Any:
    """Row-aligned: one fused kernel of the R distinct rows with the expand as its epilogue (rows in
    lanes, or byte lanes) or, where neither applies, the rows' dense kernel then the expand kernel;
    else the unaligned kernel."""
    import numpy as np
    from tvm import relax

    from bitcompiler import kernels

    bb, env = importer.block_builder, importer.env
    args: Any = node.args  # (x, tile, scale, bias, thr_sign, thr, k, n, p, act, threshold)
    x, tile, scale, bias, thr_sign, thr = (env[a] for a in args[:6])
    k, n, p, act, threshold = args[6:11]
    spec = kernels.TiledDenseSpec(k, n, p, act, bool(threshold), _int(_shape(scale)[0]))
    shape = _shape(x)
    lead = shape[:-1]
    flat = len(lead) != 1  # a 1-D input (no batch) or several leading dimensions: one row each
    rows = math.prod(lead) if flat else lead[0]
    x2 = bb.emit(relax.op.reshape(x, (rows, k))) if flat else x
    epi = [thr_sign, thr] if threshold else [scale, bias]
    out_ty = relax.TensorType((rows, n), "float32")
    name = f"bitc_tiled_{act}_{k}x{n}_p{p}" + ("_thr" if threshold else "")
    weights = _constant(args[1])
    relaid = (
        kernels.relaid_tiled_kernel(spec, weights.numpy(), kernel_target()) if weights is not None else None
    )
    if relaid is not None:  # both stages in one kernel reading the tile in its order (same bits)
        y = _emit_kernel(
            bb, relaid.func, f"{name}_{relaid.suffix}", [x2, relax.const(relaid.weights), *epi], out_ty
        )
        return bb.emit(relax.op.reshape(y, (*lead, n))) if len(lead) > 1 else y
    inputs = _quantized_input(bb, x2, act, None, (-(-k // 32),))
    if (fused := kernels.tiled_fused_kernel(spec, kernel_target())) is not None:
        y = _emit_kernel(bb, fused, name, [*inputs, tile, *epi], out_ty)
    elif spec.aligned:
        r = spec.rows
        unit = [
            relax.const(np.ones(r, "float32")),
            relax.const(np.zeros(r, "float32")),
            relax.const(np.zeros(r, "float32")),
        ]
        stage1 = [inputs[0], bb.emit(relax.op.ones_like(inputs[1]))] if act == "int8" else inputs
        acc = _emit_kernel(
            bb,
            kernels.dense_kernel(spec.rows_spec(), kernel_target()),
            f"{name}_rows",
            [*stage1, tile, *unit],
            relax.TensorType((rows, r), "float32"),
        )
        xs = [inputs[1]] if act == "int8" and not threshold else []
        y = _emit_kernel(
            bb, kernels.tiled_expand_kernel(spec, kernel_target()), f"{name}_expand", [acc, *xs, *epi], out_ty
        )
    else:
        y = _emit_kernel(
            bb, kernels.tiled_unaligned_kernel(spec, kernel_target()), name, [*inputs, tile, *epi], out_ty
        )
    return bb.emit(relax.op.reshape(y, (*lead, n))) if len(lead) > 1 else y


def convert_tiled_conv2d(node: fx.Node, importer: Any) -> Any:
    """Row-aligned tiled conv: the conv kernel of the R distinct filters (unit scales, so its output is
    the exact integer accumulator as float), then the expand kernel reuses each filter p times."""
    import numpy as np
    from tvm import relax

    from bitcompiler import kernels

    bb, env = importer.block_builder, importer.env
    args: Any = (
        node.args
    )  # (x, tile, scale, bias, thr_sign, thr, c, o, kernel, stride, padding, dilation, p, act, threshold)
    x, tile, scale, bias, thr_sign, thr = (env[a] for a in args[:6])
    c, o, kernel, stride, padding, dilation, p, act, threshold = args[6:15]
    cw = _int(_shape(tile)[-1])
    m, _, h, w = _shape(x)
    h, w = _int(h), _int(w)
    r = o // p
    rows = kernels.ConvSpec(
        c,
        r,
        h,
        w,
        tuple(kernel),
        tuple(stride),
        tuple(padding),
        tuple(dilation),
        1,
        1,
        "pm1",
        act,
        False,
        False,
    )
    inputs = _quantized_input(bb, x, act, (c, h, w, 1), (cw,))
    unit = [
        relax.const(np.ones(r, "float32")),
        relax.const(np.zeros(r, "float32")),
        relax.const(np.zeros(r, "float32")),
    ]
    stage1 = [inputs[0], bb.emit(relax.op.ones_like(inputs[1]))] if act == "int8" else inputs
    name = f"bitc_tiled_conv2d_{act}_{c}x{o}_{kernel[0]}x{kernel[1]}_p{p}" + ("_thr" if threshold else "")
    acc = _emit_kernel(
        bb,
        kernels.conv2d_kernel(rows, kernel_target()),
        f"{name}_rows",
        [*stage1, tile, *unit],
        relax.TensorType((m, r, rows.out_h, rows.out_w), "float32"),
    )
    spec = kernels.TiledConvSpec(o, rows.out_h, rows.out_w, p, act, bool(threshold), _int(_shape(scale)[0]))
    xs = [inputs[1]] if act == "int8" and not threshold else []
    epi = [thr_sign, thr] if threshold else [scale, bias]
    return _emit_kernel(
        bb,
        kernels.tiled_conv_expand_kernel(spec, kernel_target()),
        f"{name}_expand",
        [acc, *xs, *epi],
        relax.TensorType((m, o, rows.out_h, rows.out_w), "float32"),
    )


CONVERTERS = {
    "adaptive_max_pool2d.default": lower_pool.convert_adaptive_max_pool2d,
    "bit_linear.default": convert_bit_linear,
    "bit_conv2d.default": convert_bit_conv2d,
    "tiled_linear.default": convert_tiled_linear,
    "tiled_conv2d.default": convert_tiled_conv2d,
    "hardtanh.default": convert_hardtanh,
    "conv2d.default": lower_conv.convert_conv2d,
    "convolution.default": lower_conv.convert_convolution,
    "window_mean.default": lower_pool.convert_window_mean,
}


@dataclass(frozen=True)
class Lowering:
    """What the converters read besides the node: the program being converted (for weights they
    store in another layout) and the target its kernels are built for (a TVM target string)."""

    program: torch.export.ExportedProgram
    target: str


_LOWERING: contextvars.ContextVar[Lowering | None] = contextvars.ContextVar("bitc_lowering", default=None)


def kernel_target() -> str:
    """The TVM target the kernels being lowered are built for (the host CPU outside a lowering)."""
    lowering = _LOWERING.get()
    return lowering.target if lowering is not None else str(Target().tvm_target())


def _constant(node: Any) -> torch.Tensor | None:
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


def to_relax(ep: torch.export.ExportedProgram, target: Target | None = None) -> Any:
    """ExportedProgram -> Relax IRModule (TVM's frontend + bitc converters), its kernels built
    for ``target`` (default: the host CPU)."""
    from tvm.relax.frontend.torch import from_exported_program

    token = _LOWERING.set(Lowering(ep, str((target or Target()).tvm_target())))
    try:
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
    finally:
        _LOWERING.reset(token)


def _unsupported_op(message: str) -> str | None:
    for line in message.splitlines():
        if "Unsupported function type" in line or "not supported" in line.lower():
            return line.strip()
    return None
