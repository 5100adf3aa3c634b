"""fold_batchnorm: BatchNorm (eval statistics) into the layer before it.

Into the float weights of a ``Linear``/``Conv2d`` (before quantization, so the
quantizer sees the folded scale), or into the post affine of an already
quantized (``prepare``d) layer, which ``fold_scales`` merges into the integer
epilogue.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from bitcompiler.passes.graph_utils import finish, module_of, set_module
from bitcompiler.passes.pipeline import fact_check, graph_pass
from bitcompiler.quant.modules import QUANT_LAYERS

_BN = (nn.BatchNorm1d, nn.BatchNorm2d)


def bn_affine(bn: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``bn(y) == scale·y + shift`` per channel, from running statistics."""
    inv = torch.rsqrt(bn.running_var + bn.eps)
    gamma = bn.weight.detach() if bn.weight is not None else torch.ones_like(inv)
    beta = bn.bias.detach() if bn.bias is not None else torch.zeros_like(inv)
    scale = gamma * inv
    return scale, beta - bn.running_mean * scale


def run(gm: fx.GraphModule) -> fx.GraphModule:
    for node in list(gm.graph.nodes):
        bn = module_of(gm, node)
        if not isinstance(bn, _BN) or bn.running_mean is None:
            continue
        prev = node.args[0]
        layer = module_of(gm, prev) if isinstance(prev, fx.Node) else None
        if layer is None or len(prev.users) != 1:
            continue
        if isinstance(layer, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
            set_module(gm, str(prev.target), fuse_conv_bn_eval(layer.eval(), bn.eval()))
        elif isinstance(layer, nn.Linear) and isinstance(bn, nn.BatchNorm1d):
            set_module(gm, str(prev.target), fuse_linear_bn_eval(layer.eval(), bn.eval()))
        elif isinstance(layer, QUANT_LAYERS):
            layer.set_post_affine(*bn_affine(bn))
        else:
            continue
        node.replace_all_uses_with(prev)
        gm.graph.erase_node(node)
    return finish(gm)


@fact_check("bn_folded")
def _bn_folded(gm: fx.GraphModule) -> str | None:
    """No BatchNorm left right after a layer it folds into (the layer's only use). A BatchNorm
    after anything else (an add, a ReLU: pre-activation nets) stays, a float op of the report."""
    for node in gm.graph.nodes:
        bn, prev = module_of(gm, node), node.args[0] if node.args else None
        if not isinstance(bn, _BN) or bn.running_mean is None or not isinstance(prev, fx.Node):
            continue
        layer = module_of(gm, prev)
        foldable = (isinstance(layer, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)) or (
            isinstance(layer, nn.Linear) and isinstance(bn, nn.BatchNorm1d)
        )
        if (foldable or isinstance(layer, QUANT_LAYERS)) and len(prev.users) == 1:
            return f"BatchNorm `{node.name}` after `{prev.name}` is not folded"
    return None


fold_batchnorm = graph_pass("fold_batchnorm", requires={"canonical"}, ensures={"bn_folded"})(run)
