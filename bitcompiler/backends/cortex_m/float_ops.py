"""The float ops a bit network keeps, as plain C loops (inputs ``x0``, ``x1``; output ``y``).

Each emitter takes the aten node, the input shapes and the output shape (batch 1, NCHW) and
returns C statements; the arithmetic follows PyTorch's CPU kernels (e.g. average pooling sums
then divides by the same divisor ATen uses).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from bitcompiler.errors import UnsupportedFloatOp


def _f(v: float) -> str:
    if math.isinf(v):
        return "INFINITY" if v > 0 else "-INFINITY"
    return f"{float(v)!r}f"


def _numel(shape: tuple) -> int:
    return math.prod(shape)


def relu(node: Any, shapes: list, out: tuple) -> list[str]:
    return [f"for (int i = 0; i < {_numel(out)}; ++i) y[i] = x0[i] > 0.0f ? x0[i] : 0.0f;"]


def qualified_name(node: Any) -> str:
    """``"relu.default"``: an op node's name and overload (empty for placeholders and outputs)."""
    return f"{getattr(node.target, '_opname', '')}.{getattr(node.target, '_overloadname', '')}"


def hardtanh_bounds(node: Any) -> tuple[float, float]:
    """A hardtanh node's ``(min_val, max_val)``, given by position or by name."""
    lo = node.args[1] if len(node.args) > 1 else node.kwargs.get("min_val", -1.0)
    hi = node.args[2] if len(node.args) > 2 else node.kwargs.get("max_val", 1.0)
    return float(lo), float(hi)


def hardtanh(node: Any, shapes: list, out: tuple) -> list[str]:
    lo, hi = hardtanh_bounds(node)
    clamp = f"y[i] = v < {_f(lo)} ? {_f(lo)} : (v > {_f(hi)} ? {_f(hi)} : v);"
    return [f"for (int i = 0; i < {_numel(out)}; ++i) {{ float v = x0[i]; {clamp} }}"]


def _binary(op: str) -> Callable:
    def emit(node: Any, shapes: list, out: tuple) -> list[str]:
        a, b = node.args[0], node.args[1]
        alpha = node.kwargs.get("alpha", 1)
        if not isinstance(a, torch.fx.Node):
            raise UnsupportedFloatOp(f"{node.name}: a scalar first operand is not supported")
        if isinstance(b, torch.fx.Node):
            if tuple(shapes[0]) != tuple(out):
                raise UnsupportedFloatOp(
                    f"{node.name}: broadcasting {shapes[0]} {op} {shapes[1]} is not supported"
                )
            rhs = f"x1[{_broadcast_index(tuple(shapes[1]), tuple(out), node.name, op)}]"
        else:
            rhs = _f(float(b))
        if alpha != 1:
            rhs = f"({_f(float(alpha))} * {rhs})"
        return [f"for (int i = 0; i < {_numel(out)}; ++i) y[i] = x0[i] {op} {rhs};"]

    return emit


def _broadcast_index(shape: tuple, out: tuple, name: str, op: str) -> str:
    """The C index into an operand of ``shape`` broadcast to ``out`` at flat output index ``i``
    (a leftover BatchNorm's per-channel ``(C, 1, 1)`` or ``(C,)`` factors)."""
    if shape == out:
        return "i"
    if len(shape) > len(out) or any(d not in (1, o) for d, o in zip(shape[::-1], out[::-1])):
        raise UnsupportedFloatOp(f"{name}: broadcasting {out} {op} {shape} is not supported")
    full = (1,) * (len(out) - len(shape)) + shape
    terms, stride_out, stride_in = [], 1, 1
    for d, o in zip(full[::-1], out[::-1]):
        if d == o and o > 1:
            terms.append(f"(i / {stride_out} % {o}) * {stride_in}")
            stride_in *= d
        stride_out *= o
    return " + ".join(terms) or "0"


