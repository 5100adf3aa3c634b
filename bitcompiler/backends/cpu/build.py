"""Building for the CPU through the compile cache, with the tuning records applied (or made first).

An unchanged graph on the same target, with the same tuning records, is loaded from the cache
(:mod:`bitcompiler.cache`), not rebuilt; how tuning works: :mod:`bitcompiler.tuning`.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

from bitcompiler import cache
from bitcompiler.backends.base import BuildInput, Target
from bitcompiler.backends.cpu import parallel_build
from bitcompiler.backends.cpu.pipeline import kernel_passes, relax_pipeline
from bitcompiler.backends.cpu.runner import LIB, CPURunner, quiet_native_stderr
from bitcompiler.backends.lower import to_relax


def compile_relax(mod: Any, target: Target) -> parallel_build.Built:
    """The Relax module ``mod`` compiled for ``target`` (not yet machine code), its kernels built on
    every core (:mod:`bitcompiler.backends.cpu.parallel_build`)."""
    tvm_target = target.tvm_target()
    return parallel_build.compile_relax(mod, tvm_target, relax_pipeline(tvm_target))


def build_relax(mod: Any, target: Target) -> CPURunner:
    """The Relax module ``mod`` compiled for ``target`` (no cache; LLVM's JIT makes its machine code)."""
    return CPURunner(compile_relax(mod, target).executable())


def write_library(built: parallel_build.Built, directory: Path) -> None:
    """The compiled model's machine code as ``directory/model.so`` (LLVM makes it here)."""
    with quiet_native_stderr():
        built.export(str(directory / LIB))


def load_library(directory: Path) -> CPURunner:
    import tvm

    with quiet_native_stderr():
        module = tvm.runtime.load_module(str(directory / LIB))
    return CPURunner(module, directory / LIB)


def _kernels(inp: BuildInput, target: Target) -> Any:
    """The Relax module with every bit kernel a compile builds (the fused ones too), not compiled."""
    import tvm

    tvm_target = target.tvm_target()
    with tvm_target:
        return tvm.transform.Sequential(kernel_passes(tvm_target))(
            to_relax(inp.exported, target, deferred=True)
        )


def build_cached(inp: BuildInput, target: Target) -> CPURunner:
    """Build through the compile cache. Tunes first when ``inp.tune`` asks for it."""
    from bitcompiler.kernels.template import scheduling_with
    from bitcompiler.tuning import search as tuner

    tvm_target = target.tvm_target()
    database, where = tuner.open_database(inp.db, create=inp.tune is not None)
    records = tuner.Records(database, tvm_target, inp.example_inputs[0].shape[0])
    extra: dict[str, float] = {}
    if inp.tune is not None:
        kernels = tuner.kernels_of(lambda: _kernels(inp, target))
        extra["tuning s"] = tuner.tune_kernels(kernels, records, inp.tune, where)
    try:
        entry: str | None = cache.key(inp.exported, str(target) + str(tvm_target) + records.fingerprint())
    except Exception as e:  # noqa: BLE001 - the cache is an optimization: never a reason to fail
        warnings.warn(
            f"compile cache skipped (could not hash the graph: {e}); compiling uncached", stacklevel=4
        )
        entry = None

    def load(path: Path) -> CPURunner:
        loaded = load_library(path)
        loaded.report_extra = {**extra, **json.loads((path / "tuning.json").read_text())}
        return loaded

    hit = cache.lookup(entry, load) if entry is not None else None
    if isinstance(hit, CPURunner):
        hit.cache_hit = True
        return hit
    with scheduling_with(records):  # (the pipeline builds the conv kernels a fusion may replace)
        mod = to_relax(inp.exported, target, deferred=True)  # the CPU pipeline builds the stubs
        built = compile_relax(mod, target)
    applied = {"tuned kernels": len(records.applied), "kernel tuning": built.tuning}

    def write(path: Path) -> None:
        write_library(built, path)
        (path / "tuning.json").write_text(json.dumps(applied))

    if entry is not None:
        # LLVM makes the machine code once, for the cached library, and the runner loads that
        # library: running the executable directly would make it a second time (a JIT), which took
        # a fifth of ResNet-18's cold compile
        cache.store(entry, write)
        stored = cache.lookup(entry, load)
        if isinstance(stored, CPURunner):
            stored.report_extra = {**extra, **applied}
            return stored
    runner = CPURunner(built.executable())
    runner.report_extra = {**extra, **applied}
    return runner
