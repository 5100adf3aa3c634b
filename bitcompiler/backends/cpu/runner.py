"""The CPU backend's runner: a Relax VM executable called with torch tensors."""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from bitcompiler.backends.base import Runner

LIB = "model.so"
# the executable's function saying its kernels reject NaN/Inf inputs (bitcompiler.kernels.finite's
# SYMBOL; not imported from there: loading an exported model must not import TVM's kernel modules)
CHECKS_FINITE = "bitc_checks_finite"


class CPURunner(Runner):
    checks_inputs = True  # the VM's entry checks each input's dtype, rank and shape

    def __init__(self, executable: Any, library: Path | None = None) -> None:
        self.library = library  # the .so it was loaded from (a loaded module cannot be saved again)
        self.cache_hit = False  # loaded from the compile cache
        self.report_extra: dict[str, Any] = {}  # figures for the report (tuning)
        import tvm
        from tvm import relax

        from bitcompiler.amx import enable

        enable()  # its AMX kernels, if any, need the tile state (bitcompiler/amx.py)
        self.executable = executable
        self.vm = relax.VirtualMachine(executable, tvm.cpu())
        self._main = self.vm["main"]
        self._tvm = tvm
        # the kernels raise on NaN or Inf in every float input themselves (kernels/finite.py)
        self.checks_finite = _flag(self.vm, CHECKS_FINITE)
        # main with the batch bound to 1, where the pipeline made one (pipeline.batch_one_entry)
        self._main1 = _function(self.vm, "main_b1") or self._main
        self.entries = (self._main, self._main1)  # indexed by "batch is 1"

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

    def call_one(self, x: torch.Tensor) -> torch.Tensor:
        """One CPU tensor in, one tensor out: ``cm(x)``'s short path."""
        out = (self._main1 if x.shape[0] == 1 else self._main)(_aligned(x))
        return out if isinstance(out, torch.Tensor) else _flatten(out)[0]

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


def _function(vm: Any, name: str) -> Any:
    """The executable's function ``name`` (None where it has none: built before it existed)."""
    try:
        return vm[name]
    except (AttributeError, KeyError, RuntimeError, ValueError):
        return None


def _flag(vm: Any, name: str) -> bool:
    """The value of the executable's function ``name`` (False where it has none)."""
    f = _function(vm, name)
    return f is not None and bool(f())


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
