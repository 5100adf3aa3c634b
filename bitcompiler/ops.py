"""The ``bitc`` custom ops and their schemas.

Their CPU implementation *is* the reference numerics; ``torch.export`` keeps them as single
nodes, and each backend lowers them (``bitcompiler.backends.lower`` to TIR bit kernels,
``bitcompiler.backends.cortex_m.aot`` to C). Every op's non-tensor arguments are one frozen
attributes dataclass defined beside its registration (:class:`BitLinearAttrs`, ...); whoever
builds or reads a call (the layers, ``lower_bit_ops``, the lowerings, the report) goes through
it and :func:`bind`, by argument name::

    >>> import torch
    >>> a = BitLinearAttrs(k=64, code="pm1", act="binary", threshold=False, has_offset=False)
    >>> a.op_kwargs()["k"], BitLinearAttrs.TENSORS[0]
    (64, 'planes')
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import fx

from bitcompiler.quant import numerics
from bitcompiler.quant.numerics import conv_out_size

__all__ = [
    "ATTRS",
    "BitConv2dAttrs",
    "BitLinearAttrs",
    "BoundCall",
    "TiledConv2dAttrs",
    "TiledLinearAttrs",
    "bind",
    "bit_conv2d",
    "bit_linear",
    "conv_out_hw",
    "conv_out_size",
    "exact_unary",
    "op_name",
    "tiled_conv2d",
    "tiled_linear",
    "window_mean",
]


class OpAttrs:
    """The non-tensor arguments of a bitc op (a frozen dataclass); ``TENSORS``: its tensor
    arguments after the input ``x``, by name, in the op's order."""

    OP: ClassVar[str]
    TENSORS: ClassVar[tuple[str, ...]]

    def op_kwargs(self) -> dict[str, Any]:
        """The attributes as the op takes them (pairs as lists)."""
        return {
            f.name: list(v) if isinstance(v, tuple) else v
            for f in dataclasses.fields(self)  # type: ignore[arg-type]
            for v in [getattr(self, f.name)]
        }

    @classmethod
    def from_values(cls, values: dict[str, Any]) -> Any:
        """The attributes among ``values`` (argument name -> value; lists become tuples)."""
        names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
        return cls(**{n: tuple(values[n]) if isinstance(values[n], list) else values[n] for n in names})

    @classmethod
    def overload(cls) -> Any:
        """The op (``torch.ops.bitc.<OP>.default``)."""
        return getattr(torch.ops.bitc, cls.OP).default

    def op_args(self, x: Any, tensors: dict[str, Any]) -> tuple:
        """The op's positional arguments, placed by the schema's argument names."""
        values = {"x": x, **tensors, **self.op_kwargs()}
        return tuple(values[a.name] for a in self.overload()._schema.arguments)

    def call(self, x: Any, tensors: dict[str, Any]) -> Any:
        """Call the op on ``x`` and the named ``tensors``."""
        return self.overload()(*self.op_args(x, tensors))

    @classmethod
    def schema(cls) -> str:
        """The op's schema: ``x``, the tensors (``TENSORS``), then one argument per attribute."""
        types = {"int": "SymInt", "str": "str", "bool": "bool", "tuple[int, int]": "SymInt[]"}
        args = [f"Tensor {name}" for name in ("x", *cls.TENSORS)]
        args += [f"{types[str(f.type)]} {f.name}" for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
        return f"({', '.join(args)}) -> Tensor"

    @classmethod
    def define(cls, compute: Callable[..., Any], fake: Callable[..., Any]) -> Any:
        """Register ``bitc::<OP>`` with :meth:`schema`: ``compute(x, tensors, attrs)`` is its CPU
        implementation (the reference numerics), ``fake(x, tensors, attrs)`` an empty tensor of its
        output's shape (for tracing and export)."""
        n = 1 + len(cls.TENSORS)
        names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]

        def split(args: tuple) -> tuple[Any, dict[str, Any], Any]:
            return args[0], dict(zip(cls.TENSORS, args[1:n])), cls.from_values(dict(zip(names, args[n:])))

        def run(*args: Any) -> Any:
            return compute(*split(args))

        run.__doc__ = compute.__doc__
        op = torch.library.custom_op(f"bitc::{cls.OP}", run, mutates_args=(), schema=cls.schema())
        op.register_fake(lambda *args: fake(*split(args)))
        return op


def conv_out_hw(h: int, w: int, kernel: Any, stride: Any, padding: Any, dilation: Any) -> tuple[int, int]:
    """The output (height, width) of a convolution window: the one place it is computed."""
    k, s, p, d = kernel, stride, padding, dilation
    return conv_out_size(h, k[0], s[0], p[0], d[0]), conv_out_size(w, k[1], s[1], p[1], d[1])


