"""Trainable quantizer modules (straight-through estimators).

``prepare()`` and the ``insert_quantizers`` pass put these into a model; they
train in any plain PyTorch loop and ``fold_scales`` turns them into integer
bit layers. Every number comes from :mod:`bitcompiler.quant.numerics`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from bitcompiler.quant import numerics
from bitcompiler.quant.schemes import Scheme


@dataclass(frozen=True)
class WeightCodes:
    """A layer's weights as integer codes plus per-channel affine (``W = scale·Q + offset``)."""

    q: torch.Tensor  # int64, shaped like the weight
    code: str
    bits: int
    scale: torch.Tensor  # (N,)
    offset: torch.Tensor  # (N,)
    n_floats: int  # float32 scalars the scheme really stores (per-layer vs per-channel)
    tiles: int = 1  # > 1: q is one pm1 tile repeated this many times (tiled scheme, docs/methods.md §4)


class _STE(torch.autograd.Function):
    """Forward the quantized value, pass the gradient straight through."""

    @staticmethod
    def forward(ctx, x, q):  # type: ignore[override]
        return q

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return grad, None


def straight_through(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return _STE.apply(x, q.to(x.dtype))


class BinaryWeight(nn.Module):
    """±α per output channel, α = mean |W| (XNOR-Net style), straight-through sign."""

    bits = 1

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        c = self.codes(w)
        return straight_through(w, numerics.dequantize(c.q, c.scale, c.offset))

    def codes(self, w: torch.Tensor) -> WeightCodes:
        q, alpha = numerics.binary_weight(w)
        return WeightCodes(q, "pm1", 1, alpha, torch.zeros_like(alpha), n_floats=w.shape[0])


def affine_codes(w: torch.Tensor, bits: int) -> WeightCodes:
    """``w``'s ``bits``-bit unsigned codes with one scale and offset for all rows
    (``numerics.affine_weight``), as every row's."""
    q, alpha, delta = numerics.affine_weight(w, bits)
    n = w.shape[0]
    return WeightCodes(q, "uint", bits, delta.expand(n).clone(), alpha.expand(n).clone(), n_floats=2)


class AffineWeight(nn.Module):
    """BitNet's per-layer affine ``W ≈ α + δ·Q`` with B-bit Q (docs/methods.md §1), straight-through round."""

    def __init__(self, bits: int) -> None:
        super().__init__()
        self.bits = bits

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        c = self.codes(w)
        return straight_through(w, numerics.dequantize(c.q, c.scale, c.offset))

    def codes(self, w: torch.Tensor) -> WeightCodes:
        return affine_codes(w, self.bits)

    def extra_repr(self) -> str:
        return f"bits={self.bits}"


class ActQuant(nn.Module):
    """Activation quantizer: float (identity), int8 or binary sign with a clipped straight-through gradient."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        if mode not in numerics.ACT_MODES:
            raise ValueError(f"unknown activation mode {mode!r}; valid: {', '.join(numerics.ACT_MODES)}")
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "float":
            return x
        q = numerics.fake_quantize_act(x.detach(), self.mode)
        if self.mode == "binary":  # gradient only where |x| <= 1 (hardtanh STE)
            return straight_through(torch.clamp(x, -1, 1), q)
        return straight_through(x, q)

    def extra_repr(self) -> str:
        return self.mode


class _QuantLayer(nn.Module):
    """Shared state of a quantized layer: float weights + weight/activation quantizers + a post affine."""

    weight: nn.Parameter
    bias: nn.Parameter | None
    wq: Any  # a weight quantizer module (duck-typed: codes, and optionally regularization/step/bits/bind)
    aq: ActQuant
    post_scale: torch.Tensor | None
    post_shift: torch.Tensor | None

    def _init_quant(self, wq: nn.Module, act: str, label: str) -> None:
        self.wq = wq
        self.aq = ActQuant(act)
        self.label = label
        # BatchNorm folded in by fold_batchnorm: y = post_scale * layer(x) + post_shift
        self.register_buffer("post_scale", None)
        self.register_buffer("post_shift", None)

    def set_post_affine(self, scale: torch.Tensor, shift: torch.Tensor) -> None:
        if self.post_scale is None:
            self.register_buffer("post_scale", scale.detach().clone())
            self.register_buffer("post_shift", shift.detach().clone())
        else:
            self.post_shift = scale * cast(torch.Tensor, self.post_shift) + shift
            self.post_scale = scale * self.post_scale

    def codes(self) -> WeightCodes:
        return self.wq.codes(self.weight)

    @property
    def act(self) -> str:
        return self.aq.mode

    def _post(self, y: torch.Tensor) -> torch.Tensor:
        if self.post_scale is None:
            return y
        shape = (1, -1) + (1,) * (y.dim() - 2)
        return y * self.post_scale.reshape(shape) + cast(torch.Tensor, self.post_shift).reshape(shape)


class QuantLinear(_QuantLayer):
    """``nn.Linear`` with quantized weights and activations (trainable)."""

    def __init__(self, linear: nn.Linear, wq: nn.Module, act: str, label: str) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = nn.Parameter(linear.weight.detach().clone())
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone())
        self._init_quant(wq, act, label)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._post(F.linear(self.aq(x), self.wq(self.weight), self.bias))


class ConvGeometry:
    """A conv layer's channels and window, named as ``nn.Conv2d`` names them."""

    in_channels: int
    out_channels: int
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int

    def copy_geometry(self, conv: Any) -> None:
        """Take ``conv``'s channels and window (an ``nn.Conv2d``, or another ConvGeometry)."""
        for name in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups"):
            value = getattr(conv, name)
            setattr(self, name, tuple(value) if isinstance(value, tuple) else value)


class QuantConv2d(ConvGeometry, _QuantLayer):
    """``nn.Conv2d`` (zero padding) with quantized weights and activations (trainable)."""

    def __init__(self, conv: nn.Conv2d, wq: nn.Module, act: str, label: str) -> None:
        super().__init__()
        self.copy_geometry(conv)
        self.weight = nn.Parameter(conv.weight.detach().clone())
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone())
        self._init_quant(wq, act, label)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.conv2d(
            self.aq(x), self.wq(self.weight), self.bias, self.stride, self.padding, self.dilation, self.groups
        )
        return self._post(y)


