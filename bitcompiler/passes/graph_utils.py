"""Small fx helpers shared by the passes (module lookup and replacement)."""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn


def module_of(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    """The module a ``call_module`` node calls, else None."""
    if node.op != "call_module":
        return None
    return gm.get_submodule(str(node.target))


def set_module(gm: fx.GraphModule, target: str, module: nn.Module) -> None:
    """Replace (or add) the submodule at a dotted path."""
    parent_name, _, leaf = target.rpartition(".")
    parent = gm.get_submodule(parent_name) if parent_name else gm
    setattr(parent, leaf, module)


def fresh_name(gm: fx.GraphModule, base: str) -> str:
    base = base.replace(".", "_")
    name, i = base, 0
    while hasattr(gm, name):
        i += 1
        name = f"{base}_{i}"
    return name


def get_attr_value(gm: fx.GraphModule, node: object) -> torch.Tensor | None:
    """The tensor behind a ``get_attr`` node, else None."""
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    obj: object = gm
    for part in str(node.target).split("."):
        obj = getattr(obj, part)
    return obj if isinstance(obj, torch.Tensor) else None


def is_call(node: fx.Node, *targets: object) -> bool:
    return node.op in ("call_function", "call_method") and node.target in targets


def finish(gm: fx.GraphModule) -> fx.GraphModule:
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm


# ops whose output sign equals the sign of their input (sign(0) = +1 kept)
SIGN_PRESERVING_FUNCS = (
    F.max_pool2d,
    torch.flatten,
    torch.reshape,
    F.hardtanh,
    operator.getitem,
    "flatten",
    "view",
    "reshape",
    "contiguous",
)
SIGN_PRESERVING_MODULES = (nn.MaxPool2d, nn.Flatten, nn.Hardtanh, nn.Identity)
# ops that only move elements (each output element is one input element)
REARRANGING_FUNCS = (
    torch.unsqueeze,
    torch.squeeze,
    torch.permute,
    torch.transpose,
    "unsqueeze",
    "squeeze",
    "permute",
    "transpose",
)
