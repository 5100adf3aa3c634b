"""Bit-wise training (docs/methods.md §2): every bit of every weight is its own real parameter.

A layer has n magnitude bits and a sign per weight; bit i is ``1[m_i > 0]`` of a real tensor m_i,
the weight ``α · (1 − 2·s) · Σ 2^i·bit_i`` with α fixed at init (He std for random bits), and each
bit gets its gradient straight through (∂bit/∂m = 1). ``train=`` picks the bits that learn; the
others are *buffers*, so no optimizer (Adam, weight decay) can move them and they can hold any
payload (:mod:`bitcompiler.payload`). Codes for the compiler: sign-magnitude as offset binary on
n + 1 uint planes, exact.

    >>> import torch, bitcompiler as bc
    >>> net = bc.prepare(torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2)),
    ...                  scheme="bitwise:bits=4,train=top2,first_last=quantize")
    >>> [name for name, _ in net[0].wq.named_parameters()]   # sign + the top 2 of 4 bits learn
    ['m2', 'm3', 'sign']
    >>> 0.0 <= sparsity(net) <= 1.0
    True
"""

from __future__ import annotations

import math
from typing import cast

import torch
from torch import nn

from bitcompiler.quant import numerics
from bitcompiler.quant.modules import WeightCodes, register_weight_quantizer, straight_through
from bitcompiler.quant.schemes import bitwise_trained

# magnitude of the real value behind a bit at init (Adam moves it ~lr per step, so a bit can flip early)
INIT_MAGNITUDE = 1e-2


class BitwiseWeight(nn.Module):
    """Weight quantizer of the ``bitwise`` scheme. It owns the weights: the layer's float weight is unused.

    Bit tensors are ``m0 .. m{n-1}`` (least significant first) and ``sign``: parameters if trained,
    buffers if frozen. A bit is set when its real value is > 0.
    """

    def __init__(self, n: int = 6, train: str = "all") -> None:
        super().__init__()
        if not 1 <= n <= 7:
            raise ValueError(f"bitwise needs 1..7 magnitude bits (n + 1 <= 8 planes), got {n}")
        self.n, self.train_spec = n, train
        self.trained, self.sign_trained = bitwise_trained(train, n)
        self.alpha = math.nan
        self.shape: tuple[int, ...] | None = None

    def bind(self, weight: torch.Tensor) -> None:
        """Create the bits for a weight of this shape: random (fair coins), α from the fan-in."""
        self.shape = tuple(weight.shape)
        self.alpha = numerics.bitwise_alpha(weight[0].numel(), self.n)
        for name, trained in [
            *((f"m{i}", i in self.trained) for i in range(self.n)),
            ("sign", self.sign_trained),
        ]:
            value = (torch.randint(0, 2, self.shape) * 2 - 1).float() * INIT_MAGNITUDE
            if trained:
                self.register_parameter(name, nn.Parameter(value))
            else:
                self.register_buffer(name, value)
        weight.requires_grad_(False)  # the bits are the weights now

    def _tensor(self, name: str) -> torch.Tensor:
        if self.shape is None:
            raise RuntimeError(
                "this BitwiseWeight has no bits yet; bitcompiler.prepare() binds it to a layer"
            )
        return getattr(self, name)

    def bit_names(self) -> list[str]:
        return [f"m{i}" for i in range(self.n)] + ["sign"]

    def frozen_names(self) -> list[str]:
        """Frozen bit tensors, most significant first, sign last: the payload order."""
        names = [f"m{i}" for i in reversed(range(self.n)) if i not in self.trained]
        return names + ([] if self.sign_trained else ["sign"])

    def _bit(self, name: str) -> torch.Tensor:
        m = self._tensor(name)
        return straight_through(m, (m > 0).to(m.dtype))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        bits = [self._bit(f"m{i}") for i in range(self.n)]
        return numerics.bitwise_weight(bits, self._bit("sign"), self.alpha).to(w.dtype)

    def magnitude(self) -> torch.Tensor:
        """Integer magnitudes ``Σ 2^i·bit_i`` (int64)."""
        return cast(
            torch.Tensor,
            sum((self._tensor(f"m{i}").detach() > 0).to(torch.int64) << i for i in range(self.n)),
        )

    def codes(self, w: torch.Tensor) -> WeightCodes:
        sign_bit = self._tensor("sign").detach() > 0
        q, scale, offset = numerics.bitwise_codes(self.magnitude(), sign_bit, self.n, self.alpha)
        return WeightCodes(q, "uint", self.n + 1, scale, offset, n_floats=1)

    @property
    def bits(self) -> int:
        return self.n + 1

    @property
    def sparsity(self) -> float:
        """Fraction of weights that are exactly zero (all magnitude bits 0)."""
        return numerics.zero_fraction(self.magnitude())

    def frozen_fraction(self) -> float:
        """Fraction of this layer's n + 1 bits per weight that are frozen."""
        return len(self.frozen_names()) / (self.n + 1)

    def extra_repr(self) -> str:
        return f"bits={self.n}+sign, train={self.train_spec}, alpha={self.alpha:.4g}"


def quantizers(model: nn.Module) -> list[BitwiseWeight]:
    """The ``bitwise`` quantizers of ``model`` in module order (the payload order)."""
    return [m for m in model.modules() if isinstance(m, BitwiseWeight)]


def sparsity(model: nn.Module) -> float:
    """Fraction of exact zero weights over all ``bitwise`` layers (weighted by size)."""
    qs = quantizers(model)
    total = sum(q.magnitude().numel() for q in qs)
    zeros = sum(q.sparsity * q.magnitude().numel() for q in qs)
    return zeros / total if total else 0.0


def frozen_fraction(model: nn.Module) -> float:
    """Fraction of all ``bitwise`` bits (n + 1 per weight) that are frozen."""
    qs = quantizers(model)
    total = sum((q.n + 1) * math.prod(q.shape or ()) for q in qs)
    frozen = sum(len(q.frozen_names()) * math.prod(q.shape or ()) for q in qs)
    return frozen / total if total else 0.0


@register_weight_quantizer("bitwise")
def from_scheme(scheme) -> BitwiseWeight:
    return BitwiseWeight(int(scheme.get("bits")), scheme.get("train"))
