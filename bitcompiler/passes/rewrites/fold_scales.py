"""fold_scales: integer codes with the scales pulled out.

``W = α + δ·Q`` gives ``y = δ·(Q x) + α·Σx``: each quantized layer becomes a
bit layer holding integer codes and a per-channel affine epilogue. Per-channel
affines that follow (BatchNorm, scalar mul/add) merge into that epilogue, and
a binary layer whose output only feeds sign() of other binary layers gets
integer thresholds (``sign(δ·acc + b)`` -> ``acc >= ⌈−b/δ⌉``); it then outputs +-1, so a
hardtanh right after it is dropped.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from bitcompiler.passes.graph_utils import (
    SIGN_PRESERVING_FUNCS,
    SIGN_PRESERVING_MODULES,
    finish,
    module_of,
    set_module,
)
from bitcompiler.passes.pipeline import fact_check, graph_pass
from bitcompiler.passes.rewrites.fold_batchnorm import bn_affine
from bitcompiler.quant.bitlayers import BIT_LAYERS, to_bit_layer
from bitcompiler.quant.modules import QUANT_LAYERS
from bitcompiler.quant.tiled_layers import TILED_LAYERS

_MUL = (operator.mul, torch.mul, "mul")
_ADD = (operator.add, torch.add, "add")


def _following_affine(gm: fx.GraphModule, node: fx.Node, channels: int) -> tuple | None:
    """(scale, shift) of a per-channel affine applied to ``node``'s only use, else None."""
    if len(node.users) != 1:
        return None
    user = next(iter(node.users))
    m = module_of(gm, user)
    if (
        isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))
        and m.running_mean is not None
        and user.args[0] is node
    ):
        return (user, *bn_affine(m))
    if user.op in ("call_function", "call_method") and len(user.args) == 2 and not user.kwargs:
        a, b = user.args
        other = b if a is node else a
        if isinstance(other, (int, float)) and not isinstance(other, bool):
            ones = torch.ones(channels)
            if user.target in _MUL:
                return user, ones * float(other), torch.zeros(channels)
            if user.target in _ADD:
                return user, ones, ones * float(other)
    return None


def feeds_only_binary_layers(gm: fx.GraphModule, node: fx.Node, through: tuple = ()) -> bool:
    """Every path from ``node`` reaches sign() of a binary bit (or tiled) layer through
    sign-preserving ops, or the ops ``through`` (``graph_utils.REARRANGING_FUNCS``: each output
    element one input element), so only the sign of each element of ``node`` matters."""
    if not node.users:
        return False
    for user in node.users:
        m = module_of(gm, user)
        if isinstance(m, (*BIT_LAYERS, *TILED_LAYERS)):
            if m.act != "binary" or user.args[0] is not node:
                return False
        elif isinstance(m, SIGN_PRESERVING_MODULES) or (
            user.op in ("call_function", "call_method")
            and user.target in (*SIGN_PRESERVING_FUNCS, *through)
            and user.args[0] is node
        ):
            if not feeds_only_binary_layers(gm, user, through):
                return False
        else:
            return False
    return True


def _identity_on_pm1(gm: fx.GraphModule, node: fx.Node, src: fx.Node) -> bool:
    """``node`` is a hardtanh of ``src`` whose range contains [-1, 1]: the identity on +-1 values."""
    if node.args[:1] != (src,):
        return False
    m = module_of(gm, node)
    if isinstance(m, nn.Hardtanh):
        lo, hi = m.min_val, m.max_val
    elif node.op == "call_function" and node.target is F.hardtanh:
        bounds: dict[str, Any] = {"min_val": -1.0, "max_val": 1.0}
        bounds.update(zip(("min_val", "max_val"), node.args[1:3], strict=False))
        bounds.update({k: v for k, v in node.kwargs.items() if k in bounds})
        lo, hi = bounds["min_val"], bounds["max_val"]
    else:
        return False
    return isinstance(lo, (int, float)) and isinstance(hi, (int, float)) and lo <= -1 <= 1 <= hi


def run(gm: fx.GraphModule) -> fx.GraphModule:
    for node in gm.graph.nodes:
        quant = module_of(gm, node)
        if isinstance(quant, QUANT_LAYERS):
            set_module(gm, str(node.target), to_bit_layer(quant))
    for node in list(gm.graph.nodes):
        layer = module_of(gm, node)
        if not isinstance(layer, BIT_LAYERS):
            continue
        while (found := _following_affine(gm, node, layer.scale.shape[0])) is not None:
            user, scale, shift = found
            layer.merge_affine(scale, shift)
            user.replace_all_uses_with(node)
            gm.graph.erase_node(user)
    for node in gm.graph.nodes:
        layer = module_of(gm, node)
        if (
            isinstance(layer, BIT_LAYERS)
            and layer.act == "binary"
            and not layer.has_offset
            and feeds_only_binary_layers(gm, node)
        ):
            layer.set_thresholds()
            # the layer now outputs exactly +-1: a hardtanh after it changes nothing
            for user in list(node.users):
                if _identity_on_pm1(gm, user, node):
                    user.replace_all_uses_with(node)
                    gm.graph.erase_node(user)
    return finish(gm)


@fact_check("folded")
def _folded(gm: fx.GraphModule) -> str | None:
    """Every quantized layer is a bit layer (integer codes + affine epilogue)."""
    left = [str(n.target) for n in gm.graph.nodes if isinstance(module_of(gm, n), QUANT_LAYERS)]
    return f"quantized layers {left} have no integer codes" if left else None


fold_scales = graph_pass("fold_scales", requires={"quantized"}, ensures={"folded"})(run)
