"""Running a built C bundle: one process per sample, the input and output as raw float32 files.

The Cortex-M firmware (under ``qemu-system-arm``) and the aarch64 program (under ``qemu-aarch64``,
or natively) are the same ahead-of-time C program; they differ only in their :class:`Toolchain`
(what the executable is called, the harness files, how a bundle is built and one sample runs) and
in the device a target names (a board, a core). :class:`BundleBackend` is what both backends share.
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from abc import abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from bitcompiler.backends.base import Backend, Runner, Target
from bitcompiler.backends.cortex_m.bundle import MODEL_FILES


@dataclass(frozen=True)
class Toolchain:
    """How a bundle becomes a program and runs: ``build(bundle) -> executable path``;
    ``run(device, exe, x, n_out, count=...)``: the result (``.output``, ``.instructions``) of
    one sample ``x`` (batch 1)."""

    executable: str
    harness_files: tuple[str, ...]
    build: Callable[[Path], Path]
    run: Callable[..., Any]


class BundleRunner(Runner):
    """``runner([x])`` runs each sample of the batch on ``device`` (a board or a core)."""

    def __init__(
        self, tools: Toolchain, device: Any, bundle: Path, in_shape: tuple, out_shape: tuple
    ) -> None:
        self.tools, self.device, self.bundle = tools, device, bundle
        self.exe = bundle / tools.executable
        self.in_shape, self.out_shape = tuple(in_shape), tuple(out_shape)
        self.report_extra: dict[str, Any] = {}

    def run_one(self, x: np.ndarray, n_out: int, count: bool = False) -> Any:
        """The run's result (``.output``, ``.instructions``) for one sample ``x`` (batch 1)."""
        return self.tools.run(self.device, self.exe, x, n_out, count=count)

    def run_example(self, example_inputs: tuple, count: bool) -> Any:
        """The run of the first sample of ``example_inputs`` (a build runs its program once)."""
        x = example_inputs[0][:1].detach().cpu().numpy().astype(np.float32)
        return self.run_one(x, int(np.prod(self.out_shape)), count=count)

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
        names = [*MODEL_FILES, *self.tools.harness_files, self.tools.executable, "shapes.txt"]
        for name in names:
            if (directory / name).resolve() != (self.bundle / name).resolve():
                shutil.copy2(self.bundle / name, directory / name)
        return names


class BundleBackend(Backend):
    """A backend that builds the ahead-of-time C program into a bundle folder (kernels from TVM's
    C code generator) and runs it with its ``tools`` on the device ``device(target)`` names."""

    tools: ClassVar[Toolchain]

    @abstractmethod
    def device(self, target: Target) -> Any:
        """What runs the program: the target's board or core."""

    def tvm_target(self, target: Target) -> Any:
        import tvm

        return tvm.target.Target({"kind": "c"})

    def _runner(self, target: Target, in_shape: tuple, out_shape: tuple) -> BundleRunner:
        """A runner in a new, empty bundle folder that is removed with it."""
        bundle = Path(tempfile.mkdtemp(prefix=f"bitc-{target.name}-"))
        runner = BundleRunner(self.tools, self.device(target), bundle, in_shape, out_shape)
        weakref.finalize(runner, shutil.rmtree, bundle, True)
        return runner

    def runner_for(self, target: Target, program: Any) -> BundleRunner:
        """The runner of ``program`` (an AOT ``Program``), its bundle folder still to be written."""
        runner = self._runner(target, program.input.shape, program.output.shape)
        (runner.bundle / "shapes.txt").write_text(f"{list(runner.in_shape)}\n{list(runner.out_shape)}\n")
        return runner

    def load(self, directory: Path, target: Target) -> BundleRunner:
        """The runner of a bundle :meth:`BundleRunner.export` wrote into ``directory``, built again."""
        lines = (directory / "shapes.txt").read_text().splitlines()
        in_shape, out_shape = (tuple(int(v) for v in line.strip("[]").split(",")) for line in lines[:2])
        runner = self._runner(target, in_shape, out_shape)
        for name in [*MODEL_FILES, *self.tools.harness_files, "shapes.txt"]:
            shutil.copy2(directory / name, runner.bundle / name)
        self.tools.build(runner.bundle)
        return runner
