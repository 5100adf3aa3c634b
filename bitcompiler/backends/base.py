"""Targets and the backend interface shared by cpu, cuda and cortex-m.

A backend turns the target-independent Relax ``IRModule`` (bitc kernels as
plain TIR, no packed-function calls) into something that runs: a shared
library on the host, a CUDA module, or a C bundle with a static memory plan.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bitcompiler.errors import TargetError

FAMILIES = {
    "cpu": "cpu",
    "cuda": "cuda",  # gpu.GPUBackend, options: arch (sm_75 and newer, default sm_80)
    "opencl": "opencl",  # gpu.GPUBackend
    "cortex-m3": "cortex-m",
    "cortex-m4": "cortex-m",
    "cortex-m7": "cortex-m",
    "cortex-m55": "cortex-m",
}


@dataclass(frozen=True)
class Target:
    """Where compiled code runs. ``Target("cpu")`` is the host (LLVM, detected ``-mcpu``).

    >>> Target("cpu").family
    'cpu'
    """

    name: str = "cpu"
    options: tuple[tuple[str, Any], ...] = field(default=())

    def __init__(self, name: str = "cpu", **options: Any) -> None:
        if name not in FAMILIES:
            raise TargetError(f"unknown target {name!r}; valid targets: {', '.join(FAMILIES)}")
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "options", tuple(sorted(options.items())))

    @classmethod
    def parse(cls, target: str | Target) -> Target:
        return target if isinstance(target, Target) else cls(target)

    @property
    def family(self) -> str:
        return FAMILIES[self.name]

    def get(self, key: str, default: Any = None) -> Any:
        return dict(self.options).get(key, default)

    def tvm_target(self) -> Any:
        """The ``tvm.target.Target`` this target compiles with."""
        import tvm

        if self.family == "cpu":
            from tvm.target import codegen

            mcpu = self.get("mcpu") or codegen.llvm_get_system_cpu()
            spec = {"kind": "llvm", "mcpu": mcpu, "num-cores": _cores()}
            if mcpu.startswith(("znver", "bdver", "btver", "amdfam10")):
                # no SSE4a: LLVM's SLP vectorizer sometimes gathers byte lanes with the legacy-SSE
                # `insertq`, which made a 128x64 W1A1 dense 50x slower (1.4 ms instead of 28 µs
                # at batch 256) when it was built next to any other function (measured on znver3)
                spec["mattr"] = ["-sse4a"]
            return tvm.target.Target(spec)
        if self.family in ("cuda", "opencl"):
            from bitcompiler.backends.gpu.target import tvm_target

            return tvm_target(self)
        return tvm.target.Target({"kind": "c"})

    def __str__(self) -> str:
        opts = ",".join(f"{k}={v}" for k, v in self.options)
        return self.name + (f"({opts})" if opts else "")


def _cores() -> int:
    import os

    return int(os.environ.get("TVM_NUM_THREADS", os.cpu_count() or 1))


class Runner(ABC):
    """A compiled model ready to run: contiguous CPU torch tensors in, tensors (or numpy arrays) out."""

    @abstractmethod
    def __call__(self, inputs: list[Any]) -> list[Any]: ...

    @abstractmethod
    def export(self, directory: Path) -> list[str]:
        """Write the artifact files into ``directory``; return their names."""


class Backend(ABC):
    """Builds a Relax IRModule for one target family."""

    family: str = ""

    @abstractmethod
    def build(self, mod: Any, target: Target) -> Runner: ...

    @abstractmethod
    def load(self, directory: Path, target: Target) -> Runner: ...


def backend_for(target: Target) -> Backend:
    if target.family == "cpu":
        from bitcompiler.backends.cpu import CPUBackend

        return CPUBackend()
    if target.family == "cortex-m":
        from bitcompiler.backends.cortex_m import CortexMBackend

        return CortexMBackend()
    if target.family in ("cuda", "opencl"):
        from bitcompiler.backends.gpu import GPUBackend

        return GPUBackend()
    raise NotImplementedError(
        f"target {target.name!r} ({target.family}) has no backend in this version yet; use target='cpu'"
    )
