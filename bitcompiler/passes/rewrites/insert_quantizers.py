"""insert_quantizers: weight and activation quantizers per the scheme.

Float ``Linear``/``Conv2d`` modules become ``QuantLinear``/``QuantConv2d``;
with ``first_last=keep`` the first and last such layer (graph order) get 8-bit
weights. Layers a ``prepare``d model already quantizes are left as trained.
A weighted layer with no bit lowering stays float and is noted for the report
(an error under ``strict=True``).
"""

from __future__ import annotations

import torch
from torch import fx, nn

from bitcompiler.passes.graph_utils import finish, module_of, set_module
from bitcompiler.passes.pipeline import PassContext, PassError, fact_check, graph_pass
from bitcompiler.quant.modules import QUANT_LAYERS, quantizable, quantize_layer


def _weighted(m: nn.Module) -> bool:
    w = getattr(m, "weight", None)
    return isinstance(w, torch.Tensor) and w.dim() >= 2


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
            if ctx.strict:
                raise PassError(
                    "insert_quantizers",
                    f"layer {node.target!r} ({type(m).__name__}): {reason}; "
                    "pass strict=False to keep it in float",
                    node=node.name,
                )
            ctx.notes.append((str(node.target), f"kept float: {reason}"))
            continue
        set_module(gm, str(node.target), quantize_layer(m, ctx.scheme, node in first_last))
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
