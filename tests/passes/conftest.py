"""Before/Expected helpers: compare graphs structurally by (op, target kind) sequences."""

from __future__ import annotations

import torch
from torch import fx, nn

from bitcompiler.capture import symbolic_trace
from bitcompiler.passes import PassContext
from bitcompiler.quant.schemes import Scheme


def structure(gm: fx.GraphModule) -> list[tuple[str, str]]:
    """The graph as (op, what it calls) pairs; modules by class name, functions by name."""
    out = []
    for n in gm.graph.nodes:
        if n.op == "call_module":
            out.append((n.op, type(gm.get_submodule(str(n.target))).__name__))
        elif n.op in ("call_function", "call_method"):
            out.append((n.op, getattr(n.target, "__name__", str(n.target))))
        elif n.op == "get_attr":
            out.append((n.op, str(n.target).rpartition(".")[2]))
        else:
            out.append((n.op, ""))
    return out


def trace(model: nn.Module) -> fx.GraphModule:
    return symbolic_trace(model.eval())


def ctx(scheme: str = "binary", x: torch.Tensor | None = None, strict: bool = False) -> PassContext:
    return PassContext(scheme=Scheme.parse(scheme), strict=strict, example_inputs=() if x is None else (x,))
