"""lower_bit_ops: packed bit layers -> ``bitc`` custom-op calls.

Average pooling becomes ``bitc::window_mean``, a leftover BatchNorm a multiply then an add, and
sigmoid/tanh ``bitc::exact_unary`` (``exact_floats``): the float ops between quantized layers in an
order every backend repeats.
The graph stays runnable in PyTorch (the ops' CPU implementation is the
reference numerics) and is what ``torch.export`` hands the TVM frontend.
"""

from __future__ import annotations

from torch import fx, nn

from bitcompiler.passes.graph_utils import module_of
from bitcompiler.passes.pipeline import PassContext, fact_check, graph_pass
from bitcompiler.passes.rewrites import exact_floats
from bitcompiler.quant.bitlayers import BIT_LAYERS
from bitcompiler.quant.tiled_layers import TILED_LAYERS


def run(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    # only int8 / binary activations make a promise of exactness (docs/guide.md, "Exactness")
    if any(isinstance(m, (*BIT_LAYERS, *TILED_LAYERS)) and m.act != "float" for m in gm.modules()):
        gm = exact_floats.run(gm, ctx)
    for node in list(gm.graph.nodes):
        m = module_of(gm, node)
        if isinstance(m, TILED_LAYERS) or (isinstance(m, BIT_LAYERS) and m.packed):
            _lower_layer(gm, node, m)
    gm.graph.lint()
    gm.recompile()
    return gm


def _lower_layer(gm: fx.GraphModule, node: fx.Node, m: nn.Module) -> None:
    """``node`` (a call of layer ``m``) -> a call of its bitc op, the buffers as graph attributes."""
    attrs = m.attrs()  # type: ignore[operator]
    with gm.graph.inserting_before(node):
        tensors = {t: gm.graph.get_attr(f"{node.target}.{t}") for t in attrs.TENSORS}
        call = gm.graph.call_function(attrs.overload(), attrs.op_args(node.args[0], tensors))
    call.meta = dict(node.meta)
    node.replace_all_uses_with(call)
    gm.graph.erase_node(node)


@fact_check("bitc_ops")
def _bitc_ops(gm: fx.GraphModule) -> str | None:
    """No bit or tiled layer module is called any more: each is a ``bitc`` op call."""
    for n in gm.graph.nodes:
        if isinstance(module_of(gm, n), (*BIT_LAYERS, *TILED_LAYERS)):
            return f"layer `{n.target}` is still a module call"
    return None


lower_bit_ops = graph_pass("lower_bit_ops", requires={"packed"}, ensures={"bitc_ops"})(run)
