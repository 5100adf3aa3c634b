"""Named graph rewrites and the pipeline that runs them (see ``pipeline.py``).

Passes live in ``bitcompiler/passes/`` (not a top-level ``passes`` package) so
that ``import passes`` never clashes with another distribution.
"""

from bitcompiler.passes.pipeline import (
    Pass,
    PassContext,
    PassError,
    Pipeline,
    PipelineError,
    check_facts,
    check_order,
    checked_facts,
    fact_check,
    graph_pass,
    set_default_passes,
    verify_graph,
)
from bitcompiler.passes.rewrites.canonicalize import canonicalize
from bitcompiler.passes.rewrites.fold_batchnorm import fold_batchnorm
from bitcompiler.passes.rewrites.fold_scales import fold_scales
from bitcompiler.passes.rewrites.insert_quantizers import insert_quantizers
from bitcompiler.passes.rewrites.lower_bit_ops import lower_bit_ops
from bitcompiler.passes.rewrites.pack_weights import pack_weights
from bitcompiler.passes.rewrites.tile_weights import tile_weights

DEFAULT_PASSES = (
    # float graph clean-up: one canonical form for everything after
    canonicalize,
    # BN folds into float weights before quantization so α sees the folded scale
    fold_batchnorm,
    insert_quantizers,
    # integer codes + per-channel affine; merges affines, BN+sign -> integer thresholds
    fold_scales,
    # one tile + p scales per tiled layer; before packing so only the tile is packed
    tile_weights,
    pack_weights,
    # last: bitc custom ops are what the TVM frontend converts
    lower_bit_ops,
)
set_default_passes(DEFAULT_PASSES)

__all__ = [
    "DEFAULT_PASSES",
    "Pass",
    "PassContext",
    "PassError",
    "Pipeline",
    "PipelineError",
    "canonicalize",
    "check_facts",
    "check_order",
    "checked_facts",
    "fact_check",
    "fold_batchnorm",
    "fold_scales",
    "graph_pass",
    "insert_quantizers",
    "lower_bit_ops",
    "pack_weights",
    "tile_weights",
    "verify_graph",
]
