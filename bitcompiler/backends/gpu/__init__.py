"""GPU backend: targets ``cuda`` (option ``arch``, default sm_80) and ``opencl``.

>>> import torch, bitcompiler as bc
>>> net = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
>>> cm = bc.compile(net, (torch.randn(8, 64),), target="opencl", scheme="binary:act=binary")  # doctest: +SKIP
>>> cm(torch.randn(8, 64)).shape  # doctest: +SKIP
torch.Size([8, 10])

The graph is lowered as for the CPU (:mod:`.lower`: the same TIR compute definitions), scheduled
for the GPU, and turned into a launch plan (:mod:`.build`) that runs without TVM
(:mod:`.runtime`: pyopencl or CuPy). The batch stays dynamic: launch sizes and buffer sizes are
expressions of it, evaluated per batch by the runner (:mod:`.plan`).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from bitcompiler.backends.base import Backend, BuildInput, Capabilities, Runner, Target, register_backend
from bitcompiler.backends.gpu import runtime
from bitcompiler.backends.gpu.target import FAMILIES, PTX_ARCHS, arch_of, check, tvm_target
from bitcompiler.errors import ToolchainError, ToolchainMissing

__all__ = ["FAMILIES", "GPUBackend", "GPURunner", "compile_ptx"]

SOURCE = {"cuda": "kernels.cu", "opencl": "kernels.cl"}
# OpenCL: contract no a*b+c into one rounding (the reference rounds twice)
OPENCL_PRELUDE = "#pragma OPENCL FP_CONTRACT OFF\n"


class GPURunner(Runner):
    """A plan (kernel source, launches, buffers, weights) and, on first call, its device program."""

    def __init__(
        self, plan: dict, source: str, weights: dict[str, np.ndarray], ptx: dict[str, str] | None = None
    ) -> None:
        self.plan, self.source, self.weights = plan, source, weights
        self.ptx = ptx or {}
        self._program: runtime.Program | None = None
        self._dir: tempfile.TemporaryDirectory | None = None

    def __call__(self, inputs: list[Any]) -> list[Any]:
        import torch

        if self._program is None:
            self._dir = tempfile.TemporaryDirectory(prefix="bitc-gpu-")
            self._write(Path(self._dir.name))
            self._program = runtime.load(self._dir.name)
        outs = self._program([x.numpy() for x in inputs])
        return [torch.from_numpy(o) for o in outs]

    def _write(self, directory: Path) -> list[str]:
        (directory / self.plan["source"]).write_text(self.source)
        for arch, text in self.ptx.items():
            (directory / self.plan["ptx"][arch]).write_text(text)
        np.savez(directory / runtime.WEIGHTS, **self.weights)  # type: ignore[arg-type]
        (directory / runtime.PLAN).write_text(json.dumps(self.plan, indent=1))
        return [runtime.PLAN, self.plan["source"], *self.plan.get("ptx", {}).values(), runtime.WEIGHTS]

    def export(self, directory: Path) -> list[str]:
        return self._write(directory)


def compile_ptx(source: str, arch: str) -> str:
    """``source`` (CUDA C) compiled to PTX for ``arch`` by nvcc, without FMA contraction."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise ToolchainMissing("nvcc is not on PATH: install the CUDA toolkit to build PTX")
    with tempfile.TemporaryDirectory(prefix="bitc-ptx-") as d:
        cu, ptx = Path(d) / "kernels.cu", Path(d) / "kernels.ptx"
        cu.write_text(source)
        cmd = [nvcc, "-ptx", f"-arch={arch}", "--fmad=false", "-o", str(ptx), str(cu)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise ToolchainError(
                f"nvcc -arch={arch} failed on the generated CUDA source:\n{done.stderr[-4000:]}"
            )
        return ptx.read_text()


@register_backend
class GPUBackend(Backend):
    """Builds the ``cuda`` and ``opencl`` targets (family ``gpu``)."""

    family = "gpu"
    targets = tuple(FAMILIES)

    def tvm_target(self, target: Target) -> Any:
        return tvm_target(target)

    def capabilities(self, target: Target) -> Capabilities:
        # 32-bit words and popcount on every OpenCL 1.2 / CUDA device; no host SIMD kernels
        return Capabilities(frozenset({"popcount"}), word_bits=32, vector_bits=0)

    def build(self, inp: BuildInput, target: Target) -> GPURunner:
        """Compile the rewritten graph, its batch dynamic where the export kept it so."""
        from bitcompiler.backends.gpu.lower import to_relax_gpu

        check(target)
        mod = to_relax_gpu(inp.exported, "cuda" if target.name == "cuda" else "opencl")
        return self.build_module(mod, target)

    def build_module(self, mod: Any, target: Target) -> GPURunner:
        """The runner of a Relax module ``mod`` (bitc kernels already lowered) on ``target``."""
        from bitcompiler.backends.gpu import build
        from bitcompiler.kernels.gpu import dp4a

        tgt = tvm_target(target)
        scheduled = build.relax_to_scheduled(mod, tgt)
        bufs, calls, inputs, outputs = build.walk_main(scheduled)
        host, device, params = build.lower_kernels(scheduled, tgt, {name for name, _ in calls})
        launches = []
        for call in calls:
            binding = build.call_binding(call[0], scheduled[call[0]], call[1], bufs)
            launches += build.kernel_launches(host, device, params, call, bufs, binding)
        source = build.device_source(host, device, tgt)
        if target.name == "opencl":
            source = OPENCL_PRELUDE + (dp4a.OPENCL_DP4A if dp4a.DP4A in source else "") + source
        plan: dict[str, Any] = {
            "format": runtime.FORMAT,
            "target": target.name,
            "vars": bufs.vars,
            "index_bits": build.INDEX_BITS,
            "source": SOURCE[target.name],
            "weights": runtime.WEIGHTS,
            "buffers": bufs.entries,
            "inputs": inputs,
            "outputs": outputs,
            "launches": launches,
        }
        ptx: dict[str, str] = {}
        if target.name == "cuda":
            plan["arch"] = arch_of(target)
            if shutil.which("nvcc"):
                archs = dict.fromkeys([*PTX_ARCHS, plan["arch"]])
                ptx = {a: compile_ptx(source, a) for a in archs}
            plan["ptx"] = {a: f"kernels.{a}.ptx" for a in ptx}
        return GPURunner(plan, source, bufs.weights, ptx)

    def load(self, directory: Path, target: Target) -> GPURunner:
        plan = runtime.read_plan(directory)
        source = (directory / plan["source"]).read_text()
        ptx = {a: (directory / f).read_text() for a, f in plan.get("ptx", {}).items()}
        with np.load(directory / plan["weights"]) as npz:
            weights = {k: npz[k] for k in npz.files}
        return GPURunner(plan, source, weights, ptx)