def _pool_loops(shapes: list, out: tuple) -> tuple[int, int, int, int, int, int]:
    _, c, h, w = shapes[0]
    _, _, oh, ow = out
    return c, h, w, oh, ow, h * w


def _pair(v: Any, default: Any = None) -> tuple[int, int]:
    if v is None or (isinstance(v, (list, tuple)) and len(v) == 0):
        v = default
    if isinstance(v, int):
        return v, v
    return (int(v[0]), int(v[1])) if len(v) == 2 else (int(v[0]), int(v[0]))


def max_pool2d(node: Any, shapes: list, out: tuple) -> list[str]:
    args = list(node.args) + [None] * 6
    kh, kw = _pair(args[1])
    sh, sw = _pair(args[2] or node.kwargs.get("stride"), (kh, kw))
    ph, pw = _pair(args[3] if args[3] is not None else node.kwargs.get("padding", 0), 0)
    dh, dw = _pair(args[4] if args[4] is not None else node.kwargs.get("dilation", 1), 1)
    c, h, w, oh, ow, hw = _pool_loops(shapes, out)
    return [
        f"for (int c = 0; c < {c}; ++c) for (int oh = 0; oh < {oh}; ++oh) for (int ow = 0; ow < {ow}; ++ow) {{",
        "  float m = -INFINITY;",
        f"  for (int kh = 0; kh < {kh}; ++kh) {{ int ih = oh * {sh} - {ph} + kh * {dh}; if (ih < 0 || ih >= {h}) continue;",
        f"    for (int kw = 0; kw < {kw}; ++kw) {{ int iw = ow * {sw} - {pw} + kw * {dw}; if (iw < 0 || iw >= {w}) continue;",
        f"      float v = x0[c * {hw} + ih * {w} + iw]; if (v > m || v != v) m = v; }} }}",
        f"  y[(c * {oh} + oh) * {ow} + ow] = m;",
        "}",
    ]


def max_pool2d_bits(node: Any, hw: tuple[int, int], out_hw: tuple[int, int], words: int) -> list[str]:
    """Max pooling of packed sign words ``x0 (H, W, words)`` -> ``y (OH, OW, words)``: the OR of
    the window's words (window taps outside the image are skipped, as ``max_pool2d``'s -inf
    padding is never the max). Equal to packing the float max pool's signs for finite inputs."""
    args = list(node.args) + [None] * 6
    kh, kw = _pair(args[1])
    sh, sw = _pair(args[2] or node.kwargs.get("stride"), (kh, kw))
    ph, pw = _pair(args[3] if args[3] is not None else node.kwargs.get("padding", 0), 0)
    dh, dw = _pair(args[4] if args[4] is not None else node.kwargs.get("dilation", 1), 1)
    (h, w), (oh, ow) = hw, out_hw
    return [
        f"for (int oh = 0; oh < {oh}; ++oh) for (int ow = 0; ow < {ow}; ++ow) for (int j = 0; j < {words}; ++j) {{",
        "  int32_t m = 0;",
        f"  for (int kh = 0; kh < {kh}; ++kh) {{ int ih = oh * {sh} - {ph} + kh * {dh}; if (ih < 0 || ih >= {h}) continue;",
        f"    for (int kw = 0; kw < {kw}; ++kw) {{ int iw = ow * {sw} - {pw} + kw * {dw}; if (iw < 0 || iw >= {w}) continue;",
        f"      m |= x0[(ih * {w} + iw) * {words} + j]; }} }}",
        f"  y[(oh * {ow} + ow) * {words} + j] = m;",
        "}",
    ]


def avg_pool2d(node: Any, shapes: list, out: tuple) -> list[str]:
    args = list(node.args) + [None] * 7
    kh, kw = _pair(args[1])
    sh, sw = _pair(args[2] or node.kwargs.get("stride"), (kh, kw))
    ph, pw = _pair(args[3] if args[3] is not None else node.kwargs.get("padding", 0), 0)
    include_pad = args[5] if args[5] is not None else node.kwargs.get("count_include_pad", True)
    override = args[6] if args[6] is not None else node.kwargs.get("divisor_override")
    return _avg_pool((kh, kw), (sh, sw), (ph, pw), include_pad, override, shapes, out)


