"""lower_bit_ops: packed bit layers -> ``bitc`` custom-op calls.

Average pooling becomes ``bitc::window_mean`` and a leftover BatchNorm a multiply then an add
(``exact_floats``): the float ops between quantized layers in an order every backend repeats.
The graph stays runnable in PyTorch (the ops' CPU implementation is the
reference numerics) and is what ``torch.export`` hands the TVM frontend.
"""

from __future__ import annotations

import torch
from torch import fx

from bitcompiler.methods.tiled import TILED_LAYERS, TiledBitConv2d, TiledBitLinear
from bitcompiler.passes import exact_floats
from bitcompiler.passes.graph_utils import module_of
from bitcompiler.passes.pipeline import Pass, PassContext
from bitcompiler.quant.bitlayers import BIT_LAYERS, BitLinear

_TENSORS = ("planes", "scale", "offset", "bias", "thr_sign", "thr")


def run(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    # only int8 / binary activations make a promise of exactness (docs/guide.md, "Exactness")
    if any(isinstance(m, (*BIT_LAYERS, *TILED_LAYERS)) and m.act != "float" for m in gm.modules()):
        gm = exact_floats.run(gm, ctx)
    for node in list(gm.graph.nodes):
        m = module_of(gm, node)
        if isinstance(m, TILED_LAYERS):
            _lower_tiled(gm, node, m)
            continue
        if not isinstance(m, BIT_LAYERS) or not m.packed:
            continue
        op = (
            torch.ops.bitc.bit_linear.default
            if isinstance(m, BitLinear)
            else torch.ops.bitc.bit_conv2d.default
        )
        with gm.graph.inserting_before(node):
            tensors = [gm.graph.get_attr(f"{node.target}.{t}") for t in _TENSORS]
            call = gm.graph.call_function(op, (node.args[0], *tensors, *m.op_args().values()))
        call.meta = dict(node.meta)
        node.replace_all_uses_with(call)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    return gm


def _lower_tiled(gm: fx.GraphModule, node: fx.Node, m: TiledBitLinear | TiledBitConv2d) -> None:
    with gm.graph.inserting_before(node):
        tensors = [
            gm.graph.get_attr(f"{node.target}.{t}") for t in ("tile", "scale", "bias", "thr_sign", "thr")
        ]
        op = (
            torch.ops.bitc.tiled_linear.default
            if isinstance(m, TiledBitLinear)
            else torch.ops.bitc.tiled_conv2d.default
        )
        call = gm.graph.call_function(op, (node.args[0], *tensors, *m.op_args().values()))
    call.meta = dict(node.meta)
    node.replace_all_uses_with(call)
    gm.graph.erase_node(node)


lower_bit_ops = Pass("lower_bit_ops", run, frozenset({"packed"}), frozenset({"bitc_ops"}))
