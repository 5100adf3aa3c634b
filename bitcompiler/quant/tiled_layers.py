"""The inference layers of tiled schemes (docs/methods.md §4), made by the ``tile_weights`` pass.

Each stores the packed tile (q bits) and the p scales; a row-aligned tile (p divides N) is
R = N/p distinct rows (filters, for a conv) whose dot products the kernel computes once and
reuses p times. Training (the ``tiled`` scheme's quantizer) is :mod:`bitcompiler.methods.tiled`.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import nn

from bitcompiler import ops
from bitcompiler.quant import numerics
from bitcompiler.quant.bitlayers import BitConv2d, BitLinear


def why_untiled(numel: int, p: int, min_weights: int) -> str | None:
    """None if a layer of ``numel`` weights is tiled at ``p``, else why it stays plain binary."""
    if numel < min_weights:
        return f"{numel} weights < min_weights={min_weights}: plain binary"
    if not numerics.tile_divides(numel, p):
        return f"p={p} does not divide its {numel} weights: plain binary"
    return None


class _TiledLayer(nn.Module):
    """What both tiled layers store (:func:`_keep_tile_and_epilogue`) and how they call their op."""

    tile: torch.Tensor
    scale: torch.Tensor
    bias: torch.Tensor
    thr_sign: torch.Tensor
    thr: torch.Tensor
    n_floats: int

    def attrs(self) -> ops.TiledLinearAttrs | ops.TiledConv2dAttrs:
        raise NotImplementedError

    def op_tensors(self) -> dict[str, torch.Tensor]:
        return {t: getattr(self, t) for t in self.attrs().TENSORS}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attrs().call(x, self.op_tensors())


class TiledBitLinear(_TiledLayer):
    """Inference dense layer storing one packed tile and p (or, after a merged affine, N) scales.

    ``tile``: int32 words (``(1, R, KW)`` planes if row-aligned, else ``(⌈q/32⌉,)``); ``scale``:
    ``(p,)`` or ``(N,)``, indexed by ``⌊n·len(scale)/N⌋``; ``bias``; optional integer thresholds.
    """

    op = "tiled_linear"

    def __init__(self, bit: BitLinear, p: int) -> None:
        super().__init__()
        n, k = bit.out_features, bit.in_features
        codes = (
            bit.codes.long()
            if bit.codes is not None
            else numerics.planes_to_code(cast(torch.Tensor, bit.planes), k, bit.code)
        )
        tile = codes.reshape(-1)[: n * k // p]
        if bit.code != "pm1" or not torch.equal(numerics.expand_tile(tile, (n, k)), codes):
            raise ValueError(f"layer codes are not a pm1 tile repeated p={p} times")
        self.in_features, self.out_features, self.p = k, n, p
        self.act, self.label, self.threshold = bit.act, bit.label, bit.threshold
        _keep_tile_and_epilogue(self, numerics.pack_tile(tile, n, k, p), bit, p)

    @property
    def row_aligned(self) -> bool:
        return numerics.row_aligned(self.out_features, self.p)

    @property
    def tile_bits(self) -> int:
        return self.out_features * self.in_features // self.p

    def attrs(self) -> ops.TiledLinearAttrs:
        """The ``bitc::tiled_linear`` attributes of this layer."""
        return ops.TiledLinearAttrs(self.in_features, self.out_features, self.p, self.act, self.threshold)

    def extra_repr(self) -> str:
        kind = f"row-aligned, R={self.out_features // self.p}" if self.row_aligned else "unaligned"
        return (
            f"{self.label}, {self.in_features}->{self.out_features}, p={self.p}, tile={self.tile_bits} bits "
            f"({kind}), {self.n_floats} scales, act={self.act}" + (", threshold" if self.threshold else "")
        )


class TiledBitConv2d(_TiledLayer):
    """Inference conv layer (groups 1) storing one row-aligned tile: R = O/p filters, p (or O) scales.

    ``tile``: int32 planes ``(1, R, KH, KW, CW)`` (the conv kernels' layout); output channel ``o``
    uses filter ``o mod R`` and scale ``scale[⌊o·len(scale)/O⌋]``; ``bias``; optional thresholds.
    """

    op = "tiled_conv2d"

    def __init__(self, bit: BitConv2d, p: int) -> None:
        super().__init__()
        o, cg = bit.out_channels, bit.in_channels // bit.groups
        if bit.groups != 1 or not numerics.row_aligned(o, p):
            raise ValueError(f"a tiled conv needs groups=1 and p={p} dividing its {o} filters")
        codes = (
            bit.codes.long()
            if bit.codes is not None
            else numerics.conv_planes_to_codes(cast(torch.Tensor, bit.planes), cg, bit.code)
        )
        r = o // p
        if bit.code != "pm1" or not torch.equal(codes[:r].repeat(p, 1, 1, 1), codes):
            raise ValueError(f"layer codes are not a pm1 tile repeated p={p} times")
        self.in_channels, self.out_channels, self.p = bit.in_channels, o, p
        self.kernel_size, self.stride = bit.kernel_size, bit.stride
        self.padding, self.dilation = bit.padding, bit.dilation
        self.act, self.label, self.threshold = bit.act, bit.label, bit.threshold
        _keep_tile_and_epilogue(self, numerics.conv_codes_to_planes(codes[:r], 1, "pm1"), bit, p)

    @property
    def in_features(self) -> int:
        """Weights per output channel (K of the flattened layer)."""
        return self.in_channels * self.kernel_size[0] * self.kernel_size[1]

    @property
    def out_features(self) -> int:
        return self.out_channels

    @property
    def tile_bits(self) -> int:
        return self.out_channels * self.in_features // self.p

    row_aligned = True

    def attrs(self) -> ops.TiledConv2dAttrs:
        """The ``bitc::tiled_conv2d`` attributes of this layer."""
        return ops.TiledConv2dAttrs(
            self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
            self.dilation, self.p, self.act, self.threshold,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return (
            f"{self.label}, {self.in_channels}->{self.out_channels}, kernel={self.kernel_size}, p={self.p}, "
            f"tile={self.tile_bits} bits (R={self.out_channels // self.p} filters), {self.n_floats} scales, "
            f"act={self.act}" + (", threshold" if self.threshold else "")
        )


TILED_LAYERS = (TiledBitLinear, TiledBitConv2d)


def _keep_tile_and_epilogue(layer: nn.Module, tile: torch.Tensor, bit: BitLinear | BitConv2d, p: int) -> None:
    """A tiled layer's buffers: the packed tile, p (or N) scales, and the bit layer's bias and thresholds."""
    layer.register_buffer("tile", tile)
    layer.register_buffer("scale", _per_chunk_if_exact(bit.scale, p))
    layer.register_buffer("bias", bit.bias.clone())
    layer.register_buffer("thr_sign", bit.thr_sign.clone())
    layer.register_buffer("thr", bit.thr.clone())
    layer.n_floats = cast(torch.Tensor, layer.scale).numel()  # type: ignore[assignment]


def _per_chunk_if_exact(scale: torch.Tensor, p: int) -> torch.Tensor:
    """The per-channel scale as p per-chunk values when it is constant on each chunk's channels."""
    n = scale.shape[0]
    c = numerics.chunk_of_channel(n, p)
    first = torch.clamp(torch.searchsorted(c, torch.arange(p)), max=n - 1)  # c is sorted
    small = torch.where(c[first] == torch.arange(p), scale[first], torch.zeros((), dtype=scale.dtype))
    return small if torch.equal(numerics.channel_scale(small, n), scale) else scale.clone()
