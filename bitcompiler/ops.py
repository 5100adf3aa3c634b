"""The ``bitc`` custom ops.

Their CPU implementation *is* the reference numerics; ``torch.export`` keeps
them as single nodes, and the TVM lowering converts each into calls of TIR bit
kernels (``bitcompiler.backends.lower``).
"""

from __future__ import annotations

import torch

from bitcompiler.quant import numerics


@torch.library.custom_op("bitc::bit_linear", mutates_args=())
def bit_linear(
    x: torch.Tensor,
    planes: torch.Tensor,
    scale: torch.Tensor,
    offset: torch.Tensor,
    bias: torch.Tensor,
    thr_sign: torch.Tensor,
    thr: torch.Tensor,
    k: int,
    code: str,
    act: str,
    threshold: bool,
    has_offset: bool,
) -> torch.Tensor:
    """Dense bit layer over the last axis of ``x`` (any leading shape)."""
    lead = x.shape[:-1]
    y = numerics.bit_linear(
        x.reshape(-1, k),
        planes,
        k,
        code,
        act,
        scale,
        offset,
        bias,
        thr_sign if threshold else None,
        thr if threshold else None,
    )
    return y.reshape(*lead, planes.shape[1])


@bit_linear.register_fake
def _(x, planes, scale, offset, bias, thr_sign, thr, k, code, act, threshold, has_offset):
    return x.new_empty(*x.shape[:-1], planes.shape[1])


@torch.library.custom_op("bitc::bit_conv2d", mutates_args=())
def bit_conv2d(
    x: torch.Tensor,
    planes: torch.Tensor,
    scale: torch.Tensor,
    offset: torch.Tensor,
    bias: torch.Tensor,
    thr_sign: torch.Tensor,
    thr: torch.Tensor,
    in_channels: int,
    kernel: list[int],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    code: str,
    act: str,
    threshold: bool,
    has_offset: bool,
) -> torch.Tensor:
    """Conv2d bit layer, NCHW float32 in and out."""
    kh, kw = kernel
    return numerics.bit_conv2d(
        x,
        planes,
        in_channels,
        (kh, kw),
        code,
        act,
        scale,
        offset,
        bias,
        (stride[0], stride[1]),
        (padding[0], padding[1]),
        (dilation[0], dilation[1]),
        groups,
        thr_sign if threshold else None,
        thr if threshold else None,
    )


def conv_out_size(size: int, k: int, s: int, p: int, d: int) -> int:
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


@bit_conv2d.register_fake
def _(
    x,
    planes,
    scale,
    offset,
    bias,
    thr_sign,
    thr,
    in_channels,
    kernel,
    stride,
    padding,
    dilation,
    groups,
    code,
    act,
    threshold,
    has_offset,
):
    oh = conv_out_size(x.shape[2], kernel[0], stride[0], padding[0], dilation[0])
    ow = conv_out_size(x.shape[3], kernel[1], stride[1], padding[1], dilation[1])
    return x.new_empty(x.shape[0], planes.shape[1], oh, ow)


@torch.library.custom_op("bitc::tiled_linear", mutates_args=())
def tiled_linear(
    x: torch.Tensor,
    tile: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor,
    thr_sign: torch.Tensor,
    thr: torch.Tensor,
    k: int,
    n: int,
    p: int,
    act: str,
    threshold: bool,
) -> torch.Tensor:
    """Tiled dense layer (docs/methods.md §4) over the last axis of ``x``: one packed tile, p scales."""
    lead = x.shape[:-1]
    y = numerics.tiled_linear(
        x.reshape(-1, k),
        tile,
        k,
        n,
        p,
        act,
        scale,
        bias,
        thr_sign if threshold else None,
        thr if threshold else None,
    )
    return y.reshape(*lead, n)


@tiled_linear.register_fake
def _(x, tile, scale, bias, thr_sign, thr, k, n, p, act, threshold):
    return x.new_empty(*x.shape[:-1], n)


@torch.library.custom_op("bitc::tiled_conv2d", mutates_args=())
def tiled_conv2d(
    x: torch.Tensor,
    tile: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor,
    thr_sign: torch.Tensor,
    thr: torch.Tensor,
    in_channels: int,
    out_channels: int,
    kernel: list[int],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    p: int,
    act: str,
    threshold: bool,
) -> torch.Tensor:
    """Row-aligned tiled conv (docs/methods.md §4), NCHW float32: R = O/p stored filters, p scales."""
    return numerics.tiled_conv2d(
        x,
        tile,
        in_channels,
        out_channels,
        p,
        act,
        scale,
        bias,
        (stride[0], stride[1]),
        (padding[0], padding[1]),
        (dilation[0], dilation[1]),
        thr_sign if threshold else None,
        thr if threshold else None,
    )


@tiled_conv2d.register_fake
def _(
    x,
    tile,
    scale,
    bias,
    thr_sign,
    thr,
    in_channels,
    out_channels,
    kernel,
    stride,
    padding,
    dilation,
    p,
    act,
    threshold,
):
    oh = conv_out_size(x.shape[2], kernel[0], stride[0], padding[0], dilation[0])
    ow = conv_out_size(x.shape[3], kernel[1], stride[1], padding[1], dilation[1])
    return x.new_empty(x.shape[0], out_channels, oh, ow)


@torch.library.custom_op("bitc::window_mean", mutates_args=())
def window_mean(
    x: torch.Tensor, kernel: list[int], stride: list[int], padding: list[int], count_include_pad: bool
) -> torch.Tensor:
    """Average pooling, NCHW float32, summed in one fixed order (``numerics.window_mean``)."""
    return numerics.window_mean(
        x,
        (kernel[0], kernel[1]),
        (stride[0], stride[1]),
        (padding[0], padding[1]),
        count_include_pad,
    )


@window_mean.register_fake
def _(x, kernel, stride, padding, count_include_pad):
    oh = numerics.pool_out_size(x.shape[2], kernel[0], stride[0], padding[0])
    ow = numerics.pool_out_size(x.shape[3], kernel[1], stride[1], padding[1])
    return x.new_empty(x.shape[0], x.shape[1], oh, ow)
