"""TVM's TIR lowering of a model's kernels on every core: the compile step that took most of a cold
ResNet-18 compile's kernel build.

``tvm.compile`` lowers every PrimFunc of the module (TVM's default ``s_tir`` pipeline: simplify,
flatten, vectorize, hoist, unroll, packed API) in one thread before LLVM makes the machine code.
The PrimFuncs of a compiled model are independent of each other, and TVM's passes release
Python's lock while they run, so :func:`register` adds a TIR pipeline, :data:`NAME`, that lowers
the module in chunks on a thread pool and merges the results: the same passes on the same
functions, so the same lowered module as the default pipeline's, function for function. The
finalization passes and LLVM stay as TVM runs them.

It goes through TVM's public registry (``tvm.tirx.register_tir_pipeline``) and the ``tir_pipeline``
argument of ``tvm.compile``; nothing of TVM is patched. Each chunk holds two functions or more:
TVM's ``AnnotateEntryFunc`` marks a module's only function as its entry, which the whole module
never has. Threads: one per core this process may use (:func:`workers`), at most
:data:`MAX_WORKERS`.

Measured on a 2-core Xeon (binary ResNet-18, CIFAR): the TIR build of its 25 kernels 3.6 s on one
thread, 2.3 s on two.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

NAME = "bitc_parallel"
MAX_WORKERS = 8


def workers() -> int:
    """Threads for the lowering: the cores this process may run on, at most :data:`MAX_WORKERS`."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity on this platform
        cores = os.cpu_count() or 1
    return max(1, min(cores, MAX_WORKERS))


def chunks(functions: list, n: int) -> list[list]:
    """``functions`` dealt round-robin into at most ``n`` chunks of two or more (one chunk when
    there are fewer than four)."""
    n = max(1, min(n, len(functions) // 2))
    return [functions[i::n] for i in range(n)]


def register() -> str:
    """Register the pipeline with TVM (once) and return its name for ``tvm.compile``'s ``tir_pipeline``."""
    from tvm.tirx import compilation_pipeline

    if NAME not in compilation_pipeline.PIPELINE_MAP:
        compilation_pipeline.register_tir_pipeline(NAME, _factory)
    return NAME


def _factory() -> tuple[Any, Any, Any]:
    import tvm
    from tvm.tirx import compilation_pipeline

    lower, finalize_host, finalize_device = compilation_pipeline.get_tir_pipeline("default")

    @tvm.transform.module_pass(opt_level=0, name="bitc_parallel_tir")
    def _pipeline(mod: Any, _ctx: Any) -> Any:
        parts = chunks(list(mod.functions.items()), workers())
        if len(parts) < 2:
            return lower(mod)
        ctx = tvm.transform.PassContext.current()

        def run(part: list) -> Any:
            with ctx:  # the caller's configuration, in this thread too
                return lower(tvm.IRModule(dict(part), attrs=mod.attrs))

        with ThreadPoolExecutor(len(parts), thread_name_prefix="bitc-tir") as pool:
            done = list(pool.map(run, parts))
        merged = {gv: f for part in done for gv, f in part.functions.items()}
        return tvm.IRModule(merged, attrs=done[0].attrs)

    return _pipeline, finalize_host, finalize_device
