"""Float ops between quantized layers, in one fixed order of operations.

Part of :mod:`bitcompiler.quant.numerics`; import from there. An int8 quantizer rounds
``x / s``: a float that differs in its last bit can land on the other side of a rounding
boundary, so every float that feeds a quantizer is computed here in an order every backend
repeats exactly (see docs/guide.md, "Exactness").
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def pool_out_size(size: int, k: int, s: int, p: int) -> int:
    """Output size of a window of ``k`` at stride ``s`` over ``size`` padded by ``p`` (floor mode)."""
    return (size + 2 * p - k) // s + 1


def conv_out_size(size: int, k: int, s: int, p: int, d: int) -> int:
    """Output size of a convolution with kernel ``k``, stride ``s``, padding ``p``, dilation ``d``."""
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def window_mean(
    x: torch.Tensor,
    kernel: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    count_include_pad: bool = True,
) -> torch.Tensor:
    """Average pooling over NCHW float32 in a fixed order: ``s = 0``, then ``s = s + x[tap]`` for the
    taps in row-major order (zero padding adds ``+0``), then one float32 division ``s / count``.

    ``count`` is ``kh·kw``, or with ``count_include_pad=False`` the taps inside the image. A global
    mean is the window of the whole image. PyTorch's own pooling sums in an order of its choosing.
    """
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    n, c, h, w = x.shape
    oh, ow = pool_out_size(h, kh, sh, ph), pool_out_size(w, kw, sw, pw)
    xp = F.pad(x.float(), (pw, pw, ph, ph))
    s = torch.zeros(n, c, oh, ow, dtype=torch.float32)
    for i in range(kh):
        for j in range(kw):
            s = s + xp[:, :, i : i + sh * (oh - 1) + 1 : sh, j : j + sw * (ow - 1) + 1 : sw]
    if count_include_pad or (ph == 0 and pw == 0):
        count = torch.full((1, 1, oh, ow), float(kh * kw))
    else:
        ones = F.pad(torch.ones(1, 1, h, w, dtype=torch.float64), (pw, pw, ph, ph))
        count = F.avg_pool2d(ones, (kh, kw), (sh, sw), divisor_override=1).float()  # exact small integers
    return s / count.expand_as(s)


# ----------------------------------------------------------------------------- sigmoid and tanh
# PyTorch (SLEEF) and TVM (libm or its own rules) approximate exp differently, so a sigmoid between
# int8 layers differed in the last bit. These are written once, over a small set of float32
# operations every backend has exactly (+ - * / on float32, floor, min/max, abs, a select, and
# 2**n built from its exponent bits), and each backend evaluates this same formulation: PyTorch
# through :class:`TorchFloat32`, the TVM kernels through their own implementation of the methods.
# The formulas are Cephes' expf and tanhf (about 1 ulp; within 2e-7 relative of PyTorch's).
EXP_HI, EXP_LO = 88.0, -87.0  # 2**n stays a normal float32: n in [-126, 127]
EXP_C = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1)
TANH_C = (-5.70498872745e-3, 2.06390887954e-2, -5.37397155531e-2, 1.33314422036e-1, -3.33332819422e-1)
TANH_SMALL = 0.625  # below: the odd polynomial; above: 1 - 2 / (exp(2|x|) + 1)


def f32(v: float) -> float:
    """``v`` rounded to the nearest float32 (every constant of the formulas is one)."""
    return float(torch.tensor(v, dtype=torch.float32))


class TorchFloat32:
    """The operations of :func:`exp32`, :func:`sigmoid32` and :func:`tanh32` on float32 tensors."""

    def const(self, v: float) -> torch.Tensor:
        return torch.tensor(f32(v), dtype=torch.float32)

    def floor(self, x: torch.Tensor) -> torch.Tensor:
        return torch.floor(x)

    def abs(self, x: torch.Tensor) -> torch.Tensor:
        return torch.abs(x)

    def clamp(self, x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
        return torch.minimum(torch.maximum(x, self.const(lo)), self.const(hi))

    def select_gt(self, a: torch.Tensor, t: float, yes: torch.Tensor, no: torch.Tensor) -> torch.Tensor:
        """``yes`` where ``a > t``, else ``no``."""
        return torch.where(a > self.const(t), yes, no)

    def pow2(self, n: torch.Tensor) -> torch.Tensor:
        """``2**n`` for integer-valued float32 ``n`` in [-126, 127], from its exponent bits."""
        return ((n.to(torch.int32) + 127) << 23).view(torch.float32)


def _horner(m: Any, coeffs: tuple[float, ...], x: Any) -> Any:
    p = m.const(coeffs[0])
    for c in coeffs[1:]:
        p = p * x + m.const(c)
    return p


def exp32(x: Any, m: Any) -> Any:
    """``exp(x)`` in float32 (Cephes expf): ``x = n·ln2 + r``, ``|r| <= ln2/2``, a degree-7 polynomial
    in ``r`` times ``2**n``; ``x`` clamped to [-87, 88] (beyond: 1.6e-38 and 1.65e38)."""
    x = m.clamp(x, EXP_LO, EXP_HI)
    n = m.floor(x * m.const(1.44269504088896341) + m.const(0.5))
    r = x - n * m.const(0.693359375)
    r = r - n * m.const(-2.12194440e-4)
    return (_horner(m, EXP_C, r) * (r * r) + r + m.const(1.0)) * m.pow2(n)


def sigmoid32(x: Any, m: Any) -> Any:
    """``1 / (1 + exp(-x))`` with :func:`exp32`."""
    return m.const(1.0) / (m.const(1.0) + exp32(m.const(0.0) - x, m))


def tanh32(x: Any, m: Any) -> Any:
    """``tanh(x)`` (Cephes tanhf): ``x + x·z·P(z)``, ``z = x²``, for ``|x| <= 0.625``; else
    ``±(1 - 2 / (exp(2|x|) + 1))``."""
    a = m.abs(x)
    big = m.const(1.0) - m.const(2.0) / (exp32(a + a, m) + m.const(1.0))
    z = x * x
    small = _horner(m, TANH_C, z) * z * x + x
    return m.select_gt(a, TANH_SMALL, m.select_gt(x, 0.0, big, m.const(0.0) - big), small)


# PyTorch's float32 GELU is -0.0 (sign +1) below about -5.54: erf(x/sqrt(2)) rounds to -1 there
GELU_ZERO_BELOW = -5.54


def gelu_sign32(x: Any, m: Any) -> Any:
    """The +-1 a binary activation (``sign``, ``sign(0) = +1``) makes of float32 ``gelu(x)``.

    ``gelu(x) = x * Phi(x)`` is negative for every ``x < 0`` in exact arithmetic, but PyTorch's
    float32 GELU computes ``erf(x / sqrt(2))`` as exactly -1 below about -5.54 and returns -0.0,
    which binarizes to +1. The rule here: +1 for ``x >= 0`` and for ``x <= GELU_ZERO_BELOW``, else
    -1. It equals ``sign(F.gelu(x))`` everywhere outside [-5.543, -5.486]; inside that band
    PyTorch's own result depends on the rounding of its erf (some inputs give -0.0, others a tiny
    negative number, and a lone element and a vector of them can differ)."""
    one, minus_one = m.const(1.0), m.const(-1.0)
    negative = m.select_gt(x, GELU_ZERO_BELOW, minus_one, one)
    return m.select_gt(m.const(0.0) - x, 0.0, negative, one)


EXACT_UNARY = {"sigmoid": sigmoid32, "tanh": tanh32, "gelu_sign": gelu_sign32}


def exact_unary(x: torch.Tensor, fn: str) -> torch.Tensor:
    """``fn`` (``"sigmoid"``, ``"tanh"`` or ``"gelu_sign"``) of float32 ``x`` in the fixed
    formulation above."""
    return EXACT_UNARY[fn](x.float(), TorchFloat32())
