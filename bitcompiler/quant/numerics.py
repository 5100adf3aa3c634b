"""The one place where bitcompiler computes a number.

Every quantizer, pass, custom-op reference and test calls these functions;
kernels are checked against them. Pure torch, no TVM.

Conventions (the kernels in ``bitcompiler/kernels`` read exactly this):

* Bits are packed along the reduction axis into ``int32`` words, least
  significant bit first: bit ``j`` of word ``w`` holds element ``32*w + j``.
  The tail of the last word is zero.
* A quantized weight is ``W[n, k] = scale[n] * Q[n, k] + offset[n]`` with an
  integer *code* ``Q`` stored as ``B`` bit-planes ``planes[i]``:

  - ``code="pm1"`` (``B == 1``): ``Q = 2*b - 1`` in {-1, +1} (binary weights);
  - ``code="uint"``: ``Q = sum_i 2**i * b_i`` in ``0 .. 2**B - 1`` (affine weights).

* Activations entering a bit layer are one of:

  - ``"float"``: used as they are (weight-only layer);
  - ``"int8"``: per-sample symmetric int8, ``x = s * q`` with
    ``s = max(max|x|, EPS) / 127`` and ``q = clamp(round(x / s), -127, 127)``;
  - ``"binary"``: ``x = sign(x)`` in {-1, +1} with ``sign(0) = +1``.

* A bit layer computes the integer part ``acc = sum_k Q[n,k] * x_int[k]`` and
  ``sumx = sum_k x_int[k]`` (both exact), then the float epilogue
  ``y = (scale[n] * s) * acc + (offset[n] * s) * sumx + bias[n]`` in float32,
  or, with a threshold, ``y = +1 if thr_sign[n] * acc >= thr[n] else -1``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

WORD_BITS = 32
EPS = 1e-8
ACT_MODES = ("float", "int8", "binary")
CODES = ("pm1", "uint")


# --------------------------------------------------------------------------- bits
def num_words(k: int) -> int:
    """Number of 32-bit words that hold ``k`` bits."""
    return (k + WORD_BITS - 1) // WORD_BITS


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """Pack a {0,1} tensor along its last axis into int32 words (LSB first)."""
    k = bits.shape[-1]
    kw = num_words(k)
    padded = F.pad(bits.to(torch.int64), (0, kw * WORD_BITS - k))
    padded = padded.reshape(*bits.shape[:-1], kw, WORD_BITS)
    weights = torch.bitwise_left_shift(torch.ones((), dtype=torch.int64), torch.arange(WORD_BITS))
    words = (padded * weights).sum(-1)
    # reinterpret as signed int32: values >= 2**31 wrap around
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32)


def unpack_bits(words: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: int32 words -> {0,1} int64 tensor of length ``k``."""
    shifts = torch.arange(WORD_BITS, dtype=torch.int64)
    bits = (words.to(torch.int64).unsqueeze(-1) >> shifts) & 1
    return bits.reshape(*words.shape[:-1], -1)[..., :k]


def popcount(words: torch.Tensor) -> torch.Tensor:
    """Number of set bits per int32 word (int64), elementwise."""
    shifts = torch.arange(WORD_BITS, dtype=torch.int64)
    return ((words.to(torch.int64).unsqueeze(-1) >> shifts) & 1).sum(-1)


# --------------------------------------------------------------------------- codes
def code_to_planes(q: torch.Tensor, bits: int, code: str) -> torch.Tensor:
    """Integer codes ``Q[..., K]`` -> bit-planes ``(bits, ..., KW)`` int32."""
    _check_code(bits, code)
    if code == "pm1":
        if not bool(((q == 1) | (q == -1)).all()):
            raise ValueError("pm1 codes must be -1 or +1")
        return pack_bits((q > 0).to(torch.int64)).unsqueeze(0)
    q = q.to(torch.int64)
    if bool((q < 0).any()) or bool((q >= 2**bits).any()):
        raise ValueError(f"uint codes must lie in 0..{2**bits - 1}")
    return torch.stack([pack_bits((q >> i) & 1) for i in range(bits)])


def planes_to_code(planes: torch.Tensor, k: int, code: str) -> torch.Tensor:
    """Bit-planes ``(B, ..., KW)`` -> integer codes ``(..., K)`` int64."""
    _check_code(planes.shape[0], code)
    if code == "pm1":
        return 2 * unpack_bits(planes[0], k) - 1
    q = torch.zeros((), dtype=torch.int64)
    for i in range(planes.shape[0]):
        q = q + (unpack_bits(planes[i], k) << i)
    return q


def _check_code(bits: int, code: str) -> None:
    if code not in CODES:
        raise ValueError(f"unknown code {code!r}; valid codes: {', '.join(CODES)}")
    if code == "pm1" and bits != 1:
        raise ValueError("the pm1 code has exactly one bit-plane")
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be 1..8, got {bits}")