def window_mean(node: Any, shapes: list, out: tuple) -> list[str]:
    """``bitc::window_mean``: the taps summed in row-major order from 0, then one division."""
    kernel, stride, padding, include_pad = node.args[1:5]
    return _avg_pool(_pair(kernel), _pair(stride), _pair(padding), include_pad, None, shapes, out)


def _avg_pool(
    kernel: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    include_pad: bool,
    override: Any,
    shapes: list,
    out: tuple,
) -> list[str]:
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    c, h, w, oh, ow, hw = _pool_loops(shapes, out)
    if override:
        divisor = f"{int(override)}"
    elif include_pad:
        divisor = "(he0 - hs0) * (we0 - ws0)"
    else:
        divisor = "(he - hs) * (we - ws)"
    return [
        f"for (int c = 0; c < {c}; ++c) for (int oh = 0; oh < {oh}; ++oh) for (int ow = 0; ow < {ow}; ++ow) {{",
        f"  int hs0 = oh * {sh} - {ph}, ws0 = ow * {sw} - {pw};",
        f"  int he0 = hs0 + {kh} < {h + ph} ? hs0 + {kh} : {h + ph}, we0 = ws0 + {kw} < {w + pw} ? ws0 + {kw} : {w + pw};",
        f"  int hs = hs0 > 0 ? hs0 : 0, ws = ws0 > 0 ? ws0 : 0, he = he0 < {h} ? he0 : {h}, we = we0 < {w} ? we0 : {w};",
        "  float s = 0.0f;",
        f"  for (int ih = hs; ih < he; ++ih) for (int iw = ws; iw < we; ++iw) s += x0[c * {hw} + ih * {w} + iw];",
        f"  y[(c * {oh} + oh) * {ow} + ow] = s / (float)({divisor});",
        "}",
    ]


def adaptive_avg_pool2d(node: Any, shapes: list, out: tuple) -> list[str]:
    c, h, w, oh, ow, hw = _pool_loops(shapes, out)
    return [
        f"for (int c = 0; c < {c}; ++c) for (int oh = 0; oh < {oh}; ++oh) for (int ow = 0; ow < {ow}; ++ow) {{",
        f"  int hs = (oh * {h}) / {oh}, he = ((oh + 1) * {h} + {oh - 1}) / {oh};",
        f"  int ws = (ow * {w}) / {ow}, we = ((ow + 1) * {w} + {ow - 1}) / {ow};",
        "  float s = 0.0f;",
        f"  for (int ih = hs; ih < he; ++ih) for (int iw = ws; iw < we; ++iw) s += x0[c * {hw} + ih * {w} + iw];",
        f"  y[(c * {oh} + oh) * {ow} + ow] = s / (float)((he - hs) * (we - ws));",
        "}",
    ]


def mean_dim(node: Any, shapes: list, out: tuple) -> list[str]:
    shape = tuple(shapes[0])
    dims = sorted(d % len(shape) for d in node.args[1])
    if dims != list(range(len(shape) - len(dims), len(shape))):
        raise UnsupportedFloatOp(
            f"{node.name}: mean over dims {dims} of {shape}: only trailing dims are supported"
        )
    inner = math.prod(shape[len(shape) - len(dims) :])
    outer = math.prod(shape[: len(shape) - len(dims)])
    return [
        f"for (int o = 0; o < {outer}; ++o) {{ float s = 0.0f;",
        f"  for (int i = 0; i < {inner}; ++i) s += x0[o * {inner} + i];",
        f"  y[o] = s / {_f(float(inner))}; }}",
    ]


