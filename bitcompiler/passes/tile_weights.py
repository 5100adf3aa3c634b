"""tile_weights: store one tile per tiled layer (METHODS.md §4).

A folded ``BitLinear`` whose codes are one pm1 tile repeated p times (``tiles > 1``, set by the
``tiled`` scheme's quantizer) becomes a :class:`~bitcompiler.methods.tiled.TiledBitLinear` holding
the packed tile (q = N·K/p bits) and p scales. When p divides N the tile is row-aligned (R = N/p
distinct rows) and the kernel computes each distinct row's dot product once.

Layers the scheme wanted tiled but could not (fewer than ``min_weights`` weights, or p does not
divide their size) stay plain binary and are noted for the report; under ``strict=True`` the
second case is an error naming the layer. Tiled convolutions stay binary ``BitConv2d`` layers of
the expanded tile (no tiled conv kernel yet) and are noted. Without this pass, tiled layers compile
as plain binary layers with the same numbers. It runs after ``fold_scales`` (so merged affines
and thresholds are in place); if ``fold_scales`` is removed it folds each layer itself.
"""

from __future__ import annotations

from torch import fx

from bitcompiler.methods.tiled import TiledBitLinear, why_untiled
from bitcompiler.passes.graph_utils import finish, module_of, set_module
from bitcompiler.passes.pipeline import Pass, PassContext, PassError
from bitcompiler.quant import numerics
from bitcompiler.quant.bitlayers import BIT_LAYERS, BitLinear, to_bit_layer
from bitcompiler.quant.modules import QUANT_LAYERS
from bitcompiler.quant.schemes import Scheme


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
            ctx.notes.append((name, f"tiled p={tiles} conv stored expanded (no tiled conv kernel yet)"))
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


def _per_channel(m) -> int:
    if m.op == "linear":
        return m.in_features
    return (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]


# requires only "quantized" (like pack_weights) so that Pipeline.default().without("fold_scales") still runs
tile_weights = Pass("tile_weights", run, frozenset({"quantized"}), frozenset({"tiled"}))
