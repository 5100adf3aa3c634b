"""Hypothesis strategies: random small models and the schemes to compile them with.

A model is drawn as a :class:`Spec`: an input shape and a list of layer descriptions (plain
tuples, so a failing example prints as a literal that :func:`build` turns back into the model).
Image models stack conv / depthwise conv / BatchNorm / activation / pooling / residual and
concatenation blocks, then flatten into one or two Linear layers; vector models are MLPs. Shapes
stay tiny so that one compile takes a second or two.

Generated models avoid what bitcompiler documents as unsupported (see ``_cortex_ok`` for the
Cortex-M subset).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn

ACTS = ("relu", "hardtanh", "sigmoid", "gelu")
# float ops the Cortex-M backend emits as C (float_ops.EMITTERS); sigmoid and gelu it does not
CORTEX_ACTS = ("relu", "hardtanh")


@dataclass(frozen=True)
class Spec:
    """``input``: the example shape (batch 1); ``layers``: tuples ``(kind, *params)``."""

    input: tuple[int, ...]
    layers: tuple[tuple, ...]


# --------------------------------------------------------------------------- model
def _act(name: str) -> nn.Module:
    return {"relu": nn.ReLU(), "hardtanh": nn.Hardtanh(), "sigmoid": nn.Sigmoid(), "gelu": nn.GELU()}[name]


class Residual(nn.Module):
    """``x + body(x)`` (body keeps the shape)."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class Cat(nn.Module):
    """Two branches concatenated along channels."""

    def __init__(self, a: nn.Module, b: nn.Module) -> None:
        super().__init__()
        self.a, self.b = a, b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.a(x), self.b(x)], dim=1)


