"""tile_weights: store one tile per tiled layer (docs/methods.md §4).

A folded ``BitLinear`` whose codes are one pm1 tile repeated p times (``tiles > 1``, set by the
``tiled`` scheme's quantizer) becomes a :class:`~bitcompiler.quant.tiled_layers.TiledBitLinear` holding
the packed tile (q = N·K/p bits) and p scales. When p divides N the tile is row-aligned (R = N/p
distinct rows) and the kernel computes each distinct row's dot product once.

Layers the scheme wanted tiled but could not (fewer than ``min_weights`` weights, or p does not
divide their size) stay plain binary and are noted for the report; under ``strict=True`` the
second case is an error naming the layer. A tiled convolution (groups 1) whose p divides its
filters becomes a :class:`~bitcompiler.quant.tiled_layers.TiledBitConv2d` (R = O/p filters computed once);
any other tiled conv, and every tiled conv on a target whose backend has no tiled conv kernel
(``Capabilities.missing_kernels``: Cortex-M), stays a binary ``BitConv2d`` of the expanded
tile, and the report says why. Without this pass, tiled layers compile
as plain binary layers with the same numbers. It runs after ``fold_scales`` (so merged affines
and thresholds are in place); if ``fold_scales`` is removed it folds each layer itself.
"""

from __future__ import annotations

from typing import cast

from torch import fx

from bitcompiler.passes.graph_utils import finish, module_of, set_module
from bitcompiler.passes.pipeline import PassContext, PassError, fact_check, graph_pass
from bitcompiler.quant import numerics
from bitcompiler.quant.bitlayers import BIT_LAYERS, BitConv2d, BitLinear, to_bit_layer
from bitcompiler.quant.modules import QUANT_LAYERS
from bitcompiler.quant.schemes import Scheme
from bitcompiler.quant.tiled_layers import TiledBitConv2d, TiledBitLinear, why_untiled
from bitcompiler.target import Target


def _tiled_scheme(label: str) -> Scheme | None:
    try:
        s = Scheme.parse(label)
    except ValueError:
        return None
    return s if s.name == "tiled" else None


def run(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    for node in gm.graph.nodes:
        m = module_of(gm, node)
        if isinstance(m, QUANT_LAYERS):  # fold_scales was removed: fold per layer, as pack_weights does
            m = to_bit_layer(m)
            set_module(gm, str(node.target), m)
        if not isinstance(m, BIT_LAYERS):
            continue
        name = str(node.target)
        tiles = getattr(m, "tiles", 1)
        if tiles > 1 and isinstance(m, BitLinear):
            set_module(gm, name, TiledBitLinear(m, tiles))
            kind = "row-aligned" if numerics.row_aligned(m.out_features, tiles) else "unaligned"
            ctx.notes.append((name, f"tiled p={tiles} ({kind})"))
        elif tiles > 1:
            why = _why_conv_expanded(m, tiles, ctx.target)
            if why is None:
                set_module(gm, name, TiledBitConv2d(cast(BitConv2d, m), tiles))
                ctx.notes.append((name, f"tiled p={tiles} (row-aligned)"))
            else:
                ctx.notes.append((name, f"tiled p={tiles} conv stored expanded ({why})"))
        elif (scheme := _tiled_scheme(m.label)) is not None:
            numel = m.codes.numel() if m.codes is not None else m.scale.shape[0] * _per_channel(m)
            reason = why_untiled(numel, int(scheme.get("p")), int(scheme.get("min_weights")))
            if reason and "does not divide" in reason and ctx.strict:
                raise PassError(
                    "tile_weights",
                    f"layer {name!r}: {reason}; pass strict=False to keep it binary",
                    node=node.name,
                )
            if reason:
                ctx.notes.append((name, reason))
    return finish(gm)


def _why_conv_expanded(m, p: int, target: Target) -> str | None:
    """Why a tiled conv stays a binary conv of the expanded tile, or None when it gets a tiled kernel."""
    if not target.capabilities.has_kernel("tiled_conv2d"):
        return f"no tiled conv kernel for {target.name} yet"
    if m.groups != 1:
        return f"groups={m.groups}: the tiled conv kernel takes groups=1"
    if not numerics.row_aligned(m.out_channels, p):
        return f"p={p} does not divide its {m.out_channels} filters (not row-aligned)"
    return None


def _per_channel(m) -> int:
    if m.op == "linear":
        return m.in_features
    return (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]


# requires only "quantized" (like pack_weights) so that Pipeline.default().without("fold_scales") still runs
@fact_check("tiled")
def _tiled(gm: fx.GraphModule, ctx: PassContext) -> str | None:
    """A layer given tiles is a tiled layer, or a note says why it is stored expanded."""
    noted = {str(name) for name, _ in ctx.notes}
    for n in gm.graph.nodes:
        m = module_of(gm, n)
        if isinstance(m, BIT_LAYERS) and getattr(m, "tiles", 1) > 1 and str(n.target) not in noted:
            return f"layer `{n.target}` has p={m.tiles} tiles but is neither tiled nor noted"
    return None


tile_weights = graph_pass("tile_weights", requires={"quantized"}, ensures={"tiled"})(run)
