"""Named graph rewrites and the pipeline that runs them (see ``pipeline.py``).

Passes live in ``bitcompiler/passes/`` (not a top-level ``passes`` package) so
that ``import passes`` never clashes with another distribution.
"""

from bitcompiler.passes.canonicalize import canonicalize
from bitcompiler.passes.fold_batchnorm import fold_batchnorm
from bitcompiler.passes.fold_scales import fold_scales
from bitcompiler.passes.insert_quantizers import insert_quantizers
from bitcompiler.passes.lower_bit_ops import lower_bit_ops
from bitcompiler.passes.pack_weights import pack_weights
from bitcompiler.passes.pipeline import (
    Pass,
    PassContext,
    PassError,
    Pipeline,
    PipelineError,
    check_order,
    graph_pass,
    verify_graph,
)
from bitcompiler.passes.tile_weights import tile_weights

__all__ = [
    "Pass",
    "PassContext",
    "PassError",
    "Pipeline",
    "PipelineError",
    "canonicalize",
    "check_order",
    "fold_batchnorm",
    "fold_scales",
    "graph_pass",
    "insert_quantizers",
    "lower_bit_ops",
    "pack_weights",
    "tile_weights",
    "verify_graph",
]
