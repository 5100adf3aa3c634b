"""The quantized layers of a compiled graph, read back as codes, scales and offsets for ONNX out.

Each ``bitc`` layer call of ``cm.graph`` becomes one :class:`QuantLayer`: integer weight codes in
torch's weight layout (tiled layers expanded to their full weight), one scale, offset and bias per
output channel, the activation mode and, for a threshold epilogue, the integer thresholds. What
the numerics define (``bitcompiler.quant.numerics``) is the meaning:
``W = scale[n]·Q + offset[n]`` and ``y = x_q ⊛ W + bias`` or ``y = ±1 by thr_sign·acc >= thr``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from bitcompiler import ops
from bitcompiler.quant import numerics


@dataclass(frozen=True)
class QuantLayer:
    """One bit layer: codes ``(N, K)`` (dense) or ``(O, Cg, KH, KW)`` (conv) and its epilogue."""

    kind: str  # "linear" or "conv"
    codes: torch.Tensor  # int64
    bits: int
    code: str  # "pm1" (codes ±1) or "uint" (codes 0 .. 2**bits - 1)
    scale: torch.Tensor  # (N,) float32
    offset: torch.Tensor  # (N,) float32
    bias: torch.Tensor  # (N,) float32
    act: str  # "float", "int8" or "binary"
    thr_sign: torch.Tensor | None = None  # (N,) int32, with thr: a threshold epilogue
    thr: torch.Tensor | None = None
    conv: dict[str, Any] | None = None  # stride, padding, dilation, groups

    @property
    def threshold(self) -> bool:
        return self.thr is not None


def constant_tensors(gm: fx.GraphModule, call: ops.BoundCall) -> dict[str, torch.Tensor]:
    """The tensor arguments of a bitc call (``get_attr`` nodes of ``gm``) by name."""
    out = {}
    for name, arg in call.tensors.items():
        owner, _, attr = str(arg.target).rpartition(".")
        out[name] = getattr(gm.get_submodule(owner), attr) if isinstance(arg, fx.Node) else arg
    return out


def read_layer(gm: fx.GraphModule, node: fx.Node) -> QuantLayer:
    """The :class:`QuantLayer` of the bitc layer call ``node`` in ``gm``."""
    call = ops.bind(node)
    t = constant_tensors(gm, call)
    a = call.attrs
    epilogue: dict[str, Any] = {"bias": t["bias"], "act": a.act}
    if a.threshold:
        epilogue.update(thr_sign=t["thr_sign"], thr=t["thr"])
    if isinstance(a, (ops.BitConv2dAttrs, ops.TiledConv2dAttrs)):
        groups = a.groups if isinstance(a, ops.BitConv2dAttrs) else 1
        epilogue["conv"] = {
            "stride": a.stride,
            "padding": a.padding,
            "dilation": a.dilation,
            "groups": groups,
        }
    if isinstance(a, ops.BitLinearAttrs):
        codes = numerics.planes_to_code(t["planes"], a.k, a.code)
        return QuantLayer("linear", codes, t["planes"].shape[0], a.code, t["scale"], t["offset"], **epilogue)
    if isinstance(a, ops.BitConv2dAttrs):
        codes = numerics.conv_planes_to_codes(t["planes"], a.in_channels // a.groups, a.code)
        return QuantLayer("conv", codes, t["planes"].shape[0], a.code, t["scale"], t["offset"], **epilogue)
    # tiled: the tile expanded to the whole weight, one scale per chunk of channels
    n = a.n if isinstance(a, ops.TiledLinearAttrs) else a.out_channels
    scale, zeros = numerics.channel_scale(t["scale"], n), torch.zeros(n)
    if isinstance(a, ops.TiledLinearAttrs):
        codes = numerics.expand_tile(numerics.unpack_tile(t["tile"], a.n, a.k, a.p), (a.n, a.k))
        return QuantLayer("linear", codes, 1, "pm1", scale, zeros, **epilogue)
    codes = numerics.conv_planes_to_codes(t["tile"], a.in_channels, "pm1").repeat(a.p, 1, 1, 1)
    return QuantLayer("conv", codes, 1, "pm1", scale, zeros, **epilogue)
