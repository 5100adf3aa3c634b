"""Relax converters for pooling ops: ``adaptive_max_pool2d`` (which TVM's frontend lacks),
``max_pool2d`` with its default stride (which the frontend mistakes for no stride) and
``bitc::window_mean`` (average pooling in the reference's fixed summation order); and the
CPU pipeline's legalization of float ``relax.nn.max_pool2d`` (:func:`legalize_max_pool2d`).

Part of the CPU lowering (:mod:`bitcompiler.backends.lower` lists them in its converter table).
"""

from __future__ import annotations

from typing import Any

from torch import fx

from bitcompiler.backends.relax_emit import as_int, emit_kernel, kernel_target, shape_of
from bitcompiler.errors import LoweringError


def convert_adaptive_max_pool2d(node: fx.Node, importer: Any) -> Any:
    """``adaptive_max_pool2d`` (CBAM's channel attention), which TVM's frontend lacks: each output
    cell is the max over its window ``[floor(i·H/out), ceil((i+1)·H/out))``, exactly torch's."""
    from tvm import relax

    bb = importer.block_builder
    x = importer.env[node.args[0]]
    out: Any = node.args[1]
    oh, ow = (out, out) if isinstance(out, int) else (out[0], out[1])
    h, w = (as_int(d) for d in shape_of(x)[-2:])
    oh, ow = oh or h, ow or w
    if h % oh == 0 and w % ow == 0:  # equal windows: one max pool
        y = bb.emit(relax.op.nn.max_pool2d(x, (h // oh, w // ow), (h // oh, w // ow)))
    else:
        rows = []
        for i in range(oh):
            h0, h1 = (i * h) // oh, -((-(i + 1) * h) // oh)
            cols = []
            for j in range(ow):
                w0, w1 = (j * w) // ow, -((-(j + 1) * w) // ow)
                window = relax.op.strided_slice(x, axes=[2, 3], begin=[h0, w0], end=[h1, w1])
                cols.append(bb.emit(relax.op.max(window, axis=[2, 3], keepdims=True)))
            rows.append(bb.emit(relax.op.concat(cols, axis=3)))
        y = bb.emit(relax.op.concat(rows, axis=2))
    # the ATen op returns (values, indices); inference graphs read only the values
    if any(u.args[1] != 0 for u in node.users):
        raise LoweringError(f"`{node.name}`: the indices of adaptive_max_pool2d are not supported")
    return relax.Tuple([y, y])


def convert_max_pool2d(node: fx.Node, importer: Any) -> Any:
    """``max_pool2d(x, kernel, stride=[], padding, dilation, ceil_mode)``: ATen's empty stride
    means the kernel size (``F.max_pool2d(x, 2, ceil_mode=True)``); the frontend passed it on
    as no stride at all and TVM rejected it."""
    args = list(importer.retrieve_args(node))
    kernel = args[1]
    stride = args[2] if len(args) > 2 and args[2] not in ([], ()) else kernel
    rest = [args[i] if len(args) > i else d for i, d in ((3, 0), (4, 1), (5, False))]
    y = importer._max_pool2d_impl(args[0], kernel, stride, *rest)
    if "with_indices" in str(node.target):
        if any(u.args[1] != 0 for u in node.users):
            raise LoweringError(f"`{node.name}`: the indices of max_pool2d are not supported")
        from tvm import relax

        return importer.block_builder.emit(relax.Tuple([y, y]))
    return y


def convert_window_mean(node: fx.Node, importer: Any) -> Any:
    """Average pooling in the reference's fixed order (``kernels.window_mean_kernel``)."""
    from tvm import relax

    from bitcompiler import kernels

    bb = importer.block_builder
    x = importer.env[node.args[0]]
    args: Any = node.args
    kernel, stride, padding, include_pad = (tuple(a) if isinstance(a, list) else a for a in args[1:5])
    m, c, h, w = shape_of(x)
    prim = kernels.window_mean_kernel(
        as_int(c), as_int(h), as_int(w), kernel, stride, padding, bool(include_pad), kernel_target()
    )
    val = node.meta["val"]
    name = f"bitc_window_mean_{kernel[0]}x{kernel[1]}_s{stride[0]}x{stride[1]}"
    return emit_kernel(
        bb, prim, name, [x], relax.TensorType((m, *(int(d) for d in val.shape[1:])), "float32")
    )


def legalize_max_pool2d(bb: Any, call: Any) -> Any:
    """A static float32 NCHW ``relax.nn.max_pool2d`` as the scheduled
    :func:`bitcompiler.kernels.max_pool2d_kernel` (the same maxima: TVM's default is the same max
    over the same taps, as an unscheduled scalar nest); anything else as TVM legalizes it."""
    import tvm
    from tvm import relax
    from tvm.relax.transform.legalize_ops.nn import _nn_max_pool2d

    from bitcompiler import kernels
    from bitcompiler.backends.relax_emit import kernel_func

    x = call.args[0]
    window = pool_window(call) if x.ty.dtype == "float32" and len(x.ty.shape) == 4 else None
    target = tvm.target.Target.current(allow_none=True)
    if window is None or target is None or target.kind.name != "llvm":
        return _nn_max_pool2d(bb, call)
    prim = kernels.max_pool2d_kernel(int(x.ty.shape[1]), window, target)
    gv = bb.add_func(kernel_func(prim), "bitc_max_pool2d")
    return relax.call_tir(gv, relax.Tuple([x]), call.ty)


def pool_window(pool: Any) -> Any | None:
    """The :class:`~bitcompiler.kernels.PoolWindow` of a static NCHW ``relax.nn.max_pool2d``."""
    from bitcompiler.kernels import PoolWindow
    from bitcompiler.kernels.pool_max import MAX_TAPS

    a, (x,) = pool.attrs, pool.args
    try:
        (h, w), (oh, ow) = ([int(d) for d in list(e.ty.shape)[2:]] for e in (x, pool))
    except (TypeError, ValueError):  # a symbolic spatial size, not 4-D
        return None
    if a.layout != "NCHW" or a.out_layout != "NCHW" or a.pool_size[0] * a.pool_size[1] > MAX_TAPS:
        return None
    pair = lambda v: (int(v[0]), int(v[1]))
    return PoolWindow(h, w, oh, ow, pair(a.pool_size), pair(a.strides), pair(a.padding), pair(a.dilation))