# --------------------------------------------------------------------------- weights
def sign(x: torch.Tensor) -> torch.Tensor:
    """Sign with ``sign(0) = +1``: the binarization every layer and kernel uses."""
    return torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))


def binary_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``W ≈ α_n · sign(W)`` with α_n = mean |W[n]| per output channel.

    Returns ``(Q, α)``: pm1 codes shaped like ``w`` and ``α`` of shape ``(N,)``.
    """
    alpha = w.detach().abs().reshape(w.shape[0], -1).mean(1)
    return sign(w.detach()).to(torch.int64), alpha


def affine_params(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """BitNet's per-layer translation α = min W and scale δ = (max W − min W)/(2^B − 1)."""
    lo = w.detach().min()
    hi = w.detach().max()
    delta = torch.clamp((hi - lo) / (2**bits - 1), min=EPS)
    return lo, delta


def affine_weight(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``W ≈ α + δ·Q`` with Q in 0..2^B−1 (METHODS.md §1). Returns ``(Q, α, δ)``."""
    alpha, delta = affine_params(w, bits)
    q = torch.clamp(torch.round((w.detach() - alpha) / delta), 0, 2**bits - 1).to(torch.int64)
    return q, alpha, delta


def dequantize(q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """Float weights ``scale[n] * Q + offset[n]`` (scale/offset broadcast over output channels)."""
    shape = (-1,) + (1,) * (q.dim() - 1)
    return scale.reshape(shape).float() * q.float() + offset.reshape(shape).float()


# --------------------------------------------------------------------------- activations
def quantize_act_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample symmetric int8: returns ``(q int8, s float32 of shape (batch,))``."""
    flat = x.float().reshape(x.shape[0], -1)
    amax = flat.abs().amax(1)
    s = torch.clamp(amax, min=EPS) / 127.0
    q = torch.clamp(torch.round(flat / s[:, None]), -127, 127)
    return q.to(torch.int8).reshape(x.shape), s


def quantize_act(x: torch.Tensor, act: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``x -> (x_int, s)`` with ``x ≈ s * x_int``; ``x_int`` is float64 holding exact values."""
    if act == "float":
        return x.double(), torch.ones(x.shape[0], dtype=torch.float32)
    if act == "int8":
        q, s = quantize_act_int8(x)
        return q.double(), s
    if act == "binary":
        return sign(x).double(), torch.ones(x.shape[0], dtype=torch.float32)
    raise ValueError(f"unknown activation mode {act!r}; valid: {', '.join(ACT_MODES)}")


def fake_quantize_act(x: torch.Tensor, act: str) -> torch.Tensor:
    """The float value of a quantized activation (what training sees)."""
    xi, s = quantize_act(x, act)
    return (xi.float() * s.reshape((-1,) + (1,) * (x.dim() - 1))).to(x.dtype)


# --------------------------------------------------------------------------- layers
def epilogue(
    acc: torch.Tensor,
    sumx: torch.Tensor,
    s: torch.Tensor,
    scale: torch.Tensor,
    offset: torch.Tensor,
    bias: torch.Tensor,
    channel_dim: int,
) -> torch.Tensor:
    """``(scale·s)·acc + (offset·s)·sumx + bias`` in float32, in exactly this order."""
    shape = [1] * acc.dim()
    shape[channel_dim] = -1
    sshape = [1] * acc.dim()
    sshape[0] = -1
    s = s.float().reshape(sshape)
    a = scale.float().reshape(shape) * s
    b = offset.float().reshape(shape) * s
    return a * acc.float() + b * sumx.float() + bias.float().reshape(shape)


def threshold(acc: torch.Tensor, thr_sign: torch.Tensor, thr: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """``+1 if thr_sign[n]·acc >= thr[n] else -1`` (float32)."""
    shape = [1] * acc.dim()
    shape[channel_dim] = -1
    hit = thr_sign.reshape(shape).double() * acc >= thr.reshape(shape).double()
    return torch.where(hit, 1.0, -1.0).float()


def integer_thresholds(scale: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewrite ``sign(scale·acc + bias)`` (sign(0)=+1) as ``thr_sign·acc >= thr`` on integer acc."""
    scale = scale.double()
    bias = bias.double()
    pos = torch.ceil(-bias / torch.where(scale == 0, 1.0, scale))
    neg = -torch.floor(-bias / torch.where(scale == 0, 1.0, scale))
    thr_sign = torch.where(scale > 0, 1, torch.where(scale < 0, -1, 0))
    const = torch.where(bias >= 0, 0.0, 1.0)  # 0 >= 0 is true, 0 >= 1 is false
    thr = torch.where(scale > 0, pos, torch.where(scale < 0, neg, const))
    thr = torch.clamp(thr, -(2**30), 2**30)
    return thr_sign.to(torch.int32), thr.to(torch.int32)


def linear_codes(
    x: torch.Tensor,
    q: torch.Tensor,
    act: str,
    scale: torch.Tensor,
    offset: torch.Tensor,
    bias: torch.Tensor,
    thr_sign: torch.Tensor | None = None,
    thr: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference dense bit layer on integer codes ``q (N, K)``: ``x (M, K)`` -> ``(M, N)`` float32."""
    xi, s = quantize_act(x, act)
    acc = xi @ q.double().t()
    if thr is not None:
        return threshold(acc, thr_sign, thr, channel_dim=1)
    sumx = xi.sum(1, keepdim=True)
    return epilogue(acc, sumx, s, scale, offset, bias, channel_dim=1)


def bit_linear(
    x: torch.Tensor,
    planes: torch.Tensor,
    k: int,
    code: str,
    act: str,
    scale: torch.Tensor,
    offset: torch.Tensor,
    bias: torch.Tensor,
    thr_sign: torch.Tensor | None = None,
    thr: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference dense bit layer on packed planes ``(B, N, KW)``: ``x (M, K)`` -> ``(M, N)`` float32."""
    return linear_codes(x, planes_to_code(planes, k, code), act, scale, offset, bias, thr_sign, thr)


def conv2d_codes(
    x: torch.Tensor,
    q: torch.Tensor,
    act: str,
    scale: torch.Tensor,
    offset: torch.Tensor,
    bias: torch.Tensor,
    stride: tuple[int, int] = (1, 1),
    padding: tuple[int, int] = (0, 0),
    dilation: tuple[int, int] = (1, 1),
    groups: int = 1,
    thr_sign: torch.Tensor | None = None,
    thr: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference conv bit layer on codes ``q (O, Cg, KH, KW)``; NCHW float32, zero padding."""
    q = q.double()
    xi, s = quantize_act(x, act)
    conv = {"stride": stride, "padding": padding, "dilation": dilation, "groups": groups}
    acc = F.conv2d(xi, q, **conv)
    if thr is not None:
        return threshold(acc, thr_sign, thr, channel_dim=1)
    sumx = F.conv2d(xi, torch.ones_like(q), **conv)
    return epilogue(acc, sumx, s, scale, offset, bias, channel_dim=1)


def conv_codes_to_planes(q: torch.Tensor, bits: int, code: str) -> torch.Tensor:
    """Conv codes ``(O, Cg, KH, KW)`` -> planes ``(B, O, KH, KW, CWg)`` packed over input channels."""
    return code_to_planes(q.permute(0, 2, 3, 1).contiguous(), bits, code)


def conv_planes_to_codes(planes: torch.Tensor, cg: int, code: str) -> torch.Tensor:
    """Inverse of :func:`conv_codes_to_planes`."""
    return planes_to_code(planes, cg, code).permute(0, 3, 1, 2).contiguous()


def bit_conv2d(
    x: torch.Tensor,
    planes: torch.Tensor,
    in_channels: int,
    kernel: tuple[int, int],
    code: str,
    act: str,
    scale: torch.Tensor,
    offset: torch.Tensor,
    bias: torch.Tensor,
    stride: tuple[int, int] = (1, 1),
    padding: tuple[int, int] = (0, 0),
    dilation: tuple[int, int] = (1, 1),
    groups: int = 1,
    thr_sign: torch.Tensor | None = None,
    thr: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference conv bit layer on packed planes ``(B, O, KH, KW, CWg)`` (``kernel`` is (KH, KW)).

    ``planes`` is packed over the ``in_channels // groups`` input channels of
    each output channel's group.
    """
    q = conv_planes_to_codes(planes, in_channels // groups, code)
    return conv2d_codes(x, q, act, scale, offset, bias, stride, padding, dilation, groups, thr_sign, thr)


# --------------------------------------------------------------------------- tiles (METHODS.md §4)
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
    """Training weights ``w = a_g · tanh(τ·z)`` (METHODS.md §3), exact gradients, shaped like θ."""
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


# --------------------------------------------------------------------------- accounting
def packed_weight_bytes(n_words: int, n_floats: int) -> int:
    """Bytes a packed layer stores: its int32 plane words (padded rows included) plus float32 scales."""
    return 4 * n_words + 4 * n_floats


def bits_per_weight(numel: int, n_bytes: int) -> float:
    """Stored bits per weight, scales included."""
    return 8 * n_bytes / numel if numel else math.nan


# --------------------------------------------------------------------------- BitNet bit updates (§1)
def quantization_error(w: torch.Tensor, bits: int) -> torch.Tensor:
    """``½‖W_q − W‖²`` at ``bits`` (METHODS.md §1); differentiable in ``W`` with ``W_q`` held constant."""
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