class GlobalAvg(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(x, 1)


def _bn(c: int, seed: int) -> nn.BatchNorm2d:
    g = torch.Generator().manual_seed(seed)
    bn = nn.BatchNorm2d(c)
    bn.running_mean.copy_(torch.rand(c, generator=g) - 0.5)
    bn.running_var.copy_(torch.rand(c, generator=g) + 0.5)
    bn.weight.data.copy_(torch.rand(c, generator=g) + 0.5)
    bn.bias.data.copy_(torch.rand(c, generator=g) - 0.5)
    return bn


def _layer(layer: tuple, seed: int) -> nn.Module:
    kind, *p = layer
    if kind == "conv":  # (c_in, c_out, k, stride, padding, groups, bias)
        c_in, c_out, k, s, pad, g, bias = p
        return nn.Conv2d(c_in, c_out, k, stride=s, padding=pad, groups=g, bias=bias)
    if kind == "bn":
        return _bn(p[0], seed)
    if kind == "act":
        return _act(p[0])
    if kind == "maxpool":  # (k, stride)
        return nn.MaxPool2d(p[0], p[1])
    if kind == "avgpool":
        return nn.AvgPool2d(p[0], p[1])
    if kind == "gap":
        return GlobalAvg()
    if kind == "flatten":
        return nn.Flatten()
    if kind == "linear":  # (k, n, bias)
        return nn.Linear(p[0], p[1], bias=p[2])
    if kind == "residual":  # (layers of the body)
        return Residual(_seq(p[0], seed))
    if kind == "cat":  # (layers of branch a, layers of branch b)
        return Cat(_seq(p[0], seed), _seq(p[1], seed + 1))
    raise ValueError(f"unknown layer kind {kind!r}")


def _seq(layers: tuple, seed: int) -> nn.Sequential:
    return nn.Sequential(*(_layer(layer, seed * 31 + i) for i, layer in enumerate(layers)))


def build(spec: Spec, seed: int = 0) -> nn.Module:
    """The model a spec describes, with seeded weights and BatchNorm statistics, in eval mode."""
    torch.manual_seed(seed)
    return _seq(spec.layers, seed).eval()


# float ops outside the exactness contract (docs/guide.md, "Exactness"): PyTorch and the kernels
# compute them differently, so a quantizer after one may round the other way; sigmoid and tanh are
# not among them (``bitc::exact_unary``)
INEXACT_OPS = ("gelu",)


def has_kind(layers: tuple, kinds: tuple[str, ...]) -> bool:
    """Whether any (nested) layer is one of ``kinds`` (or an activation named in ``kinds``)."""
    for layer in layers:
        if layer[0] in kinds or (layer[0] == "act" and layer[1] in kinds):
            return True
        if layer[0] == "residual" and has_kind(layer[1], kinds):
            return True
        if layer[0] == "cat" and (has_kind(layer[1], kinds) or has_kind(layer[2], kinds)):
            return True
    return False


# --------------------------------------------------------------------------- strategies
def _out(n: int, k: int, s: int, pad: int) -> int:
    return (n + 2 * pad - k) // s + 1


@st.composite
def conv_block(draw: st.DrawFn, c: int, hw: int, acts: tuple[str, ...], keep_shape: bool) -> tuple:
    """Conv (maybe grouped / depthwise) + maybe BN + maybe activation; returns (layers, c, hw)."""
    depthwise = draw(st.booleans())
    if depthwise:
        c_out, groups = c, c
    else:
        c_out = c if keep_shape else draw(st.integers(1, 12))
        groups = draw(st.sampled_from([g for g in (1, 2, 4) if c % g == 0 and c_out % g == 0]))
    k = draw(st.sampled_from([1, 3] if keep_shape else [1, 2, 3]))
    s = 1 if keep_shape else draw(st.sampled_from([1, 1, 2]))
    pad = k // 2 if keep_shape else draw(st.integers(0, k // 2 + (k == 2)))
    if _out(hw, k, s, pad) < 1:
        k, s, pad = 1, 1, 0
    layers: list[tuple] = [("conv", c, c_out, k, s, pad, groups, draw(st.booleans()))]
    if draw(st.booleans()):
        layers.append(("bn", c_out))
    if draw(st.booleans()):
        layers.append(("act", draw(st.sampled_from(acts))))
    return tuple(layers), c_out, _out(hw, k, s, pad)


@st.composite
def image_model(draw: st.DrawFn, acts: tuple[str, ...] = ACTS, cat: bool = True) -> Spec:
    c = draw(st.integers(1, 4))
    hw = draw(st.integers(3, 8))
    spec_in = (1, c, hw, hw)
    layers: list[tuple] = []
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(
            st.sampled_from(
                ["conv", "conv", "pool", "residual", "cat"] if cat else ["conv", "pool", "residual"]
            )
        )
        if kind == "conv":
            block, c, hw = draw(conv_block(c, hw, acts, keep_shape=False))
            layers += block
        elif kind == "pool" and hw >= 2:
            k = draw(st.integers(2, min(3, hw)))
            s = draw(st.integers(1, k))
            layers.append((draw(st.sampled_from(["maxpool", "avgpool"])), k, s))
            hw = (hw - k) // s + 1
        elif kind == "residual":
            body, _, _ = draw(conv_block(c, hw, acts, keep_shape=True))
            layers.append(("residual", body))
        elif kind == "cat":
            a, ca, _ = draw(conv_block(c, hw, acts, keep_shape=True))
            b, cb, _ = draw(conv_block(c, hw, acts, keep_shape=True))
            layers.append(("cat", a, b))
            c = ca + cb
    if draw(st.booleans()):
        layers.append(("gap",))
        hw = 1
    layers.append(("flatten",))
    k = c * hw * hw
    if draw(st.booleans()):
        n = draw(st.integers(1, 16))
        layers.append(("linear", k, n, draw(st.booleans())))
        layers.append(("act", draw(st.sampled_from(acts))))
        k = n
    layers.append(("linear", k, draw(st.integers(1, 10)), draw(st.booleans())))
    return Spec(spec_in, tuple(layers))


@st.composite
def vector_model(draw: st.DrawFn, acts: tuple[str, ...] = ACTS) -> Spec:
    k = draw(st.sampled_from([1, 3, 8, 16, 31, 32, 33, 64, 100, 128]))
    spec_in = (1, k)
    layers: list[tuple] = []
    for _ in range(draw(st.integers(0, 2))):
        n = draw(st.sampled_from([1, 4, 8, 16, 32, 40, 64]))
        layers.append(("linear", k, n, draw(st.booleans())))
        layers.append(("act", draw(st.sampled_from(acts))))
        k = n
    layers.append(("linear", k, draw(st.integers(1, 10)), draw(st.booleans())))
    return Spec(spec_in, tuple(layers))


def models(acts: tuple[str, ...] = ACTS, cat: bool = True) -> st.SearchStrategy[Spec]:
    return st.one_of(image_model(acts, cat), vector_model(acts))


FAMILIES = ("none", "binary", "uniform", "tiled", "bitnet", "bitwise", "gwt")


@st.composite
def schemes(draw: st.DrawFn, family: str | None = None) -> str:
    """A scheme string of ``family`` (any when None) with its ``act`` mode and ``first_last``."""
    name = family or draw(st.sampled_from(FAMILIES))
    if name == "none":
        return name
    bits = draw(st.integers(1, 8))
    base = {
        "binary": "binary",
        "uniform": f"uniform:bits={bits}",
        # min_weights below the layers' sizes, so that tiny layers are tiled too
        "tiled": f"tiled:p={draw(st.sampled_from([2, 4, 8]))},min_weights={draw(st.sampled_from([16, 64, 65536]))}",
        "bitnet": f"bitnet:init_bits={max(bits, 2)}",
        "bitwise": f"bitwise:bits={min(bits, 7)}",
        "gwt": "gwt",
    }[name]
    opts = []
    act = draw(st.sampled_from(["float", "8", "binary"]))
    if act != "float":
        opts.append(f"act={act}")
    if draw(st.booleans()):
        opts.append("first_last=quantize")
    if not opts:
        return base
    return base + ("," if ":" in base else ":") + ",".join(opts)


def exact(scheme: str, spec: Spec) -> bool:
    """Whether ``cm(x)`` must equal ``cm.reference(x)`` bit for bit.

    Binary activations make every quantized layer an integer popcount sum with the same float
    epilogue as the reference, so the output is exact when every layer is quantized
    (``first_last=quantize``) and every float op between them is exact in any order (relu,
    hardtanh, max pooling, views) or computed in one fixed formulation by the reference and the
    kernels alike (sigmoid: ``bitc::exact_unary``). Everything else is held to 1e-5 relative.
    """
    float_ops = ("gelu", "avgpool", "gap", "residual", "cat", "bn")
    return "act=binary" in scheme and "first_last=quantize" in scheme and not has_kind(spec.layers, float_ops)
