"""pack_weights: integer codes -> bit-planes in the word layout the kernels read.

Runs on folded bit layers; a quantized layer that ``fold_scales`` did not see
(the user removed it) is folded per layer first, without merging neighbours.
"""

from __future__ import annotations

from torch import fx

from bitcompiler.passes.graph_utils import finish, module_of, set_module
from bitcompiler.passes.pipeline import fact_check, graph_pass
from bitcompiler.quant.bitlayers import BIT_LAYERS, to_bit_layer
from bitcompiler.quant.modules import QUANT_LAYERS


def run(gm: fx.GraphModule) -> fx.GraphModule:
    for node in gm.graph.nodes:
        m = module_of(gm, node)
        if isinstance(m, QUANT_LAYERS):
            m = to_bit_layer(m)
            set_module(gm, str(node.target), m)
        if isinstance(m, BIT_LAYERS) and not m.packed:
            m.pack()
    return finish(gm)


@fact_check("packed")
def _packed(gm: fx.GraphModule) -> str | None:
    """Every bit layer holds bit-planes (and no quantized layer is left unfolded)."""
    for n in gm.graph.nodes:
        m = module_of(gm, n)
        if isinstance(m, QUANT_LAYERS) or (isinstance(m, BIT_LAYERS) and not m.packed):
            return f"layer `{n.target}` is not packed"
    return None


pack_weights = graph_pass("pack_weights", requires={"quantized"}, ensures={"packed"})(run)
