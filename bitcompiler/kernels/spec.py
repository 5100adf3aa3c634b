"""Static descriptions of the bit kernels: everything but the batch is fixed at compile time."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from bitcompiler.quant.numerics import ACT_MODES, CODES, WORD_BITS, code_center, conv_out_size, num_words


def _check_common(bits: int, code: str, act: str, has_offset: bool, threshold: bool) -> None:
    if code not in CODES:
        raise ValueError(f"unknown code {code!r}; valid codes: {', '.join(CODES)}")
    if not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an int in 1..8, got {bits!r}")
    if code == "pm1" and bits != 1:
        raise ValueError(f"the pm1 code has exactly one bit-plane, got bits={bits}")
    if code == "pm1" and has_offset:
        raise ValueError("pm1 codes carry no offset (has_offset must be False)")
    if act not in ACT_MODES:
        raise ValueError(f"unknown activation mode {act!r}; valid: {', '.join(ACT_MODES)}")
    if threshold and act == "float":
        raise ValueError(
            "threshold needs an integer accumulator: act must be 'binary' or 'int8', not 'float'"
        )


def centered_offset_expr(spec: Any, of: Any, sc: Any) -> Any:
    """A kernel's offset for ``spec``: ``of`` itself, or ``of + center·sc`` (TIR float32 expressions;
    the product is exact, as ``numerics.centered_offset`` computes it)."""
    if not spec.center:
        return of
    from tvm import tirx

    return of + sc * tirx.const(float(spec.center), "float32")


def _pair(name: str, v: tuple, lo: int) -> tuple[int, int]:
    if not (isinstance(v, tuple) and len(v) == 2 and all(isinstance(e, int) for e in v)):
        raise ValueError(f"{name} must be a pair of ints, got {v!r}")
    if min(v) < lo:
        raise ValueError(f"{name} must be >= {lo}, got {v!r}")
    return v


@dataclass(frozen=True)
class Coding:
    """How a bit layer's weights are coded and its output computed: ``bits`` planes of ``code``,
    activation mode ``act``, an offset term or not, the integer threshold epilogue or not. Every
    spec ends with these fields: ``class XSpec(Coding, XShape)`` lists ``XShape``'s fields first
    (a dataclass collects its bases' fields from the last base to the first)."""

    bits: int
    code: str
    act: str
    has_offset: bool
    threshold: bool

    POSITIVE: ClassVar[tuple[str, ...]] = ()  # the shape's fields that must be positive ints

    def __post_init__(self) -> None:
        for name in self.POSITIVE:
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self.check_shape()
        _check_common(self.bits, self.code, self.act, self.has_offset, self.threshold)

    @property
    def center(self) -> int:
        """The zero point subtracted from the codes (``numerics.code_center``): the kernels multiply
        ``Q - center`` (a small signed integer) by the activations and use the offset
        ``OF + center·SC`` (:func:`centered_offset_expr`)."""
        return code_center(self.bits, self.code, self.act, self.has_offset)

    def check_shape(self) -> None:
        """Raise ValueError for a shape the kernels cannot compute (its ints are already positive)."""


@dataclass(frozen=True)
class _DenseShape:
    in_features: int
    out_features: int


@dataclass(frozen=True)
class DenseSpec(Coding, _DenseShape):
    """``Y (M, N) = bit_linear(X (M, K))`` with ``K = in_features`` and ``N = out_features``."""

    POSITIVE: ClassVar[tuple[str, ...]] = ("in_features", "out_features")

    @classmethod
    def from_attrs(cls, attrs: Any, out_features: int, bits: int) -> DenseSpec:
        """The spec of a ``bitc::bit_linear`` call (``attrs``: its ``ops.BitLinearAttrs``)."""
        return cls(
            attrs.k, out_features, bits, attrs.code, attrs.act, bool(attrs.has_offset), bool(attrs.threshold)
        )

    @property
    def words(self) -> int:
        """KW: int32 words per packed row of K bits."""
        return num_words(self.in_features)

    kw = words

    @property
    def full_words(self) -> int:
        """Words whose 32 bits are all valid (K // 32)."""
        return self.in_features // WORD_BITS

    @property
    def tail_bits(self) -> int:
        """Valid bits in the last, partial word (K % 32; 0 when K is a multiple of 32)."""
        return self.in_features % WORD_BITS


@dataclass(frozen=True)
class _ConvShape:
    in_channels: int
    out_channels: int
    in_h: int
    in_w: int
    kernel: tuple
    stride: tuple
    padding: tuple
    dilation: tuple
    groups: int


@dataclass(frozen=True)
class ConvSpec(Coding, _ConvShape):
    """NCHW 2-D convolution bit layer; ``kernel``, ``stride``, ``padding``, ``dilation`` are (h, w) pairs."""

    POSITIVE: ClassVar[tuple[str, ...]] = ("in_channels", "out_channels", "in_h", "in_w", "groups")

    def check_shape(self) -> None:
        _pair("kernel", self.kernel, 1)
        _pair("stride", self.stride, 1)
        _pair("padding", self.padding, 0)
        _pair("dilation", self.dilation, 1)
        if self.in_channels % self.groups or self.out_channels % self.groups:
            raise ValueError(
                f"groups={self.groups} must divide in_channels={self.in_channels} "
                f"and out_channels={self.out_channels}"
            )
        if self.out_h < 1 or self.out_w < 1:
            raise ValueError(
                f"empty output {self.out_h}x{self.out_w}: input {self.in_h}x{self.in_w} is too small "
                f"for kernel {self.kernel}, dilation {self.dilation}, padding {self.padding}"
            )

    @classmethod
    def from_attrs(cls, attrs: Any, out_channels: int, in_h: int, in_w: int, bits: int) -> ConvSpec:
        """The spec of a ``bitc::bit_conv2d`` call (``attrs``: its ``ops.BitConv2dAttrs``)."""
        return cls(
            attrs.in_channels, out_channels, in_h, in_w, tuple(attrs.kernel), tuple(attrs.stride),
            tuple(attrs.padding), tuple(attrs.dilation), attrs.groups, bits, attrs.code, attrs.act,
            bool(attrs.has_offset), bool(attrs.threshold),
        )  # fmt: skip

    @property
    def cg(self) -> int:
        """Input channels per group."""
        return self.in_channels // self.groups

    @property
    def og(self) -> int:
        """Output channels per group."""
        return self.out_channels // self.groups

    @property
    def words_per_group(self) -> int:
        """CWg: int32 words holding one group's ``cg`` channel bits."""
        return num_words(self.cg)

    @property
    def kw_words(self) -> int:
        """Packed words per output channel (KH * KW * CWg), the reduction length in words."""
        return self.kernel[0] * self.kernel[1] * self.words_per_group

    @property
    def reduction(self) -> int:
        """Taps per output value (cg * KH * KW), padding positions included."""
        return self.cg * self.kernel[0] * self.kernel[1]

    def _out(self, axis: int, size: int) -> int:
        k, s, p, d = self.kernel[axis], self.stride[axis], self.padding[axis], self.dilation[axis]
        return conv_out_size(size, k, s, p, d)

    @property
    def out_h(self) -> int:
        return self._out(0, self.in_h)

    @property
    def out_w(self) -> int:
        return self._out(1, self.in_w)
