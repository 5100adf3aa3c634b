"""Tiled Bit Networks (docs/methods.md §4): one binary tile reused across a layer, plus one α per chunk.

Training (:class:`TiledWeight`): the weight is flattened to N·K values and cut into p chunks of
q = N·K/p; the tile is ``sign(Σ_chunks W)`` with a straight-through gradient (so every weight gets
the gradient of the tile position it sums into) and the layer uses ``α[c(n)] · tile`` repeated p
times (α per chunk = mean |W| of the chunk, or learned with ``alpha=learned``, its gradient scaled
by 1/√q so that plain SGD at the paper's lr stays stable). Layers with fewer
than ``min_weights`` weights, or whose size p does not divide, are plain binary.

Inference (:class:`TiledBitLinear`, :class:`TiledBitConv2d`, made by the ``tile_weights`` pass):
stores the packed tile (q bits) and the p scales; a row-aligned tile (p divides N) is R = N/p
distinct rows (filters, for a conv) whose dot products the kernel computes once and reuses p times. Numbers: :mod:`bitcompiler.quant.numerics`.

    >>> import torch, bitcompiler as bc
    >>> net = bc.prepare(torch.nn.Sequential(torch.nn.Linear(784, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10)),
    ...                  scheme="tiled:p=4,first_last=quantize")
    >>> net(torch.randn(2, 784)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

from typing import cast

import torch
from torch import nn

from bitcompiler import ops
from bitcompiler.quant import numerics
from bitcompiler.quant.bitlayers import BitConv2d, BitLinear
from bitcompiler.quant.modules import BinaryWeight, WeightCodes, register_weight_quantizer, straight_through

ALPHA_MODES = ("chunk", "learned")


class TiledWeight(nn.Module):
    """Weight quantizer of the ``tiled`` scheme (falls back to :class:`BinaryWeight` per layer)."""

    bits = 1
    alpha_ready: torch.Tensor

    def __init__(self, p: int, min_weights: int = 65536, alpha: str = "chunk") -> None:
        super().__init__()
        if p < 1:
            raise ValueError(f"tiled needs p >= 1, got p={p}")
        if alpha not in ALPHA_MODES:
            raise ValueError(f"alpha={alpha!r} is not valid; use alpha=chunk or alpha=learned")
        self.p, self.min_weights, self.alpha_mode = int(p), int(min_weights), alpha
        self.binary = BinaryWeight()
        # learned α exists from the start (so optimizers see it); it is set from the weights once
        self.alpha = nn.Parameter(torch.zeros(self.p)) if alpha == "learned" else None
        self.register_buffer("alpha_ready", torch.tensor(False))

    def tiles_for(self, w: torch.Tensor) -> int:
        """p if this weight is tiled, 1 if it stays plain binary."""
        return self.p if why_untiled(w.numel(), self.p, self.min_weights) is None else 1

    def _alpha(self, w: torch.Tensor) -> torch.Tensor:
        if self.alpha is None:
            return numerics.tile_alpha(w, self.p)
        if not bool(self.alpha_ready):
            with torch.no_grad():
                self.alpha.copy_(numerics.tile_alpha(w, self.p))
            self.alpha_ready.fill_(True)
        # each α multiplies q = N/p weights, so its raw gradient is ~√q times a weight's and SGD at
        # the paper's lr 0.1 blows it up (NaN within 50 steps on the MNIST MLP); scale the gradient
        # by 1/√q (as LSQ does for its step size), leaving the value unchanged
        g = (self.p / w.numel()) ** 0.5
        return self.alpha * g + (self.alpha * (1 - g)).detach()

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if self.tiles_for(w) == 1:
            return self.binary(w)
        s = numerics.tile_sum(w, self.p)
        tile = straight_through(s, numerics.sign(s.detach()))
        scale = numerics.channel_scale(self._alpha(w), w.shape[0]).to(w.dtype)
        return numerics.expand_tile(tile, w.shape) * scale.reshape((-1,) + (1,) * (w.dim() - 1))

    def codes(self, w: torch.Tensor) -> WeightCodes:
        if self.tiles_for(w) == 1:
            return self.binary.codes(w)
        q, _tile, _ = numerics.tile_weight(w, self.p)
        scale = numerics.channel_scale(self._alpha(w).detach(), w.shape[0])
        return WeightCodes(q, "pm1", 1, scale, torch.zeros_like(scale), n_floats=self.p, tiles=self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}, min_weights={self.min_weights}, alpha={self.alpha_mode}"


def why_untiled(numel: int, p: int, min_weights: int) -> str | None:
    """None if a layer of ``numel`` weights is tiled at ``p``, else why it stays plain binary."""
    if numel < min_weights:
        return f"{numel} weights < min_weights={min_weights}: plain binary"
    if not numerics.tile_divides(numel, p):
        return f"p={p} does not divide its {numel} weights: plain binary"
    return None


@register_weight_quantizer("tiled")
def from_scheme(scheme) -> TiledWeight:
    return TiledWeight(int(scheme.get("p")), int(scheme.get("min_weights")), scheme.get("alpha"))


class TiledBitLinear(nn.Module):
    """Inference dense layer storing one packed tile and p (or, after a merged affine, N) scales.

    ``tile``: int32 words (``(1, R, KW)`` planes if row-aligned, else ``(⌈q/32⌉,)``); ``scale``:
    ``(p,)`` or ``(N,)``, indexed by ``⌊n·len(scale)/N⌋``; ``bias``; optional integer thresholds.
    """

    op = "tiled_linear"
    tile: torch.Tensor
    scale: torch.Tensor
    bias: torch.Tensor
    thr_sign: torch.Tensor
    thr: torch.Tensor
    n_floats: int

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

    def op_tensors(self) -> dict[str, torch.Tensor]:
        return {t: getattr(self, t) for t in ops.TiledLinearAttrs.TENSORS}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attrs().call(x, self.op_tensors())

    def extra_repr(self) -> str:
        kind = f"row-aligned, R={self.out_features // self.p}" if self.row_aligned else "unaligned"
        return (
            f"{self.label}, {self.in_features}->{self.out_features}, p={self.p}, tile={self.tile_bits} bits "
            f"({kind}), {self.n_floats} scales, act={self.act}" + (", threshold" if self.threshold else "")
        )


class TiledBitConv2d(nn.Module):
    """Inference conv layer (groups 1) storing one row-aligned tile: R = O/p filters, p (or O) scales.

    ``tile``: int32 planes ``(1, R, KH, KW, CW)`` (the conv kernels' layout); output channel ``o``
    uses filter ``o mod R`` and scale ``scale[⌊o·len(scale)/O⌋]``; ``bias``; optional thresholds.
    """

    op = "tiled_conv2d"
    tile: torch.Tensor
    scale: torch.Tensor
    bias: torch.Tensor
    thr_sign: torch.Tensor
    thr: torch.Tensor
    n_floats: int

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

    def op_tensors(self) -> dict[str, torch.Tensor]:
        return {t: getattr(self, t) for t in ops.TiledConv2dAttrs.TENSORS}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attrs().call(x, self.op_tensors())

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


def weight_storage(model: nn.Module) -> list[tuple[str, int, int]]:
    """``(layer, weights, stored bits)`` for every Linear/Conv2d of a float or ``prepare``d model.

    Exact (no word padding): tile bits + 32 per α for tiled layers, code bits + 32 per scale for
    other quantized layers, 32 per weight for float ones. The compiler's report counts the padded
    words it really stores; this is the paper's accounting.
    """
    from bitcompiler.quant.modules import QUANT_LAYERS

    rows = []
    for name, m in model.named_modules():
        if isinstance(m, QUANT_LAYERS):
            c = m.codes()
            rows.append(
                (name, m.weight.numel(), numerics.stored_bits(m.weight.numel(), c.bits, c.tiles, c.n_floats))
            )
        elif isinstance(m, (nn.Linear, nn.Conv2d)):
            rows.append((name, m.weight.numel(), 32 * m.weight.numel()))
    return rows