QUANT_LAYERS = (QuantLinear, QuantConv2d)

# the weight quantizer of each method scheme, by scheme name: each module of bitcompiler.methods
# registers its own (imported with bitcompiler), so quant/ never imports methods/
WEIGHT_QUANTIZERS: dict[str, Callable[[Scheme], nn.Module]] = {}


def register_weight_quantizer(name: str) -> Callable[[Callable[[Scheme], Any]], Callable[[Scheme], Any]]:
    """Decorator: ``fn(scheme) -> quantizer module`` makes the weight quantizer of scheme ``name``."""

    def wrap(fn: Callable[[Scheme], Any]) -> Callable[[Scheme], Any]:
        WEIGHT_QUANTIZERS[name] = fn
        return fn

    return wrap


def bit_depth_for(scheme: Scheme, first_or_last: bool) -> tuple[nn.Module, str, str]:
    """The weight quantizer, activation mode and label a layer gets under ``scheme``."""
    if first_or_last and scheme.keep_first_last:
        act = "float" if scheme.act == "float" else "int8"
        return AffineWeight(8), act, f"uniform:bits=8,act={'float' if act == 'float' else '8'}"
    if scheme.name == "binary":
        return BinaryWeight(), scheme.act, str(scheme)
    if scheme.name == "uniform":
        return AffineWeight(scheme.bits), scheme.act, str(scheme)
    if scheme.name in WEIGHT_QUANTIZERS:
        return WEIGHT_QUANTIZERS[scheme.name](scheme), scheme.act, str(scheme)
    raise ValueError(f"scheme {scheme} does not quantize layers")


def quantize_layer(module: nn.Module, scheme: Scheme, first_or_last: bool) -> nn.Module:
    """A ``QuantLinear``/``QuantConv2d`` replacing a float ``Linear``/``Conv2d``."""
    wq, act, label = bit_depth_for(scheme, first_or_last)
    layer = (
        QuantLinear(module, wq, act, label)
        if isinstance(module, nn.Linear)
        else QuantConv2d(cast(nn.Conv2d, module), wq, act, label)
    )
    if hasattr(wq, "bind"):  # quantizers that own per-weight state (bitwise) size it from the layer
        cast(Any, wq).bind(layer.weight)
    return layer


def quantizable(module: nn.Module) -> str | None:
    """None if bitcompiler has a bit lowering for this module, else the reason it stays float."""
    if isinstance(module, nn.Linear):
        return None
    if isinstance(module, nn.Conv2d):
        if module.padding_mode != "zeros":
            return f"padding_mode={module.padding_mode!r} (only zero padding has a bit lowering)"
        if isinstance(module.padding, str):
            return f"padding={module.padding!r} (give explicit integer padding)"
        return None
    return f"{type(module).__name__} has no bit lowering"
