"""Bits, codes, weights, activations and the layer references (see the package docstring)."""

from __future__ import annotations

import math
from typing import Any, cast

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
    """``W ≈ α + δ·Q`` with Q in 0..2^B−1 (docs/methods.md §1). Returns ``(Q, α, δ)``."""
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


def code_center(bits: int, code: str, act: str, has_offset: bool) -> int:
    """The zero point ``z`` a layer subtracts from its codes before they multiply activations:
    ``2**(bits-1)`` for ``uint`` codes of 5 to 8 bits with an offset under ``act="float"``, else 0.

    Such a layer computes ``acc = sum_k (Q[n,k] - z)·x[k]`` (``Q - z`` is a small signed integer,
    the top bit-plane read as ``-2**(bits-1)`` when clear) and the offset :func:`centered_offset`.
    Uncentered, ``scale·acc + offset·sumx`` cancels about ``2**(bits-1)``-fold (``offset`` is about
    ``-2**(bits-1)·scale`` for weights around 0), so a float32 sum in any order other than the
    reference's, amplified that much, missed it by 1e-5; centered, nothing cancels but what the
    dot product itself cancels, and every target may sum in float32 in its own order."""
    return 2 ** (bits - 1) if act == "float" and code == "uint" and bits >= 5 and has_offset else 0


def centered_offset(scale: torch.Tensor, offset: torch.Tensor, center: int) -> torch.Tensor:
    """``offset + center·scale`` in float32: the product is exact (``center`` is a power of two),
    so one rounding, the same with or without a fused multiply-add."""
    return offset.float() + scale.float() * float(center)


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
    center: int = 0,
) -> torch.Tensor:
    """Reference dense bit layer on integer codes ``q (N, K)``: ``x (M, K)`` -> ``(M, N)`` float32;
    ``center``: the layer's :func:`code_center`."""
    xi, s = quantize_act(x, act)
    acc = xi @ (q.double() - center).t()
    if thr is not None:
        return threshold(acc, cast(torch.Tensor, thr_sign), thr, channel_dim=1)
    sumx = xi.sum(1, keepdim=True)
    return epilogue(acc, sumx, s, scale, centered_offset(scale, offset, center), bias, channel_dim=1)


def bit_linear(
    x: torch.Tensor, planes: torch.Tensor, k: int, code: str, *layer: Any, **kw: Any
) -> torch.Tensor:
    """Reference dense bit layer on packed planes ``(B, N, KW)``: ``x (M, K)`` -> ``(M, N)`` float32.
    :func:`linear_codes` of the codes the planes hold; ``layer`` and ``kw`` are its arguments after
    ``q`` (``act, scale, offset, bias``, then ``thr_sign``, ``thr``; ``center`` from the planes)."""
    kw = {**kw, "center": _planes_center(planes, code, layer, kw)}
    return linear_codes(x, planes_to_code(planes, k, code), *layer, **kw)


def _planes_center(planes: torch.Tensor, code: str, layer: tuple, kw: dict) -> int:
    """:func:`code_center` of a packed layer; ``layer`` and ``kw`` give ``act, scale, offset, bias``
    by position or by name."""
    names = ("act", "scale", "offset", "bias")
    given = {**dict(zip(names, layer, strict=False)), **kw}
    return code_center(planes.shape[0], code, given["act"], bool((given["offset"] != 0).any()))


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
    center: int = 0,
) -> torch.Tensor:
    """Reference conv bit layer on codes ``q (O, Cg, KH, KW)``; NCHW float32, zero padding;
    ``center``: the layer's :func:`code_center`."""
    q = q.double()
    xi, s = quantize_act(x, act)
    conv: dict[str, Any] = {"stride": stride, "padding": padding, "dilation": dilation, "groups": groups}
    acc = F.conv2d(xi, q - center, **conv)
    if thr is not None:
        return threshold(acc, cast(torch.Tensor, thr_sign), thr, channel_dim=1)
    sumx = F.conv2d(xi, torch.ones_like(q), **conv)
    return epilogue(acc, sumx, s, scale, centered_offset(scale, offset, center), bias, channel_dim=1)


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
    *layer: Any,
    **kw: Any,
) -> torch.Tensor:
    """Reference conv bit layer on packed planes ``(B, O, KH, KW, CWg)`` (``kernel`` is (KH, KW)):
    :func:`conv2d_codes` of the codes the planes hold; ``layer`` and ``kw`` are its arguments
    after ``q`` (``act, scale, offset, bias``, then by name ``stride``, ``padding``, ``dilation``,
    ``groups``, ``thr_sign``, ``thr``).

    ``planes`` is packed over the ``in_channels // groups`` input channels of
    each output channel's group.
    """
    if len(layer) > 4:
        raise TypeError("bit_conv2d takes stride, padding, dilation, groups, thr_sign and thr by name")
    q = conv_planes_to_codes(planes, in_channels // kw.get("groups", 1), code)
    kw = {**kw, "center": _planes_center(planes, code, layer, kw)}
    return conv2d_codes(x, q, *layer, **kw)


# --------------------------------------------------------------------------- compact storage
# Planes pad every row (a conv: every tap of every filter) to whole 32-bit words: a depthwise 3x3
# filter spends a word per tap on one bit. A layer whose padding wastes more than COMPACT_SLACK is
# stored as one stream instead: the planes' bits in their own order (plane, row, tap, channel)
# with the padding left out. The CPU code expands the stream into the planes the kernels read on
# every call (each word is one funnel shift of two stream words: about a microsecond a layer).
COMPACT_SLACK = 1.05


def stores_compact(bits: int, rows: int, k: int, padded_words: int) -> bool:
    """Whether a layer of ``rows`` x ``k`` codes of ``bits`` planes is stored as a stream."""
    return padded_words > COMPACT_SLACK * stream_words(bits * rows * k)


def stream_words(n_bits: int) -> int:
    """Words of a stream holding ``n_bits`` bits."""
    return num_words(n_bits)


def planes_to_stream(planes: torch.Tensor, cg: int) -> torch.Tensor:
    """Planes ``(B, O, KH, KW, CWg)`` (or dense ``(B, N, KW)``) of ``cg`` codes per row -> stream words."""
    return pack_bits(unpack_bits(planes, cg).reshape(1, -1)).reshape(-1)


def stream_to_planes(stream: torch.Tensor, shape: tuple[int, ...], cg: int) -> torch.Tensor:
    """Inverse of :func:`planes_to_stream`: the planes of ``shape`` (last axis: words per row)."""
    rows = math.prod(shape[:-1])
    bits = unpack_bits(stream.reshape(1, -1), rows * cg).reshape(*shape[:-1], cg)
    return pack_bits(bits)


# --------------------------------------------------------------------------- accounting
def packed_weight_bytes(n_words: int, n_floats: int) -> int:
    """Bytes a packed layer stores: its int32 plane words (padded rows included) plus float32 scales."""
    return 4 * n_words + 4 * n_floats


def bits_per_weight(numel: int, n_bytes: int) -> float:
    """Stored bits per weight, scales included."""
    return 8 * n_bytes / numel if numel else math.nan
