"""Tiled Bit Networks (docs/methods.md §4): one binary tile reused across a layer, plus one α per chunk.

Training (:class:`TiledWeight`): the weight is flattened to N·K values and cut into p chunks of
q = N·K/p; the tile is ``sign(Σ_chunks W)`` with a straight-through gradient (so every weight gets
the gradient of the tile position it sums into) and the layer uses ``α[c(n)] · tile`` repeated p
times (α per chunk = mean |W| of the chunk, or learned with ``alpha=learned``, its gradient scaled
by 1/√q so that plain SGD at the paper's lr stays stable). Layers with fewer
than ``min_weights`` weights, or whose size p does not divide, are plain binary.

Inference (:class:`~bitcompiler.quant.tiled_layers.TiledBitLinear`,
:class:`~bitcompiler.quant.tiled_layers.TiledBitConv2d`, made by the ``tile_weights`` pass):
stores the packed tile (q bits) and the p scales; a row-aligned tile (p divides N) is R = N/p
distinct rows (filters, for a conv) whose dot products the kernel computes once and reuses p times. Numbers: :mod:`bitcompiler.quant.numerics`.

    >>> import torch, bitcompiler as bc
    >>> net = bc.prepare(torch.nn.Sequential(torch.nn.Linear(784, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10)),
    ...                  scheme="tiled:p=4,first_last=quantize")
    >>> net(torch.randn(2, 784)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

import torch
from torch import nn

from bitcompiler.quant import numerics
from bitcompiler.quant.modules import BinaryWeight, WeightCodes, register_weight_quantizer, straight_through
from bitcompiler.quant.tiled_layers import TILED_LAYERS, TiledBitConv2d, TiledBitLinear, why_untiled

__all__ = ["TILED_LAYERS", "TiledBitConv2d", "TiledBitLinear", "TiledWeight", "weight_storage", "why_untiled"]

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


@register_weight_quantizer("tiled")
def from_scheme(scheme) -> TiledWeight:
    return TiledWeight(int(scheme.get("p")), int(scheme.get("min_weights")), scheme.get("alpha"))


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
