"""Host CPU backend: LLVM with the detected ``-mcpu``, run by the Relax VM."""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from bitcompiler.backends.base import Backend, Runner, Target

LIB = "model.so"


def relax_pipeline(target: Any) -> Any:
    """TVM's CPU pipeline plus default schedules (dlight, and bitcompiler's element-wise rule) for the
    float ops bitcompiler leaves to Relax.

    The bitc kernels are already scheduled and marked opaque, so fusion and
    dlight leave them as they are.
    """
    import tvm
    from tvm import relax
    from tvm.relax.backend.cpu_generic import pipeline as cpu_generic
    from tvm.s_tir import dlight as dl

    from bitcompiler.backends.exact_float import no_contraction
    from bitcompiler.backends.fast_math import legalize_map
    from bitcompiler.backends.injective import Injective

    @tvm.transform.module_pass(opt_level=0)
    def _pipeline(mod: Any, _ctx: Any) -> Any:
        with target:
            seq = tvm.transform.Sequential(
                # one activation packing per tensor, however many bit layers read it; the float
                # output of a threshold conv whose consumers read its packed variant goes
                [relax.transform.EliminateCommonSubexpr(), relax.transform.DeadCodeElimination()]
                + cpu_generic.library_dispatch_passes(target)
                + [relax.transform.LegalizeOps(customize_legalize_map=legalize_map())]
                + cpu_generic.legalize_passes(target)
                + [dl.ApplyDefaultSchedule(dl.cpu.GEMV(), dl.cpu.Reduction(), Injective())]
                + cpu_generic.dataflow_lower_passes(target)
                + cpu_generic.finalize_passes(target)
                # every float a*b+c rounds twice, as in PyTorch (no FMA contraction)
                + [no_contraction()]
            )
            return seq(mod)

    return _pipeline


class CPURunner(Runner):
    checks_inputs = True  # the VM's entry checks each input's dtype, rank and shape

    def __init__(self, executable: Any, library: Path | None = None) -> None:
        self.library = library  # the .so it was loaded from (a loaded module cannot be saved again)
        import tvm
        from tvm import relax

        self.executable = executable
        self.vm = relax.VirtualMachine(executable, tvm.cpu())
        self._main = self.vm["main"]
        self._tvm = tvm

    def __call__(self, inputs: list[Any]) -> list[Any]:
        # torch tensors go straight in: tvm-ffi converts them (and the results, back to torch
        # tensors) through the C DLPack exchange API, no copies and no Python-side wrapping
        if len(inputs) == 1:  # the common case without a comprehension's frame (~1 µs per call)
            (a,) = inputs
            out = self._main(_aligned(a if isinstance(a, torch.Tensor) else torch.as_tensor(a)))
        else:
            out = self._main(
                *[_aligned(a if isinstance(a, torch.Tensor) else torch.as_tensor(a)) for a in inputs]
            )
        return [out] if isinstance(out, torch.Tensor) else _flatten(out)

    def export(self, directory: Path) -> list[str]:
        if self.library is not None:
            shutil.copyfile(self.library, directory / LIB)
        else:
            with quiet_native_stderr():
                self.executable.export_library(str(directory / LIB))
        return [LIB]


@contextlib.contextmanager
def quiet_native_stderr() -> Iterator[None]:
    """Silence C++ log lines TVM 0.27 prints for every constant when saving or loading an executable."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """TVM takes DLPack data only 64-byte aligned and contiguous (a slice may be neither): copy then."""
    if t.is_contiguous() and t.data_ptr() % 64 == 0:
        return t
    return t.contiguous().clone()


def _flatten(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if hasattr(out, "numpy"):  # a TVM tensor (e.g. an executable called without tensor inputs)
        return [torch.from_dlpack(out)]
    return [t for o in out for t in _flatten(o)]


class CPUBackend(Backend):
    family = "cpu"

    def build(self, mod: Any, target: Target) -> CPURunner:
        import tvm

        tvm_target = target.tvm_target()
        executable = tvm.compile(mod, target=tvm_target, relax_pipeline=relax_pipeline(tvm_target))
        return CPURunner(executable)

    def load(self, directory: Path, target: Target) -> CPURunner:
        import tvm

        with quiet_native_stderr():
            module = tvm.runtime.load_module(str(directory / LIB))
        return CPURunner(module, directory / LIB)
