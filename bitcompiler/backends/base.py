"""The backend interface: what :func:`bitcompiler.compile` hands a backend and what it gets back.

A backend turns the rewritten graph into something that runs: a shared library on the host
(``cpu``: through the Relax IRModule of :mod:`bitcompiler.backends.lower`), or a C bundle with
a static memory plan (``cortex-m``: from the graph directly). Each backend package registers
itself with :func:`bitcompiler.target.register_backend`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bitcompiler.target import Capabilities, Target, backend_for, register_backend

__all__ = ["Backend", "BuildInput", "Capabilities", "Runner", "Target", "backend_for", "register_backend"]


class Runner(ABC):
    """A compiled model ready to run: contiguous CPU torch tensors in, tensors (or numpy arrays) out."""

    @abstractmethod
    def __call__(self, inputs: list[Any]) -> list[Any]: ...

    @abstractmethod
    def export(self, directory: Path) -> list[str]:
        """Write the artifact files into ``directory``; return their names."""


@dataclass(frozen=True)
class BuildInput:
    """The one lowering input every backend builds from.

    ``graph``: the rewritten graph of bitc ops (the numeric reference); ``exported``: it exported
    by ``torch.export`` with a dynamic batch where the graph allows; ``example_inputs``: the
    example the model was captured with; ``tune`` (a ``TuneOptions``) and ``db``: what
    ``compile(tune=..., db=...)`` asked for, used by backends that tune (``Backend.tunable``).
    """

    graph: Any
    exported: Any
    example_inputs: tuple
    tune: Any = None
    db: Any = None


class Backend(ABC):
    """Compiles for the targets of one family (``targets``: the names ``Target`` accepts)."""

    family: str = ""
    targets: tuple[str, ...] = ()
    tunable: bool = False  # whether build() applies and makes tuning records

    @abstractmethod
    def build(self, inp: BuildInput, target: Target) -> Runner: ...

    @abstractmethod
    def load(self, directory: Path, target: Target) -> Runner: ...

    @abstractmethod
    def tvm_target(self, target: Target) -> Any:
        """The ``tvm.target.Target`` the kernels for ``target`` are built for."""

    @abstractmethod
    def capabilities(self, target: Target) -> Capabilities: ...
