"""Float ``aten.conv2d`` / ``aten.convolution`` -> the scheduled direct conv kernel.

A 2-D, non-transposed float32 convolution whose weights (and bias) are constants of the exported
program and whose input has static channels and size goes to
:func:`bitcompiler.kernels.conv_float.float_conv_kernel`, the weights relaid out at compile time;
anything else (a computed weight, a string padding, another dtype) keeps the frontend's
conversion (Relax's legalization).
"""

from __future__ import annotations

from typing import Any

from torch import fx

from bitcompiler.backends.relax_emit import constant_of, emit_kernel


def _pair(v: Any) -> tuple[int, int] | None:
    if isinstance(v, int):
        return (v, v)
    if isinstance(v, (list, tuple)) and len(v) in (1, 2) and all(isinstance(e, int) for e in v):
        return (v[0], v[-1])
    return None


def _float_conv(node: fx.Node, importer: Any, args: tuple) -> Any | None:
    """The kernel call for ``conv(x, weight, bias, stride, padding, dilation, groups)``, or None."""
    import torch
    from tvm import relax

    from bitcompiler.kernels import ConvSpec
    from bitcompiler.kernels.conv_float import KERNEL_NAME, float_conv_kernel, relayout_weights

    x_node, w_node, b_node, stride, padding, dilation, groups = args
    weight, bias = constant_of(w_node), constant_of(b_node) if b_node is not None else None
    pairs = [_pair(v) for v in (stride, padding, dilation)]
    if weight is None or weight.dim() != 4 or weight.dtype != torch.float32 or None in pairs:
        return None
    if (b_node is not None and (bias is None or bias.dtype != torch.float32)) or not isinstance(groups, int):
        return None
    x = importer.env[x_node]
    shape = list(x.ty.shape)
    if (
        len(shape) != 4
        or x.ty.dtype != "float32"
        or not all(isinstance(d, int) or hasattr(d, "value") for d in shape[1:])
    ):
        return None
    c, h, w = (int(d) for d in shape[1:])
    o, cg, kh, kw = weight.shape
    if cg * groups != c:
        return None
    try:
        spec = ConvSpec(c, o, h, w, (kh, kw), *pairs, groups, 1, "pm1", "float", False, False)  # type: ignore[arg-type, call-arg, misc]
    except ValueError:
        return None
    prim = float_conv_kernel(spec, bias is not None)
    consts = [relax.const(relayout_weights(spec, weight.numpy()))]
    if bias is not None:
        consts.append(relax.const(bias.numpy()))
    st = "x".join(map(str, spec.stride))
    name = f"{KERNEL_NAME}_{c}x{o}_{kh}x{kw}_s{st}_g{groups}"
    out = relax.TensorType((shape[0], o, spec.out_h, spec.out_w), "float32")
    return emit_kernel(importer.block_builder, prim, name, [x, *consts], out)


def convert_conv2d(node: fx.Node, importer: Any) -> Any:
    """``aten.conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1)``."""
    a = list(node.args) + [None, 1, 0, 1, 1][len(node.args) - 2 :]
    out = _float_conv(node, importer, tuple(a[:7])) if len(node.args) >= 2 else None
    return out if out is not None else importer._conv2d(node)


def convert_convolution(node: fx.Node, importer: Any) -> Any:
    """``aten.convolution(x, w, bias, stride, padding, dilation, transposed, output_padding, groups)``."""
    a = node.args
    out = None
    if len(a) == 9 and a[6] is False:
        out = _float_conv(node, importer, (a[0], a[1], a[2], a[3], a[4], a[5], a[8]))
    return out if out is not None else importer._convolution(node)
