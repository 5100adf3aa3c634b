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

from typing import Any

from bitcompiler.backends.aarch64 import dense, toolchain
from bitcompiler.backends.aarch64.bundle import HARNESS_FILES, write_bundle
from bitcompiler.backends.aarch64.cores import core_for
from bitcompiler.backends.base import BuildInput, Capabilities, Target, register_backend
from bitcompiler.backends.cortex_m.aot import build_program
from bitcompiler.backends.cortex_m.runner import BundleBackend, BundleRunner, Toolchain
from bitcompiler.errors import CortexMLoweringError, LoweringError

__all__ = ["Aarch64Backend"]


@register_backend
class Aarch64Backend(BundleBackend):
    family = "aarch64"
    targets = ("aarch64",)
    tools = Toolchain("app", tuple(HARNESS_FILES), toolchain.build, toolchain.run)

    def device(self, target: Target) -> Any:
        return core_for(target)

    def capabilities(self, target: Target) -> Capabilities:
        core = core_for(target)
        return Capabilities(
            core.features | {"fpu"},
            word_bits=64,
            vector_bits=128,
            # the tiled conv is stored expanded (a binary conv): no two-stage conv in the AOT program
            missing_kernels=frozenset({"tiled_conv2d"}),
        )

    def build(self, inp: BuildInput, target: Target) -> BundleRunner:
        """The Cortex-M AOT program from the rewritten graph, built for the core and run once."""
        core = core_for(target)
        count = bool(target.get("count_instructions", True))
        toolchain.require_toolchain(count)
        try:
            program = build_program(inp.graph, inp.example_inputs, self.tvm_target(target), dense.Builder)
        except CortexMLoweringError as e:  # the same AOT program: name this target in the message
            raise LoweringError(str(e).replace("Cortex-M", "aarch64")) from e
        runner = self.runner_for(target, program)
        write_bundle(program, core, runner.bundle)
        self.tools.build(runner.bundle)
        result = runner.run_example(inp.example_inputs, count)
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
