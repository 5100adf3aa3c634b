"""insert_quantizers: weight and activation quantizers per the scheme.

Float ``Linear``/``Conv2d`` modules become ``QuantLinear``/``QuantConv2d``;
with ``first_last=keep`` the first and last such layer (graph order) get 8-bit
weights. Layers a ``prepare``d model already quantizes are left as trained.
A weighted layer with no bit lowering stays float and is noted for the report
(an error under ``strict=True``): a module (``ConvTranspose1d``, ``Conv3d``), or a functional
call of a weighted op on a constant weight (what a model captured by ``torch.export`` holds:
``aten.conv_transpose1d(x, self.weight)``), noted under the weight's module.
"""

from __future__ import annotations

import torch
from torch import fx, nn

from bitcompiler.passes.graph_utils import finish, get_attr_value, module_of, set_module
from bitcompiler.passes.pipeline import PassContext, PassError, fact_check, graph_pass
from bitcompiler.quant.modules import QUANT_LAYERS, quantizable, quantize_layer


def _weighted(m: nn.Module) -> bool:
    w = getattr(m, "weight", None)
    return isinstance(w, torch.Tensor) and w.dim() >= 2


# functional ops with a weight (argument 1) that have no bit lowering once canonicalize has made
# module calls of linear/conv2d/conv1d on constant weights
_WEIGHTED_OPS = frozenset(
    {
        "linear",
        "conv1d",
        "conv2d",
        "conv3d",
        "conv_transpose1d",
        "conv_transpose2d",
        "conv_transpose3d",
        "convolution",
        "matmul",
        "mm",
        "bmm",
    }
)


def _functional_weight(gm: fx.GraphModule, node: fx.Node) -> tuple[str, str] | None:
    """``(op, owner)`` for a call of a weighted op whose weight is a constant of 2 or more
    dimensions: the op's name and the module that holds the weight (its dotted path)."""
    if node.op != "call_function" or len(node.args) < 2:
        return None
    op = str(getattr(node.target, "__name__", node.target)).split(".")[0]
    w = node.args[1]
    if op not in _WEIGHTED_OPS or not isinstance(w, fx.Node) or w.op != "get_attr":
        return None
    value = get_attr_value(gm, w)
    if value is None or value.dim() < 2:
        return None
    owner = str(w.target).rpartition(".")[0]
    return op, owner or node.name


def _no_lowering(ctx: PassContext, node: fx.Node, layer: str, kind: str, reason: str) -> None:
    """Note ``layer`` as kept float for the report, or (``strict``) raise."""
    if ctx.strict:
        raise PassError(
            "insert_quantizers",
            f"layer {layer!r} ({kind}): {reason}; pass strict=False to keep it in float",
            node=node.name,
        )
    ctx.notes.append((layer, f"kept float: {reason}"))


def run(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    layers = [
        n for n in gm.graph.nodes if isinstance(module_of(gm, n), (nn.Linear, nn.Conv2d, *QUANT_LAYERS))
    ]
    first_last = {layers[0], layers[-1]} if layers else set()
    for node in gm.graph.nodes:
        m = module_of(gm, node)
        if m is None or isinstance(m, QUANT_LAYERS) or not _weighted(m) or not ctx.scheme.quantizes:
            continue
        reason = quantizable(m)
        if reason is not None:
            _no_lowering(ctx, node, str(node.target), type(m).__name__, reason)
            continue
        set_module(gm, str(node.target), quantize_layer(m, ctx.scheme, node in first_last))
    if ctx.scheme.quantizes:
        for node in gm.graph.nodes:
            found = _functional_weight(gm, node)
            if found is not None:
                op, owner = found
                _no_lowering(ctx, node, owner, op, f"{op} on a constant weight has no bit lowering")
    return finish(gm)


@fact_check("quantized")
def _quantized(gm: fx.GraphModule, ctx: PassContext) -> str | None:
    """Under a quantizing scheme every weighted layer is quantized or has a note saying why not."""
    if not ctx.scheme.quantizes:
        return None
    noted = {str(name) for name, _ in ctx.notes}
    for node in gm.graph.nodes:
        m = module_of(gm, node)
        if isinstance(m, (nn.Linear, nn.Conv2d)) and _weighted(m) and str(node.target) not in noted:
            return f"layer `{node.target}` is neither quantized nor noted as kept float"
    return None


insert_quantizers = graph_pass("insert_quantizers", requires={"canonical"}, ensures={"quantized"})(run)
