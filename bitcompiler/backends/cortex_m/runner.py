"""Running a built C bundle: one process per sample, the input and output as raw float32 files.
The Cortex-M firmware (under ``qemu-system-arm``) and the aarch64 program (under ``qemu-aarch64``,
or natively) differ only in how one sample runs and what the executable is called."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np

from bitcompiler.backends.base import Runner
from bitcompiler.backends.cortex_m.bundle import MODEL_FILES


class BundleRunner(Runner):
    """``runner([x])`` runs each sample of the batch; subclasses set ``executable`` and
    ``harness_files`` and run one sample in :meth:`run_one`."""

    executable = ""
    harness_files: tuple[str, ...] | list[str] = ()

    def __init__(self, bundle: Path, in_shape: tuple, out_shape: tuple, extra: dict) -> None:
        self.bundle = bundle
        self.in_shape, self.out_shape = tuple(in_shape), tuple(out_shape)
        self.report_extra = extra

    def run_one(self, x: np.ndarray, n_out: int, count: bool = False) -> Any:
        """The run's result (``.output``, ``.instructions``) for one sample ``x`` (batch 1)."""
        raise NotImplementedError

    def __call__(self, inputs: list[Any]) -> list[np.ndarray]:
        (x,) = (np.asarray(a.numpy() if hasattr(a, "numpy") else a) for a in inputs)
        n_out = int(np.prod(self.out_shape))
        outs = [
            self.run_one(x[i : i + 1].astype(np.float32), n_out).output.reshape(self.out_shape)
            for i in range(x.shape[0])
        ]
        return [np.concatenate(outs, axis=0)]

    def instructions(self, x: np.ndarray) -> int:
        """Instructions the model executes on one sample ``x`` (shape with a batch of 1)."""
        count = self.run_one(x.astype(np.float32), int(np.prod(self.out_shape)), count=True).instructions
        assert count is not None
        return count

    def export(self, directory: Path) -> list[str]:
        names = [*MODEL_FILES, *self.harness_files, self.executable, "shapes.txt"]
        for name in names:
            if (directory / name).resolve() != (self.bundle / name).resolve():
                shutil.copy2(self.bundle / name, directory / name)
        return names
