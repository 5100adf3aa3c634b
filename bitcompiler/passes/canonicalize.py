"""canonicalize: one form for the float graph.

Functional and ATen linear/conv2d/batch_norm calls on constant weights become
module calls (``nn.Linear``, ``nn.Conv2d``, ``nn.BatchNorm2d``), so every later
pass matches one pattern; dropout and identity disappear.
"""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import fx, nn

from bitcompiler.passes.graph_utils import fresh_name, get_attr_value, is_call, module_of
from bitcompiler.passes.pipeline import Pass

aten = torch.ops.aten
_LINEAR = (F.linear, torch._C._nn.linear, aten.linear.default)
_CONV = (F.conv2d, torch.conv2d, aten.conv2d.default)
_DROPOUT = (F.dropout, torch.dropout, aten.dropout.default)
_BN_EPS_ARG = {aten.batch_norm.default: 7, aten._native_batch_norm_legit_no_training.default: 6}


def _arg(node: fx.Node, i: int, name: str, default: Any) -> Any:
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _linear_module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    w, b = get_attr_value(gm, _arg(node, 1, "weight", None)), get_attr_value(gm, _arg(node, 2, "bias", None))
    if w is None or w.dim() != 2 or (_arg(node, 2, "bias", None) is not None and b is None):
        return None
    m = nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
    m.weight = nn.Parameter(w.detach().clone())
    if b is not None:
        m.bias = nn.Parameter(b.detach().clone())
    return m


def _conv_module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    w, b = get_attr_value(gm, _arg(node, 1, "weight", None)), get_attr_value(gm, _arg(node, 2, "bias", None))
    if w is None or w.dim() != 4 or (_arg(node, 2, "bias", None) is not None and b is None):
        return None
    stride, padding = _arg(node, 3, "stride", 1), _arg(node, 4, "padding", 0)
    dilation, groups = _arg(node, 5, "dilation", 1), _arg(node, 6, "groups", 1)
    m = nn.Conv2d(
        w.shape[1] * groups,
        w.shape[0],
        (w.shape[2], w.shape[3]),
        stride,
        padding,
        dilation,
        groups,
        bias=b is not None,
    )
    m.weight = nn.Parameter(w.detach().clone())
    if b is not None:
        m.bias = nn.Parameter(b.detach().clone())
    return m


def _bn_module(gm: fx.GraphModule, node: Any) -> nn.Module | None:
    w, b, mean, var = (get_attr_value(gm, node.args[i]) for i in (1, 2, 3, 4))
    if mean is None or var is None or (node.target is aten.batch_norm.default and node.args[5]):
        return None  # a training-mode batch norm has no fixed affine
    m = nn.BatchNorm2d(
        mean.shape[0], eps=float(node.args[_BN_EPS_ARG[node.target]]), affine=w is not None
    ).eval()
    cast(torch.Tensor, m.running_mean).data = mean.detach().clone()
    cast(torch.Tensor, m.running_var).data = var.detach().clone()
    if w is not None:
        m.weight.data.copy_(w)
        m.bias.data.copy_(b if b is not None else torch.zeros_like(w))
    return m


def _to_module(gm: fx.GraphModule, node: fx.Node, module: nn.Module, base: str, x: fx.Node) -> fx.Node:
    name = fresh_name(gm, base)
    gm.add_submodule(name, module)
    with gm.graph.inserting_before(node):
        new = gm.graph.call_module(name, (x,))
    return new


def run(gm: fx.GraphModule) -> fx.GraphModule:
    for node in list(gm.graph.nodes):
        m = module_of(gm, node)
        if isinstance(m, (nn.Dropout, nn.Identity)) or is_call(node, *_DROPOUT):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
        elif is_call(node, *_LINEAR) and (lin := _linear_module(gm, node)) is not None:
            node.replace_all_uses_with(_to_module(gm, node, lin, "linear", node.args[0]))
            gm.graph.erase_node(node)
        elif is_call(node, *_CONV) and (conv := _conv_module(gm, node)) is not None:
            node.replace_all_uses_with(_to_module(gm, node, conv, "conv", node.args[0]))
            gm.graph.erase_node(node)
        elif is_call(node, *_BN_EPS_ARG) and (bn := _bn_module(gm, node)) is not None:
            new = _to_module(gm, node, bn, "batchnorm", node.args[0])
            if node.target is aten.batch_norm.default:
                node.replace_all_uses_with(new)
            for user in list(node.users):  # the legit op returns (out, mean, rstd); eval uses only out
                if user.target.__name__ == "getitem" and user.args[1] == 0:
                    user.replace_all_uses_with(new)
                    gm.graph.erase_node(user)
            if not node.users:
                gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


canonicalize = Pass("canonicalize", run, frozenset({"traced"}), frozenset({"canonical"}))