EMITTERS: dict[str, Callable[[Any, list, tuple], list[str]]] = {
    "relu.default": relu,
    "relu_.default": relu,
    "hardtanh.default": hardtanh,
    "hardtanh_.default": hardtanh,
    "add.Tensor": _binary("+"),
    "sub.Tensor": _binary("-"),
    "mul.Tensor": _binary("*"),
    "max_pool2d.default": max_pool2d,
    "avg_pool2d.default": avg_pool2d,
    "adaptive_avg_pool2d.default": adaptive_avg_pool2d,
    "mean.dim": mean_dim,
}

# y[i] depends only on the inputs' element i: the output may overwrite an input that dies there
ELEMENTWISE = frozenset(
    {
        "relu.default",
        "relu_.default",
        "hardtanh.default",
        "hardtanh_.default",
        "add.Tensor",
        "sub.Tensor",
        "mul.Tensor",
        "exact_unary.default",
    }
)


class _CValue:
    """A float32 C value (a literal or a local) in the statements :class:`CFloat32` emits."""

    def __init__(self, prog: CFloat32, text: str) -> None:
        self.prog, self.text = prog, text

    def _op(self, op: str, other: _CValue) -> _CValue:
        return self.prog.local(f"{self.text} {op} {other.text}")

    def __add__(self, other: _CValue) -> _CValue:
        return self._op("+", other)

    def __sub__(self, other: _CValue) -> _CValue:
        return self._op("-", other)

    def __mul__(self, other: _CValue) -> _CValue:
        return self._op("*", other)

    def __truediv__(self, other: _CValue) -> _CValue:
        return self._op("/", other)


class CFloat32:
    """The operations of ``numerics.exp32``/``sigmoid32``/``tanh32`` as C statements, one float32
    local per operation (the bundle builds with ``-ffp-contract=off``: each rounds as PyTorch's)."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def local(self, expr: str, ty: str = "float") -> _CValue:
        name = f"t{len(self.lines)}"
        self.lines.append(f"{ty} {name} = {expr};")
        return _CValue(self, name)

    def const(self, v: float) -> _CValue:
        from bitcompiler.quant.numerics import f32

        return _CValue(self, _f(f32(v)))

    def floor(self, x: _CValue) -> _CValue:
        t = self.local(f"(float)(int32_t){x.text}")  # truncation; |x| < 2^31 here
        return self.local(f"{t.text} > {x.text} ? {t.text} - 1.0f : {t.text}")

    def abs(self, x: _CValue) -> _CValue:
        return self.local(f"{x.text} < 0.0f ? -{x.text} : {x.text}")

    def clamp(self, x: _CValue, lo: float, hi: float) -> _CValue:
        lo_, hi_ = self.const(lo).text, self.const(hi).text
        t = self.local(f"{x.text} > {lo_} ? {x.text} : {lo_}")
        return self.local(f"{t.text} < {hi_} ? {t.text} : {hi_}")

    def select_gt(self, a: _CValue, t: float, yes: _CValue, no: _CValue) -> _CValue:
        return self.local(f"{a.text} > {self.const(t).text} ? {yes.text} : {no.text}")

    def pow2(self, n: _CValue) -> _CValue:
        u = self.local(f"{{.i = ((int32_t){n.text} + 127) << 23}}", "union { int32_t i; float f; }")
        return self.local(f"{u.text}.f")


def exact_unary(node: Any, shapes: list, out: tuple) -> list[str]:
    """``bitc::exact_unary``: the reference's formulation (``numerics.EXACT_UNARY``), per element."""
    from bitcompiler.quant.numerics import EXACT_UNARY

    prog = CFloat32()
    y = EXACT_UNARY[str(node.args[1])](_CValue(prog, "x0[i]"), prog)
    body = " ".join(prog.lines)
    return [f"for (int i = 0; i < {_numel(out)}; ++i) {{ {body} y[i] = {y.text}; }}"]


# bitc ops that are float ops (the bit layers have their own kernels)
BITC_EMITTERS: dict[str, Callable[[Any, list, tuple], list[str]]] = {
    "window_mean.default": window_mean,
    "exact_unary.default": exact_unary,
}