@dataclass(frozen=True)
class ConvWindow:
    """The window of a conv op: ``kernel``, ``stride``, ``padding``, ``dilation`` (h, w) pairs.

    A conv op's attributes are its channels, this window, then its own fields:
    ``class XAttrs(OpAttrs, ConvWindow, XChannels)`` (a dataclass lists the fields of its bases from
    the last base to the first, then its own), so the op schema's argument order is that one."""

    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]

    def out_hw(self, h: int, w: int) -> tuple[int, int]:
        return conv_out_hw(h, w, self.kernel, self.stride, self.padding, self.dilation)


# --------------------------------------------------------------------------- bitc::bit_linear
@dataclass(frozen=True)
class BitLinearAttrs(OpAttrs):
    """``bitc::bit_linear``: K inputs, weight ``code``, activation mode, threshold epilogue or not."""

    OP: ClassVar[str] = "bit_linear"
    TENSORS: ClassVar[tuple[str, ...]] = ("planes", "scale", "offset", "bias", "thr_sign", "thr")

    k: int
    code: str
    act: str
    threshold: bool
    has_offset: bool

    @property
    def float_signs(self) -> bool:
        """Float activations times +-1 weights (``pm1``: one plane, no offset) with the float
        epilogue: ``y = scale * (2 * sum of x over the set bits - sum x) + bias``."""
        return self.act == "float" and self.code == "pm1" and not self.threshold and not self.has_offset


def _thresholds(t: dict[str, Any], a: Any) -> tuple:
    return (t["thr_sign"], t["thr"]) if a.threshold else (None, None)


