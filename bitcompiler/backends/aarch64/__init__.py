"""aarch64 backend (Cortex-A53/A72/A76, Linux): the Cortex-M ahead-of-time C program (static
memory plan, kernels from TVM's C code generator, no TVM runtime) with NEON popcount kernels,
built with ``aarch64-linux-gnu-gcc -O3 -mcpu=<core>`` and run under ``qemu-aarch64`` (natively
on an aarch64 Linux host).

>>> import torch, bitcompiler as bc                                   # doctest: +SKIP
>>> net = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
>>> cm = bc.compile(net, (torch.randn(1, 64),), target="aarch64", scheme="binary:act=binary")
>>> cm(torch.randn(2, 64)).shape                                      # under qemu-aarch64
torch.Size([2, 10])
>>> cm.report().extra["instructions"] > 0
True
>>> cm.export("out/")  # model.c/h, kernels.c/h, weights.c/h + main.c, Makefile, README

Options: ``Target("aarch64", mcpu="cortex-a53"|"cortex-a72"|"cortex-a76", count_instructions=True)``.
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Any

import numpy as np

from bitcompiler.backends.aarch64 import dense, toolchain
from bitcompiler.backends.aarch64.bundle import HARNESS_FILES, write_bundle
from bitcompiler.backends.aarch64.cores import Core, core_for
from bitcompiler.backends.base import Backend, BuildInput, Capabilities, Target, register_backend
from bitcompiler.backends.cortex_m.aot import build_program
from bitcompiler.backends.cortex_m.bundle import MODEL_FILES
from bitcompiler.backends.cortex_m.runner import BundleRunner
from bitcompiler.errors import CortexMLoweringError, LoweringError

__all__ = ["Aarch64Backend", "Aarch64Runner"]


class Aarch64Runner(BundleRunner):
    """A built program: ``runner([x])`` runs each sample of the batch (one process per sample)."""

    executable = "app"
    harness_files = HARNESS_FILES

    def __init__(self, core: Core, bundle: Path, in_shape: tuple, out_shape: tuple, extra: dict) -> None:
        super().__init__(bundle, in_shape, out_shape, extra)
        self.core = core
        self.exe = bundle / self.executable

    def run_one(self, x: np.ndarray, n_out: int, count: bool = False) -> Any:
        return toolchain.run(self.core, self.exe, x, n_out, count=count)


@register_backend
class Aarch64Backend(Backend):
    family = "aarch64"
    targets = ("aarch64",)

    def tvm_target(self, target: Target) -> Any:
        import tvm

        return tvm.target.Target({"kind": "c"})

    def capabilities(self, target: Target) -> Capabilities:
        core = core_for(target)
        return Capabilities(
            core.features | {"fpu"},
            word_bits=64,
            vector_bits=128,
            # the tiled conv is stored expanded (a binary conv): no two-stage conv in the AOT program
            missing_kernels=frozenset({"tiled_conv2d"}),
        )

    def build(self, inp: BuildInput, target: Target) -> Aarch64Runner:
        """The Cortex-M AOT program from the rewritten graph, built for the core and run once."""
        core = core_for(target)
        count = bool(target.get("count_instructions", True))
        toolchain.require_toolchain(count)
        try:
            program = build_program(inp.graph, inp.example_inputs, self.tvm_target(target), dense.Builder)
        except CortexMLoweringError as e:  # the same AOT program: name this target in the message
            raise LoweringError(str(e).replace("Cortex-M", "aarch64")) from e
        bundle = Path(tempfile.mkdtemp(prefix="bitc-aarch64-"))
        runner = Aarch64Runner(core, bundle, program.input.shape, program.output.shape, {})
        weakref.finalize(runner, shutil.rmtree, bundle, True)
        write_bundle(program, core, bundle)
        (bundle / "shapes.txt").write_text(f"{list(program.input.shape)}\n{list(program.output.shape)}\n")
        toolchain.build(bundle)
        x = inp.example_inputs[0][:1].detach().cpu().numpy().astype(np.float32)
        result = toolchain.run(core, runner.exe, x, program.output.numel, count=count)
        runner.report_extra.update(
            {
                "mcpu": core.name,
                "instructions": result.instructions if count else "not measured (count_instructions=False)",
                "arena_bytes": program.plan.arena_bytes,
                "arena_naive_bytes": program.plan.naive_bytes,
                "weights_bytes": program.weight_bytes,
            }
        )
        return runner

    def load(self, directory: Path, target: Target) -> Aarch64Runner:
        core = core_for(target)
        bundle = Path(tempfile.mkdtemp(prefix="bitc-aarch64-"))
        for name in [*MODEL_FILES, *HARNESS_FILES, "shapes.txt"]:
            shutil.copy2(directory / name, bundle / name)
        lines = (bundle / "shapes.txt").read_text().splitlines()
        in_shape, out_shape = (tuple(int(v) for v in line.strip("[]").split(",")) for line in lines[:2])
        runner = Aarch64Runner(core, bundle, in_shape, out_shape, {})
        weakref.finalize(runner, shutil.rmtree, bundle, True)
        toolchain.build(bundle)
        return runner
