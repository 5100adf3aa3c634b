"""Numbers of the four methods (docs/methods.md): tiles, group transforms, BitNet bit updates, bit-wise weights.

Part of :mod:`bitcompiler.quant.numerics`; import from there.
"""

from __future__ import annotations

import math

import torch

from bitcompiler.quant.numerics.core import (
    EPS,
    affine_weight,
    code_to_planes,
    conv2d_codes,
    conv_planes_to_codes,
    linear_codes,
    num_words,
    pack_bits,
    planes_to_code,
    sign,
    unpack_bits,
)

# --------------------------------------------------------------------------- tiles (docs/methods.md §4)
# A weight with N output channels and K values per channel is flattened row-major (PyTorch's own
# order, (N, C, KH, KW) for a conv) to N·K values and cut into p chunks of q = N·K / p; chunk c holds
# flat elements [c·q, (c+1)·q). One tile t ∈ {-1, +1}^q is stored (bit 1 = +1) and repeated p times.
# Output channel n takes the scale of the chunk its first element lies in, c(n) = ⌊n·p / N⌋. When
# p divides N the tile is *row-aligned* (q = R·K with R = N / p rows): chunk c is exactly rows
# [c·R, (c+1)·R) and the scale is the paper's α per chunk. Otherwise a row may straddle two chunks
# and keeps its first chunk's scale (our choice: it keeps the epilogue per channel).


def tile_divides(numel: int, p: int) -> bool:
    """Whether a layer of ``numel`` weights can be cut into ``p`` equal chunks."""
    return p >= 1 and numel % p == 0


def row_aligned(n: int, p: int) -> bool:
    """Whether the tile of an ``n``-channel layer at ``p`` chunks is whole rows (``p`` divides ``n``)."""
    return n % p == 0


def chunk_of_channel(n: int, s: int) -> torch.Tensor:
    """Index ``⌊n'·s / n⌋`` for every channel ``n' < n``: its chunk (``s = p``) or itself (``s = n``)."""
    return torch.div(torch.arange(n) * s, n, rounding_mode="floor")


def tile_sum(w: torch.Tensor, p: int) -> torch.Tensor:
    """The p chunks summed elementwise, ``Σ_c W_flat[c·q : (c+1)·q]`` (q values; differentiable)."""
    return w.reshape(p, -1).sum(0)


def tile_alpha(w: torch.Tensor, p: int) -> torch.Tensor:
    """α per chunk: mean |W| over the channels whose scale is that chunk's (0 for a chunk with none)."""
    n = w.shape[0]
    rows = w.detach().abs().reshape(n, -1)
    c = chunk_of_channel(n, p)
    total = torch.zeros(p, dtype=rows.dtype).index_add_(0, c, rows.sum(1))
    count = torch.zeros(p, dtype=rows.dtype).index_add_(0, c, torch.full((n,), float(rows.shape[1])))
    return total / torch.clamp(count, min=1)