def _unflatten_rows(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``y (R, N)`` given ``x``'s leading shape. An op's output must not be a view: autograd forbids
    an in-place op on it (``nn.ReLU(inplace=True)`` after a Linear), so only a reshaped one is copied."""
    shape = (*x.shape[:-1], y.shape[-1])
    return y if tuple(y.shape) == shape else y.reshape(shape).clone()


def _bit_linear(x: torch.Tensor, t: dict[str, torch.Tensor], a: BitLinearAttrs) -> torch.Tensor:
    """Dense bit layer over the last axis of ``x`` (any leading shape)."""
    planes, k = t["planes"], a.k
    thr_sign, thr = _thresholds(t, a)
    y = numerics.bit_linear(
        x.reshape(-1, k),
        planes,
        k,
        a.code,
        a.act,
        t["scale"],
        t["offset"],
        t["bias"],
        thr_sign=thr_sign,
        thr=thr,
    )
    return _unflatten_rows(y, x)


bit_linear = BitLinearAttrs.define(
    _bit_linear, lambda x, t, a: x.new_empty(*x.shape[:-1], t["planes"].shape[1])
)


# --------------------------------------------------------------------------- bitc::bit_conv2d
@dataclass(frozen=True)
class _BitConvChannels:
    in_channels: int


@dataclass(frozen=True)
class BitConv2dAttrs(OpAttrs, ConvWindow, _BitConvChannels):
    """``bitc::bit_conv2d``: input channels, the window, groups, weight ``code``, activation mode,
    epilogue."""

    OP: ClassVar[str] = "bit_conv2d"
    TENSORS: ClassVar[tuple[str, ...]] = BitLinearAttrs.TENSORS

    groups: int
    code: str
    act: str
    threshold: bool
    has_offset: bool


def _bit_conv2d(x: torch.Tensor, t: dict[str, torch.Tensor], a: BitConv2dAttrs) -> torch.Tensor:
    """Conv2d bit layer, NCHW float32 in and out."""
    thr_sign, thr = _thresholds(t, a)
    return numerics.bit_conv2d(
        x, t["planes"], a.in_channels, a.kernel, a.code, a.act, t["scale"], t["offset"], t["bias"],
        stride=a.stride, padding=a.padding, dilation=a.dilation, groups=a.groups, thr_sign=thr_sign, thr=thr,
    )  # fmt: skip


def _conv_fake(x: torch.Tensor, out_channels: Any, a: Any) -> torch.Tensor:
    return x.new_empty(x.shape[0], out_channels, *a.out_hw(x.shape[2], x.shape[3]))


bit_conv2d = BitConv2dAttrs.define(_bit_conv2d, lambda x, t, a: _conv_fake(x, t["planes"].shape[1], a))


# --------------------------------------------------------------------------- bitc::tiled_linear
@dataclass(frozen=True)
class TiledLinearAttrs(OpAttrs):
    """``bitc::tiled_linear``: K inputs, N outputs, p tiles, activation mode, threshold or not."""

    OP: ClassVar[str] = "tiled_linear"
    TENSORS: ClassVar[tuple[str, ...]] = ("tile", "scale", "bias", "thr_sign", "thr")

    k: int
    n: int
    p: int
    act: str
    threshold: bool


def _tiled_linear(x: torch.Tensor, t: dict[str, torch.Tensor], a: TiledLinearAttrs) -> torch.Tensor:
    """Tiled dense layer (docs/methods.md §4) over the last axis of ``x``: one packed tile, p scales."""
    y = numerics.tiled_linear(
        x.reshape(-1, a.k), t["tile"], a.k, a.n, a.p, a.act, t["scale"], t["bias"], *_thresholds(t, a)
    )
    return _unflatten_rows(y, x)


tiled_linear = TiledLinearAttrs.define(_tiled_linear, lambda x, t, a: x.new_empty(*x.shape[:-1], a.n))


# --------------------------------------------------------------------------- bitc::tiled_conv2d
@dataclass(frozen=True)
class _TiledConvChannels:
    in_channels: int
    out_channels: int


@dataclass(frozen=True)
class TiledConv2dAttrs(OpAttrs, ConvWindow, _TiledConvChannels):
    """``bitc::tiled_conv2d`` (groups 1, row-aligned): channels, the window, p, activation mode."""

    OP: ClassVar[str] = "tiled_conv2d"
    TENSORS: ClassVar[tuple[str, ...]] = TiledLinearAttrs.TENSORS

    p: int
    act: str
    threshold: bool


def _tiled_conv2d(x: torch.Tensor, t: dict[str, torch.Tensor], a: TiledConv2dAttrs) -> torch.Tensor:
    """Row-aligned tiled conv (docs/methods.md §4), NCHW float32: R = O/p stored filters, p scales."""
    return numerics.tiled_conv2d(
        x, t["tile"], a.in_channels, a.out_channels, a.p, a.act, t["scale"], t["bias"],
        a.stride, a.padding, a.dilation, *_thresholds(t, a),
    )  # fmt: skip


tiled_conv2d = TiledConv2dAttrs.define(_tiled_conv2d, lambda x, t, a: _conv_fake(x, a.out_channels, a))


# --------------------------------------------------------------------------- bitc::window_mean
@torch.library.custom_op("bitc::window_mean", mutates_args=())
def window_mean(
    x: torch.Tensor, kernel: list[int], stride: list[int], padding: list[int], count_include_pad: bool
) -> torch.Tensor:
    """Average pooling, NCHW float32, summed in one fixed order (``numerics.window_mean``)."""
    return numerics.window_mean(
        x,
        (kernel[0], kernel[1]),
        (stride[0], stride[1]),
        (padding[0], padding[1]),
        count_include_pad,
    )


@window_mean.register_fake
def _(x, kernel, stride, padding, count_include_pad):
    oh = numerics.pool_out_size(x.shape[2], kernel[0], stride[0], padding[0])
    ow = numerics.pool_out_size(x.shape[3], kernel[1], stride[1], padding[1])
    return x.new_empty(x.shape[0], x.shape[1], oh, ow)


# --------------------------------------------------------------------------- bitc::exact_unary
@torch.library.custom_op("bitc::exact_unary", mutates_args=())
def exact_unary(x: torch.Tensor, fn: str) -> torch.Tensor:
    """``sigmoid`` or ``tanh`` of float32 ``x`` in one fixed formulation (``numerics.exact_unary``)."""
    return numerics.exact_unary(x, fn)


@exact_unary.register_fake
def _(x, fn):
    return torch.empty_like(x)


# --------------------------------------------------------------------------- binding
ATTRS: dict[str, type[OpAttrs]] = {
    a.OP: a for a in (BitLinearAttrs, BitConv2dAttrs, TiledLinearAttrs, TiledConv2dAttrs)
}


def op_name(node: fx.Node) -> str | None:
    """``"bit_linear"`` for a call of ``bitc::bit_linear`` (any overload), None for other nodes."""
    if node.op != "call_function" or getattr(node.target, "namespace", None) != "bitc":
        return None
    return str(getattr(node.target, "_opname", "")) or None


@dataclass(frozen=True)
class BoundCall:
    """A bitc op call's arguments by name: the input ``x``, the tensors, the attributes."""

    x: Any
    tensors: dict[str, Any]
    attrs: Any  # one of the *Attrs classes above


def bind(node: fx.Node) -> BoundCall:
    """The arguments of the bitc layer op called by ``node``, bound by the op schema's names."""
    name = op_name(node)
    if name not in ATTRS:
        raise ValueError(f"{node.format_node()} is not a call of a bitc layer op ({', '.join(ATTRS)})")
    schema = node.target._schema  # type: ignore[union-attr]
    values = {a.name: v for a, v in zip(schema.arguments, node.args)} | dict(node.kwargs)
    cls = ATTRS[name]
    return BoundCall(values["x"], {t: values[t] for t in cls.TENSORS}, cls.from_values(values))
