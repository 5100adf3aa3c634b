"""Relax converters of ``bitc::bit_linear`` and ``bitc::bit_conv2d``: TIR bit kernels, the
activation quantizer each needs, and the CPU's weight orders. Each converter translates one op;
the fusions across ops are Relax passes (:mod:`bitcompiler.backends.cpu.fusions`).

Part of the CPU lowering (:mod:`bitcompiler.backends.lower` lists the converters).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from torch import fx

from bitcompiler import ops
from bitcompiler.backends.relax_emit import (
    as_int,
    as_rows,
    constant_of,
    deferred_kernel,
    defers_kernels,
    emit_kernel,
    from_rows,
    kernel_target,
    layout_input,
    layout_source,
    shape_of,
)


def quantized_input(
    bb: Any, x: Any, act: str, nchw: tuple | None, words: tuple, target: str | None = None, emit: Any = None
) -> list:
    """Activation -> the kernel's input buffers for act mode ``act``, its kernels built for
    ``target`` (default: the lowering's) and emitted by ``emit`` (default :func:`emit_kernel`)."""
    from tvm import relax

    from bitcompiler import kernels
    from bitcompiler.kernels._common import target_kind

    target = target or kernel_target()
    emit = emit or emit_kernel

    shape = shape_of(x)
    m, rest = shape[0], [as_int(d) for d in shape[1:]]
    # the model's own input on the CPU (or a reshape or transpose of it): the kernel that reads
    # it in full raises on NaN or Inf itself, and cm(x) skips Python's check
    # (backends/cpu/pipeline.py: finite_entry)
    check = target_kind(target) == "llvm" and _is_input(bb, x)
    if act == "float":
        return [x]
    if act == "int8":
        prim = kernels.quantize_rows_int8(tuple(rest), target, check=check)
        out = emit(
            bb,
            prim,
            "bitc_quantize_int8",
            [x],
            [relax.TensorType(shape, "int8"), relax.TensorType((m,), "float32")],
        )
        return [bb.emit(relax.TupleGetItem(out, 0)), bb.emit(relax.TupleGetItem(out, 1))]
    if nchw is None:
        (k,) = rest
        prim = kernels.pack_sign_rows(k, target)
        return [emit(bb, prim, "bitc_pack_sign", [x], relax.TensorType((m, words[0]), "int32"))]
    c, h, w, groups = nchw
    prim = kernels.pack_sign_nchw(c, h, w, groups, target, check=check)
    out = relax.TensorType((m, h, w, groups, words[0]), "int32")
    about = {"op": "pack_sign_nchw", "groups": groups}
    return [emit(bb, prim, "bitc_pack_sign_nchw", [x], out, about)]


def _is_input(bb: Any, x: Any) -> bool:
    """Whether ``x`` is a parameter of the function being built (the model's input: not a binding
    of its dataflow block), or holds one's values moved by layout ops (a reshape, a transpose)."""
    from tvm import relax

    def up(v: Any) -> Any:
        return layout_input(bb.lookup_binding(v)) if isinstance(v, relax.DataflowVar) else None

    x = layout_source(x, up)
    return isinstance(x, relax.Var) and not isinstance(x, relax.DataflowVar)


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
_NO_PADDING = ("lanes", "vpop", "vpop_gelu", "il", "codes", "vnni", "fcodes")


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
    planes = call.tensors["planes"]
    bits, n, kw = (as_int(d) for d in shape_of(env[planes]))
    x2, lead, rows = as_rows(bb, env[call.x], a.k)
    spec = kernels.DenseSpec.from_attrs(a, n, bits)
    name = f"bitc_dense_{a.act}_{a.code}{bits}_{a.k}x{n}" + ("_thr" if a.threshold else "")
    epilogue = _epilogue_args(env, call, bb, a.k)
    weights = constant_of(planes)
    before = _gelu_input(call.x)
    relaid = (
        kernels.relaid_dense_kernel(spec, weights.numpy(), kernel_target(), gelu=before is not None)
        if weights is not None
        else None
    )
    if relaid is not None and relaid.suffix not in _NO_PADDING and _compact(planes, a.k):
        relaid = None  # its order pads the rows: the compact stream, expanded, is smaller
    if relaid is not None:  # the weights stored in the order that kernel reads (same bits)
        epilogue[0] = relax.const(relaid.weights)
        prim, name = relaid.func, f"{name}_{relaid.suffix}"
        inputs = [x2] if relaid.float_input else quantized_input(bb, x2, a.act, None, (kw,))
        if relaid.suffix == "vpop_gelu" and before is not None:
            # the GELU's sign rule in the kernel's own sign packing: it reads the GELU's input, and
            # the rule's call goes (DeadCodeElimination) once no other layer reads it
            inputs = [as_rows(bb, env[before], a.k)[0]]
    else:
        prim, inputs = (
            kernels.dense_kernel(spec, kernel_target()),
            quantized_input(bb, x2, a.act, None, (kw,)),
        )
    y = emit_kernel(bb, prim, name, inputs + epilogue, relax.TensorType((rows, n), "float32"))
    return from_rows(bb, y, lead, n)


def _gelu_input(x: Any) -> fx.Node | None:
    """The input of ``x`` where ``x`` is ``bitc::exact_unary(input, "gelu_sign")``, else None."""
    if isinstance(x, fx.Node) and ops.op_name(x) == "exact_unary" and x.args[1:] == ("gelu_sign",):
        return x.args[0] if isinstance(x.args[0], fx.Node) else None
    return None


def conv_shapes(env: dict, call: ops.BoundCall) -> tuple[Any, int, int, int, Any, int, int]:
    """A ``bit_conv2d`` call's input and its shapes: ``(x, bits, O, CWg, M, H, W)`` (M symbolic)."""
    x = env[call.x]
    bits, o, _, _, cwg = (as_int(d) for d in shape_of(env[call.tensors["planes"]]))
    m, _, h, w = shape_of(x)
    return x, bits, o, cwg, m, as_int(h), as_int(w)


def convert_bit_conv2d(node: fx.Node, importer: Any) -> Any:
    from tvm import relax

    from bitcompiler import kernels

    bb, env = importer.block_builder, importer.env
    call = ops.bind(node)
    a: ops.BitConv2dAttrs = call.attrs
    x, bits, o, cwg, m, h, w = conv_shapes(env, call)
    if a.act != "binary" and (
        (*a.kernel, *a.padding, *a.dilation, a.groups) == (1, 1, 0, 0, 1, 1, 1) or _tiles_input(a)
    ):
        # a 1x1 conv (a classifier head, a pointwise or squeeze conv) is a dense layer over pixels,
        # a patch embedding (kernel = stride) one over patches: the weight-order dense kernel,
        # with the sample's activation scale on every row
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
        about = None
    else:
        kargs = inputs + _epilogue_args(env, call, bb, spec.cg)
        # the CPU's fusion passes may give it another epilogue (backends/cpu/fusions.py); a
        # deferred lowering builds it after them, and only if they left the call
        about = {"op": "bit_conv2d", "name": name, "spec": dataclasses.asdict(spec)}
        prim = None if defers_kernels() else kernels.conv2d_kernel(spec, kernel_target())
    out = relax.TensorType((m, o, spec.out_h, spec.out_w), "float32")
    if prim is None and about is not None:
        return emit_kernel(bb, deferred_kernel(kargs, out), name, kargs, out, {**about, "deferred": True})
    return emit_kernel(bb, prim, name, kargs, out, about)


def _tiles_input(a: ops.BitConv2dAttrs) -> bool:
    """A patch embedding: windows side by side (kernel = stride > 1), no padding or dilation,
    groups 1."""
    return (
        a.kernel == a.stride and a.kernel != (1, 1) and (*a.padding, *a.dilation, a.groups) == (0, 0, 1, 1, 1)
    )


def _conv_as_dense(bb: Any, env: dict, call: ops.BoundCall, x: Any, geometry: tuple) -> Any | None:
    """``Y (M, O, OH, OW)`` of a 1x1 conv (no padding, groups 1) or a patch embedding
    (:func:`_tiles_input`) through the dense kernel that reads its weights in a better order, or
    None when there is none.

    Every output pixel is a row: for a 1x1 conv ``(M, C, H, W)`` strided, moved to
    ``(M·OH·OW, C)``; for a patch embedding each patch's ``KH x KW x C`` inputs, in the order of
    the weights' codes ``(O, KH, KW, C)`` (flattened and packed again as one dense row each). With
    int8 activations the codes and the per-sample scale ``s`` come from the conv's own quantizer
    (one ``s`` per sample), and each row gets its sample's ``s``: the same numbers as the conv's
    epilogue. A ViT's 16x16 patch embedding at 64x64 (3 -> 512 channels, 8-bit codes) took 2.9 ms
    a call through the conv kernel, which decodes its 3-channel, 256-tap weights on every call.
    """
    import torch
    from tvm import relax

    from bitcompiler import kernels
    from bitcompiler.quant import numerics

    a: ops.BitConv2dAttrs = call.attrs
    o, h, w, bits = geometry
    c, stride, act = a.in_channels, a.stride, a.act
    (kh, kw), patch = a.kernel, _tiles_input(a)
    weights = constant_of(call.tensors["planes"])
    if weights is None:
        return None
    if patch:  # codes (O, KH, KW, C) -> one row of KH*KW*C codes per output channel
        codes = numerics.planes_to_code(torch.from_numpy(weights.numpy()), c, a.code)
        planes = numerics.code_to_planes(codes.reshape(o, -1), bits, a.code).numpy()
    else:
        planes = weights.numpy().reshape(bits, o, -1)
    spec = kernels.DenseSpec(c * kh * kw, o, bits, a.code, act, a.has_offset, a.threshold)
    relaid = kernels.relaid_dense_kernel(spec, planes, kernel_target(), fuse_quantizer=False)
    if relaid is None or (not relaid.float_input and act != "int8"):
        return None
    if relaid.suffix not in _NO_PADDING and (patch or _compact(call.tensors["planes"], c)):
        return None  # its order pads the rows: the conv reads the compact stream, expanded
    m = shape_of(x)[0]
    oh, ow = a.out_hw(h, w)
    if act == "int8":
        codes, s = quantized_input(bb, x, act, (c, h, w, 1), ())
    else:
        codes, s = x, None
    if patch:
        if (oh * kh, ow * kw) != (h, w):  # the rows and columns no window covers
            codes = bb.emit(relax.op.strided_slice(codes, axes=[2, 3], begin=[0, 0], end=[oh * kh, ow * kw]))
        tiles = relax.op.permute_dims(relax.op.reshape(codes, (m, c, oh, kh, ow, kw)), [0, 2, 4, 3, 5, 1])
        rows = bb.emit(relax.op.reshape(tiles, (m * oh * ow, kh * kw * c)))
    elif stride != (1, 1):
        codes = bb.emit(
            relax.op.strided_slice(codes, axes=[2, 3], begin=[0, 0], end=[h, w], strides=list(stride))
        )
    if not patch:
        rows = bb.emit(relax.op.reshape(relax.op.permute_dims(codes, [0, 2, 3, 1]), (m * oh * ow, c)))
    inputs = [rows] if s is None else [rows, bb.emit(relax.op.repeat(s, oh * ow, axis=0))]
    epilogue = _epilogue_args(env, call)
    epilogue[0] = relax.const(relaid.weights)
    name = f"bitc_dense_{act}_{a.code}{bits}_{c * kh * kw}x{o}_{relaid.suffix}" + (
        "_thr" if a.threshold else ""
    )
    y = emit_kernel(bb, relaid.func, name, inputs + epilogue, relax.TensorType((m * oh * ow, o), "float32"))
    if oh * ow == 1:
        return bb.emit(relax.op.reshape(y, (m, o, 1, 1)))
    return bb.emit(relax.op.permute_dims(relax.op.reshape(y, (m, oh, ow, o)), [0, 3, 1, 2]))