def expand_tile(tile: torch.Tensor, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """A q-value tile repeated over a whole weight of ``shape``."""
    p = math.prod(shape) // tile.numel()
    return tile.repeat(p).reshape(shape)


def tile_weight(w: torch.Tensor, p: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``W ≈ α[c(n)] · expand(tile)``. Returns ``(Q, tile, α)``: pm1 codes shaped like ``w``, ``(q,)``, ``(p,)``."""
    if not tile_divides(w.numel(), p):
        raise ValueError(f"p={p} does not divide the layer's {w.numel()} weights")
    tile = sign(tile_sum(w.detach(), p)).to(torch.int64)
    return expand_tile(tile, w.shape), tile, tile_alpha(w, p)


def channel_scale(scale: torch.Tensor, n: int) -> torch.Tensor:
    """A per-chunk (``(p,)``) or per-channel (``(n,)``) scale as one value per channel."""
    return scale[chunk_of_channel(n, scale.shape[0])]


def tile_words(n: int, k: int, p: int) -> int:
    """int32 words a packed tile takes: ``R`` rows of ``⌈K/32⌉`` words if row-aligned, else ``⌈q/32⌉``."""
    return (n // p) * num_words(k) if row_aligned(n, p) else num_words(n * k // p)


def stored_bits(numel: int, bits: int, tiles: int, n_floats: int) -> int:
    """Exact storage of a quantized weight, no word padding: ``bits·numel/tiles`` + 32 per float scale."""
    return bits * numel // tiles + 32 * n_floats


def pack_tile(tile: torch.Tensor, n: int, k: int, p: int) -> torch.Tensor:
    """pm1 tile ``(q,)`` -> int32 words: planes ``(1, R, KW)`` if row-aligned, else a flat ``(⌈q/32⌉,)``."""
    if row_aligned(n, p):
        return code_to_planes(tile.reshape(n // p, k), 1, "pm1")
    return pack_bits((tile > 0).to(torch.int64))


def unpack_tile(words: torch.Tensor, n: int, k: int, p: int) -> torch.Tensor:
    """Inverse of :func:`pack_tile`: the pm1 tile ``(q,)`` int64."""
    if row_aligned(n, p):
        return planes_to_code(words, k, "pm1").reshape(-1)
    return 2 * unpack_bits(words, n * k // p) - 1


def tiled_linear(
    x: torch.Tensor,
    words: torch.Tensor,
    k: int,
    n: int,
    p: int,
    act: str,
    scale: torch.Tensor,
    bias: torch.Tensor,
    thr_sign: torch.Tensor | None = None,
    thr: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference tiled dense layer: the bit layer of the expanded tile with scale ``scale[c(n)]``.

    ``y[m, n] = (scale[c(n)]·s)·acc[m, n] + bias[n]`` with ``acc[m, n] = Σ_k t[(n·K + k) mod q]·x[m, k]``;
    for a row-aligned tile ``acc[m, n] = acc[m, n mod R]``, which is what the kernel computes once.
    """
    q = expand_tile(unpack_tile(words, n, k, p), (n, k))
    return linear_codes(x, q, act, channel_scale(scale, n), torch.zeros(n), bias, thr_sign, thr)


def tiled_conv2d(
    x: torch.Tensor,
    planes: torch.Tensor,
    in_channels: int,
    out_channels: int,
    p: int,
    act: str,
    scale: torch.Tensor,
    bias: torch.Tensor,
    stride: tuple[int, int] = (1, 1),
    padding: tuple[int, int] = (0, 0),
    dilation: tuple[int, int] = (1, 1),
    thr_sign: torch.Tensor | None = None,
    thr: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference row-aligned tiled conv (groups 1): the bit conv of the expanded tile, scale ``scale[c(o)]``.

    ``planes (1, R, KH, KW, CW)`` are the tile's R = O/p distinct filters; output channel ``o`` uses
    filter ``o mod R``, so ``acc[m, o] = acc[m, o mod R]``: what the kernel computes once.
    """
    if not row_aligned(out_channels, p) or planes.shape[1] * p != out_channels:
        raise ValueError(f"a tiled conv tile needs p={p} to divide its {out_channels} filters")
    q = conv_planes_to_codes(planes, in_channels, "pm1").repeat(p, 1, 1, 1)
    zeros = torch.zeros(out_channels)
    scale = channel_scale(scale, out_channels)
    return conv2d_codes(x, q, act, scale, zeros, bias, stride, padding, dilation, 1, thr_sign, thr)


# --------------------------------------------------------------------------- group weight transforms (§3)
# Groups of real parameters θ: "channel" (one output channel) or a size G that is a multiple of the
# channel length K (G/K whole channels), so the binarized layer keeps a per-channel scale.


def gwt_groups(theta: torch.Tensor, group: int | None) -> torch.Tensor:
    """θ viewed as ``(groups, G)``: one row per output channel (``group=None``) or per ``group`` values."""
    k = theta[0].numel()
    if group is None:
        return theta.reshape(theta.shape[0], k)
    if group % k or theta.numel() % group:
        raise ValueError(
            f"gwt group={group} must be a multiple of the {k} weights per output channel and divide the "
            f"layer's {theta.numel()} weights (so each group's scale is a per-channel scale); "
            "use group=channel or a multiple of the channel size"
        )
    return theta.reshape(-1, group)


def gwt_normalize(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group: ``z = (θ − mean θ) / std θ`` and ``a = mean |θ|`` (both differentiable)."""
    mu = g.mean(1, keepdim=True)
    std = torch.sqrt(((g - mu) ** 2).mean(1, keepdim=True) + EPS)
    return (g - mu) / std, g.abs().mean(1, keepdim=True)


def gwt_weight(theta: torch.Tensor, tau: float, group: int | None) -> torch.Tensor:
    """Training weights ``w = a_g · tanh(τ·z)`` (docs/methods.md §3), exact gradients, shaped like θ."""
    z, a = gwt_normalize(gwt_groups(theta, group))
    return (a * torch.tanh(tau * z)).reshape(theta.shape)


def gwt_binary(theta: torch.Tensor, group: int | None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Inference weights ``a_g · sign(z)``: ``(Q pm1 shaped like θ, scale per channel (N,), groups)``."""
    z, a = gwt_normalize(gwt_groups(theta.detach(), group))
    q = sign(z).to(torch.int64).reshape(theta.shape)
    per_channel = a.reshape(-1).repeat_interleave(theta.shape[0] // z.shape[0])
    return q, per_channel, z.shape[0]


def relative_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """``‖a − b‖ / ‖b‖``: how far training weights are from their binarized version."""
    return float((a.detach() - b.detach()).norm() / torch.clamp(b.detach().norm(), min=EPS))


# --------------------------------------------------------------------------- BitNet bit updates (§1)
def quantization_error(w: torch.Tensor, bits: int) -> torch.Tensor:
    """``½‖W_q − W‖²`` at ``bits`` (docs/methods.md §1); differentiable in ``W`` with ``W_q`` held constant."""
    q, alpha, delta = affine_weight(w, bits)
    wq = (alpha + delta * q.to(w.dtype)).detach()
    return 0.5 * ((wq - w) ** 2).sum()


def sign_eps(x: float, eps: float) -> int:
    """``sign_ε(x)``: 0 inside ``(−ε, ε)``, else the sign of ``x``."""
    return 0 if abs(x) < eps else (1 if x > 0 else -1)


def halved(mu: float, step: int, every: int) -> float:
    """``μ`` halved every ``every`` steps: ``μ · 0.5^⌊step / every⌋``."""
    return mu * 0.5 ** (step // every)


def bit_update(
    err_low: float, err: float, bits: int, lambda1: float, lambda2: float, mu: float, eps: float
) -> int:
    """BitNet's change of B: ``−sign_ε(μ·λ1·∂Q/∂B + μ·λ2·2^B)`` with ``∂Q/∂B ≈ Q(B) − Q(B−1)``.

    ``err_low`` and ``err`` are the quantization errors at ``B − 1`` and ``B``. More bits lower the
    error (∂Q/∂B < 0), so λ1 pushes B up and the bit cost λ2·2^B pushes it down.
    """
    return -sign_eps(mu * lambda1 * (err - err_low) + mu * lambda2 * 2.0**bits, eps)


# --------------------------------------------------------------------------- bit-wise weights (§2)
def bitwise_alpha(fan_in: int, n: int) -> float:
    """α with ``std(α·sign·Q) = sqrt(2 / fan_in)`` (He) when every bit of Q is a fair coin.

    ``E[Q²] = Var + mean² = (4^n − 1)/12 + (2^n − 1)²/4`` for ``Q = Σ_{i<n} 2^i b_i``.
    """
    mean_sq = (4**n - 1) / 12 + (2**n - 1) ** 2 / 4
    return math.sqrt(2.0 / fan_in) / math.sqrt(mean_sq)


def bitwise_weight(bits: list[torch.Tensor], sign_bit: torch.Tensor, alpha: float) -> torch.Tensor:
    """``w = α · (1 − 2·s) · Σ_i 2^i · b_i`` from {0,1} magnitude bits ``b_i`` (LSB first) and sign bit ``s``.

    Differentiable in every bit (the straight-through estimator lives in the quantizer).
    """
    magnitude = sum(2.0**i * b for i, b in enumerate(bits))
    return alpha * (1 - 2 * sign_bit) * magnitude


def bitwise_codes(
    magnitude: torch.Tensor, sign_bit: torch.Tensor, n: int, alpha: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sign-magnitude ``Q ∈ [−(2^n−1), 2^n−1]`` as offset binary on ``n + 1`` uint planes.

    Returns ``(Q', scale, offset)`` per output channel: ``Q' = Q + (2^n − 1)``, ``scale = α``,
    ``offset = −(2^n − 1)·α``, so ``scale·Q' + offset = α·Q`` exactly in integers.
    """
    bias = 2**n - 1
    q = (1 - 2 * sign_bit.to(torch.int64)) * magnitude.to(torch.int64) + bias
    rows = magnitude.shape[0]
    return q, torch.full((rows,), float(alpha)), torch.full((rows,), -bias * float(alpha))


def zero_fraction(q: torch.Tensor) -> float:
    """Fraction of exact zeros in ``q``: free work in a bit-serial kernel."""
    return float((q == 0).double().mean()) if q.numel() else 0.0


def bytes_to_bits(data: bytes) -> torch.Tensor:
    """Bytes -> {0,1} int64 tensor of ``8·len(data)`` bits, least significant bit of each byte first."""
    raw = torch.tensor(list(data), dtype=torch.int64)
    return ((raw.unsqueeze(1) >> torch.arange(8)) & 1).reshape(-1)


def bits_to_bytes(bits: torch.Tensor) -> bytes:
    """Inverse of :func:`bytes_to_bits` (the length is rounded down to whole bytes)."""
    b = bits.to(torch.int64).reshape(-1)[: bits.numel() // 8 * 8].reshape(-1, 8)
    return bytes((b << torch.arange(8)).sum(1).tolist())
