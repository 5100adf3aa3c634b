"""Inference bit layers: integer codes (after ``fold_scales``) or packed planes (after ``pack_weights``).

``W = scale[n]·Q + offset[n]``; the layer computes
``y = (scale·s)·(Q x_int) + (offset·s)·Σx_int + bias`` or, with integer
thresholds, ``±1``. Runnable in PyTorch through the reference numerics.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import nn

from bitcompiler import ops
from bitcompiler.quant import numerics
from bitcompiler.quant.modules import ConvGeometry, QuantConv2d, QuantLinear, WeightCodes


class _BitLayer(nn.Module):
    """Shared state: codes or planes, per-channel affine, bias, optional thresholds."""

    op = ""
    codes: torch.Tensor | None
    planes: torch.Tensor | None
    scale: torch.Tensor
    offset: torch.Tensor
    bias: torch.Tensor
    thr_sign: torch.Tensor
    thr: torch.Tensor

    def _init_bits(self, c: WeightCodes, bias: torch.Tensor | None, act: str, label: str) -> None:
        n = c.scale.shape[0]
        self.code, self.bits, self.act, self.label = c.code, c.bits, act, label
        self.n_floats = c.n_floats
        self.tiles = c.tiles  # > 1: codes are one tile repeated (tile_weights stores just the tile)
        self.register_buffer("codes", c.q.to(torch.int16))
        self.register_buffer("planes", None)
        self.register_buffer("scale", c.scale.detach().float().clone())
        self.register_buffer("offset", c.offset.detach().float().clone())
        b = torch.zeros(n) if bias is None else bias.detach().float().clone()
        self.register_buffer("bias", b)
        self.register_buffer("thr_sign", torch.zeros(n, dtype=torch.int32))
        self.register_buffer("thr", torch.zeros(n, dtype=torch.int32))
        self.threshold = False

    @property
    def packed(self) -> bool:
        return self.planes is not None

    def op_tensors(self) -> dict[str, torch.Tensor]:
        """The op's tensor arguments by name (``BitLinearAttrs.TENSORS``), once packed."""
        return {t: getattr(self, t) for t in ops.BitLinearAttrs.TENSORS}

    @property
    def has_offset(self) -> bool:
        return bool((self.offset != 0).any())

    @property
    def center(self) -> int:
        """The zero point subtracted from the codes (``numerics.code_center``)."""
        return numerics.code_center(self.bits, self.code, self.act, self.has_offset)

    def merge_affine(self, scale: torch.Tensor, shift: torch.Tensor) -> None:
        """Fold a following per-channel ``y -> scale·y + shift`` into the epilogue."""
        if self.threshold:
            raise ValueError("cannot merge an affine after an integer threshold")
        self.scale = self.scale * scale
        self.offset = self.offset * scale
        self.bias = self.bias * scale + shift

    def set_thresholds(self) -> None:
        """Replace the float epilogue followed by sign() with integer thresholds on acc."""
        if self.act != "binary" or self.has_offset:
            raise ValueError("integer thresholds need binary activations and no offset")
        self.thr_sign, self.thr = numerics.integer_thresholds(self.scale, self.bias)
        self.threshold = True

    def extra_repr(self) -> str:
        state = "packed" if self.packed else "codes"
        return f"{self.label}, code={self.code}, bits={self.bits}, act={self.act}, {state}" + (
            ", threshold" if self.threshold else ""
        )


class BitLinear(_BitLayer):
    op = "linear"

    def __init__(
        self, in_features: int, c: WeightCodes, bias: torch.Tensor | None, act: str, label: str
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, c.q.shape[0]
        self._init_bits(c, bias, act, label)

    def pack(self) -> None:
        self.planes = numerics.code_to_planes(cast(torch.Tensor, self.codes).long(), self.bits, self.code)
        self.codes = None

    def attrs(self) -> ops.BitLinearAttrs:
        """The ``bitc::bit_linear`` attributes of this layer."""
        return ops.BitLinearAttrs(self.in_features, self.code, self.act, self.threshold, self.has_offset)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed:
            return self.attrs().call(x, self.op_tensors())
        thr = (self.thr_sign, self.thr) if self.threshold else (None, None)
        lead = x.shape[:-1]
        y = numerics.linear_codes(
            x.reshape(-1, self.in_features),
            cast(torch.Tensor, self.codes),
            self.act,
            self.scale,
            self.offset,
            self.bias,
            thr_sign=thr[0],
            thr=thr[1],
            center=self.center,
        )
        return y.reshape(*lead, self.out_features)


class BitConv2d(ConvGeometry, _BitLayer):
    op = "conv2d"

    def __init__(self, conv: QuantConv2d, c: WeightCodes, label: str) -> None:
        super().__init__()
        self.copy_geometry(conv)
        self._init_bits(c, conv.bias, conv.act, label)

    def pack(self) -> None:
        self.planes = numerics.conv_codes_to_planes(
            cast(torch.Tensor, self.codes).long(), self.bits, self.code
        )
        self.codes = None

    def attrs(self) -> ops.BitConv2dAttrs:
        """The ``bitc::bit_conv2d`` attributes of this layer."""
        return ops.BitConv2dAttrs(
            self.in_channels, self.kernel_size, self.stride, self.padding, self.dilation, self.groups,
            self.code, self.act, self.threshold, self.has_offset,
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed:
            return self.attrs().call(x, self.op_tensors())
        thr = (self.thr_sign, self.thr) if self.threshold else (None, None)
        return numerics.conv2d_codes(
            x,
            cast(torch.Tensor, self.codes),
            self.act,
            self.scale,
            self.offset,
            self.bias,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
            thr_sign=thr[0],
            thr=thr[1],
            center=self.center,
        )


BIT_LAYERS = (BitLinear, BitConv2d)


def to_bit_layer(layer: QuantLinear | QuantConv2d) -> BitLinear | BitConv2d:
    """Integer form of a trained quantized layer; its post affine (folded BatchNorm) goes into the epilogue."""
    c = layer.codes()
    if isinstance(layer, QuantLinear):
        bit: BitLinear | BitConv2d = BitLinear(layer.in_features, c, layer.bias, layer.act, layer.label)
    else:
        bit = BitConv2d(layer, c, layer.label)
    if layer.post_scale is not None:
        bit.merge_affine(layer.post_scale, cast(torch.Tensor, layer.post_shift))
    return bit
