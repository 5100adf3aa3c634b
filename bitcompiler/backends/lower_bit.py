"""Relax converters of ``bitc::bit_linear`` and ``bitc::bit_conv2d``: TIR bit kernels, the
activation quantizer each needs, and the CPU's weight orders and epilogue fusions.

Part of the CPU lowering (:mod:`bitcompiler.backends.lower` lists the converters).
"""

from __future__ import annotations

import functools
import math
from typing import Any

from torch import fx

from bitcompiler import ops
from bitcompiler.backends.relax_emit import (
    Deferred,
    as_int,
    constant_of,
    emit_kernel,
    kernel_target,
    shape_of,
)

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
    m = shape_of(x)[0]
    prim = kernels.conv2d_kernel(spec, kernel_target(), packed_output=True)
    return emit_kernel(
        bb,
        prim,
        f"{name}_packed",
        args,
        relax.TensorType((m, spec.out_h, spec.out_w, 1, spec.out_channels // 32), "int32"),
    )


def quantized_input(bb: Any, x: Any, act: str, nchw: tuple | None, words: tuple) -> list:
    """Activation -> the kernel's input buffers for act mode ``act``."""
    from tvm import relax

    from bitcompiler import kernels

    shape = shape_of(x)
    m, rest = shape[0], [as_int(d) for d in shape[1:]]
    if act == "float":
        return [x]
    if act == "int8":
        prim = kernels.quantize_rows_int8(tuple(rest), kernel_target())
        out = emit_kernel(
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
        return [emit_kernel(bb, prim, "bitc_pack_sign", [x], relax.TensorType((m, words[0]), "int32"))]
    c, h, w, groups = nchw
    packed = _packed_by_producer(bb, x, nchw)
    if packed is not None:
        return [packed]
    prim = kernels.pack_sign_nchw(c, h, w, groups, kernel_target())
    return [
        emit_kernel(
            bb, prim, "bitc_pack_sign_nchw", [x], relax.TensorType((m, h, w, groups, words[0]), "int32")
        )
    ]


def _epilogue_args(env: dict, call: ops.BoundCall, bb: Any = None, cg: int = 0) -> list:
    """The kernel's weight and epilogue buffers; with ``bb`` and ``cg`` (codes per row), a layer
    that stores compactly (:func:`numerics.stores_compact`) keeps its stream and expands it."""
    t = {name: env[v] for name, v in call.tensors.items()}
    expanded = _expanded_planes(bb, call.tensors["planes"], cg) if bb is not None else None
    planes = t["planes"] if expanded is None else expanded
    return (
        [planes, t["thr_sign"], t["thr"]]
        if call.attrs.threshold
        else [planes, t["scale"], t["offset"], t["bias"]]
    )


# relaid kernels whose stored order wastes nothing (they fit only whole words, or store bytes)
_NO_PADDING = ("lanes", "il", "codes")


def _compact(node: Any, cg: int) -> bool:
    """Whether the layer's planes are stored as a stream (same rule as the report's bytes)."""
    from bitcompiler.quant import numerics

    weights = constant_of(node)
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
    weights = constant_of(node)
    assert weights is not None
    shape = tuple(weights.shape)
    stream = relax.const(numerics.planes_to_stream(weights, cg).numpy())
    flat = emit_kernel(
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
    call = ops.bind(node)
    a: ops.BitLinearAttrs = call.attrs
    x, planes = env[call.x], call.tensors["planes"]
    bits, n, kw = (as_int(d) for d in shape_of(env[planes]))
    shape = shape_of(x)
    lead = shape[:-1]
    flat = len(lead) != 1  # a 1-D input (no batch) or several leading dimensions: one row each
    rows = math.prod(lead) if flat else lead[0]
    x2 = bb.emit(relax.op.reshape(x, (rows, a.k))) if flat else x
    spec = kernels.DenseSpec.from_attrs(a, n, bits)
    name = f"bitc_dense_{a.act}_{a.code}{bits}_{a.k}x{n}" + ("_thr" if a.threshold else "")
    epilogue = _epilogue_args(env, call, bb, a.k)
    weights = constant_of(planes)
    relaid = (
        kernels.relaid_dense_kernel(spec, weights.numpy(), kernel_target()) if weights is not None else None
    )
    if relaid is not None and relaid.suffix not in _NO_PADDING and _compact(planes, a.k):
        relaid = None  # its order pads the rows: the compact stream, expanded, is smaller
    if relaid is not None:  # the weights stored in the order that kernel reads (same bits)
        epilogue[0] = relax.const(relaid.weights)
        prim, name = relaid.func, f"{name}_{relaid.suffix}"
        inputs = [x2] if relaid.float_input else quantized_input(bb, x2, a.act, None, (kw,))
    else:
        prim, inputs = (
            kernels.dense_kernel(spec, kernel_target()),
            quantized_input(bb, x2, a.act, None, (kw,)),
        )
    y = emit_kernel(bb, prim, name, inputs + epilogue, relax.TensorType((rows, n), "float32"))
    return bb.emit(relax.op.reshape(y, (*lead, n))) if flat else y


def convert_bit_conv2d(node: fx.Node, importer: Any) -> Any:
    from tvm import relax

    from bitcompiler import kernels

    bb, env = importer.block_builder, importer.env
    call = ops.bind(node)
    a: ops.BitConv2dAttrs = call.attrs
    x = env[call.x]
    bits, o, _, _, cwg = (as_int(d) for d in shape_of(env[call.tensors["planes"]]))
    m, _, h, w = shape_of(x)
    h, w = as_int(h), as_int(w)
    if a.act != "binary" and (*a.kernel, *a.padding, *a.dilation, a.groups) == (1, 1, 0, 0, 1, 1, 1):
        # a 1x1 conv (a classifier head, a pointwise or squeeze conv) is a dense layer over pixels:
        # its weight-order kernel, with the sample's activation scale on every pixel's row
        dense = _conv_as_dense(bb, env, call, x, (o, h, w, bits))
        if dense is not None:
            return dense
    inputs = quantized_input(bb, x, a.act, (a.in_channels, h, w, a.groups), (cwg,))
    spec = kernels.ConvSpec.from_attrs(a, o, h, w, bits)
    name = f"bitc_conv2d_{a.act}_{a.code}{bits}_{a.in_channels}x{o}_{a.kernel[0]}x{a.kernel[1]}" + (
        "_thr" if a.threshold else ""
    )
    weights = constant_of(call.tensors["planes"])
    stored = kernels.stored_weights(spec, kernel_target()) if weights is not None else None
    if weights is not None and stored is not None:
        # the weights stored as the kernel reads them (same bits, no more padding than 5%)
        kargs = inputs + _epilogue_args(env, call)
        kargs[len(inputs)] = relax.const(stored[0](spec, weights.numpy()))
        prim, name = kernels.stored_codes_conv_kernel(spec, kernel_target()), name + stored[2]
    else:
        kargs = inputs + _epilogue_args(env, call, bb, spec.cg)
        # a packed-output or residual variant may take this call over: the kernel is made only if not
        prim = Deferred(functools.partial(kernels.conv2d_kernel, spec, kernel_target()))
    from bitcompiler.kernels.conv_binary import fuses_residual, packs_output

    packable = packs_output(spec)
    residual = fuses_residual(spec) and _only_feeds_add_then_hardtanh(node)
    if not (packable or residual) and isinstance(prim, Deferred):
        prim = prim.build()
    y = emit_kernel(bb, prim, name, kargs, relax.TensorType((m, o, spec.out_h, spec.out_w), "float32"))
    if packable:
        _remember(bb, _PACKABLE, y, (spec, name, kargs))
    if residual:
        _remember(bb, _RESIDUAL, y, (spec, name, kargs))
    return y


def _conv_as_dense(bb: Any, env: dict, call: ops.BoundCall, x: Any, geometry: tuple) -> Any | None:
    """``Y (M, O, OH, OW)`` of a 1x1 conv (no padding, groups 1) through the dense kernel that
    reads its weights in a better order, or None when there is none.

    Every output pixel is a row: ``(M, C, H, W)`` strided, moved to ``(M·OH·OW, C)``. With int8
    activations the codes and the per-sample scale ``s`` come from the conv's own quantizer (one
    ``s`` per sample), and each row gets its sample's ``s``: the same numbers as the conv's epilogue.
    """
    from tvm import relax

    from bitcompiler import kernels

    a: ops.BitConv2dAttrs = call.attrs
    o, h, w, bits = geometry
    c, stride, act = a.in_channels, a.stride, a.act
    weights = constant_of(call.tensors["planes"])
    spec = kernels.DenseSpec(c, o, bits, a.code, act, a.has_offset, a.threshold)
    relaid = (
        None
        if weights is None
        else kernels.relaid_dense_kernel(spec, weights.numpy().reshape(bits, o, -1), kernel_target())
    )
    if relaid is None or (not relaid.float_input and act != "int8"):
        return None
    if relaid.suffix not in _NO_PADDING and _compact(call.tensors["planes"], c):
        return None  # its order pads the rows: the conv reads the compact stream, expanded
    m = shape_of(x)[0]
    oh, ow = a.out_hw(h, w)
    if act == "int8":
        codes, s = quantized_input(bb, x, act, (c, h, w, 1), ())
    else:
        codes, s = x, None
    if stride != (1, 1):
        codes = bb.emit(
            relax.op.strided_slice(codes, axes=[2, 3], begin=[0, 0], end=[h, w], strides=list(stride))
        )
    rows = bb.emit(relax.op.reshape(relax.op.permute_dims(codes, [0, 2, 3, 1]), (m * oh * ow, c)))
    inputs = [rows] if s is None else [rows, bb.emit(relax.op.repeat(s, oh * ow, axis=0))]
    epilogue = _epilogue_args(env, call)
    epilogue[0] = relax.const(relaid.weights)
    name = f"bitc_dense_{act}_{a.code}{bits}_{c}x{o}_{relaid.suffix}" + ("_thr" if a.threshold else "")
    y = emit_kernel(bb, relaid.func, name, inputs + epilogue, relax.TensorType((m * oh * ow, o), "float32"))
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
            if entry is None or [as_int(d) for d in shape_of(res)[1:]] != [
                as_int(d) for d in shape_of(conv)[1:]
            ]:
                continue
            spec, name, kargs = entry
            if res.ty.dtype != "float32" or str(shape_of(res)[0]) != str(shape_of(conv)[0]):
                continue
            prim = kernels.conv2d_kernel(spec, kernel_target(), residual_clip=(float(lo), float(hi)))  # type: ignore[arg-type]
            return emit_kernel(
                bb, prim, f"{name}_res", [*kargs, res], relax.TensorType(shape_of(conv), "float32")
            )
    return bb.emit(relax.op.clip(x, lo, hi))
