"""Targets, what each can do, and the registry of the backends that compile for them.

A backend package under ``bitcompiler/backends/`` registers itself on import with
:func:`register_backend`; the packages are found (imported) the first time a target name is
looked up, so adding a target family is a new folder and nothing else::

    @register_backend
    class MyBackend(Backend):
        family = "my-gpu"
        targets = ("my-gpu",)
        ...

>>> Target("cpu").family
'cpu'
>>> Target("cortex-m4").capabilities.word_bits
32
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from bitcompiler.errors import TargetError

if TYPE_CHECKING:
    from bitcompiler.backends.base import Backend

DEFAULT = "cpu"


@dataclass(frozen=True)
class Capabilities:
    """What a target's hardware and its backend offer; passes and kernel choosers ask this.

    ``features``: ISA features (LLVM names on the host, e.g. ``avx2``; ``dsp``, ``mve`` on Arm);
    ``word_bits``: the native integer word; ``vector_bits``: the widest SIMD register (0: none);
    ``flash_bytes`` / ``ram_bytes``: memory limits (None: the host's, not checked);
    ``missing_kernels``: bitc ops the backend has no kernel for (the passes keep another form);
    ``compact_weights``: the backend stores a layer in its kernel's order or as a compact stream
    where that is smaller than the planes (``numerics.stores_compact``; the report counts that).
    """

    features: frozenset[str] = frozenset()
    word_bits: int = 64
    vector_bits: int = 0
    flash_bytes: int | None = None
    ram_bytes: int | None = None
    missing_kernels: frozenset[str] = frozenset()
    compact_weights: bool = False

    def has(self, feature: str) -> bool:
        return feature in self.features

    def has_kernel(self, op: str) -> bool:
        return op not in self.missing_kernels


@dataclass(frozen=True)
class Target:
    """Where compiled code runs. ``Target("cpu")`` is the host (LLVM, detected ``-mcpu``);
    ``Target("cpu", mcpu="x86-64-v2")`` another x86 CPU; options are the backend's.

    >>> Target("cpu", mcpu="x86-64").get("mcpu")
    'x86-64'
    """

    name: str = DEFAULT
    options: tuple[tuple[str, Any], ...] = field(default=())

    def __init__(self, name: str = DEFAULT, **options: Any) -> None:
        names = target_names()
        if name not in names:
            raise TargetError(f"unknown target {name!r}; valid targets: {', '.join(names)}")
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "options", tuple(sorted(options.items())))

    @classmethod
    def parse(cls, target: str | Target) -> Target:
        return target if isinstance(target, Target) else cls(target)

    @property
    def family(self) -> str:
        return _TARGETS[self.name]

    @property
    def backend(self) -> Backend:
        return backend_for(self)

    @property
    def capabilities(self) -> Capabilities:
        return _capabilities(self)

    def get(self, key: str, default: Any = None) -> Any:
        return dict(self.options).get(key, default)

    def tvm_target(self) -> Any:
        """The ``tvm.target.Target`` this target's kernels are built for."""
        return self.backend.tvm_target(self)

    def __str__(self) -> str:
        opts = ",".join(f"{k}={v}" for k, v in self.options)
        return self.name + (f"({opts})" if opts else "")


# family -> backend class; target name -> family (in registration order, the default first)
_BACKENDS: dict[str, type[Backend]] = {}
_TARGETS: dict[str, str] = {}


def register_backend(cls: type[Backend]) -> type[Backend]:
    """Class decorator: ``cls`` compiles for ``cls.targets`` (target names) of ``cls.family``."""
    if not cls.family or not cls.targets:
        raise ValueError(f"{cls.__name__} must set family and targets to register")
    _BACKENDS[cls.family] = cls
    for name in cls.targets:
        _TARGETS[name] = cls.family
    return cls


@functools.cache
def _discover() -> None:
    """Import every backend package under ``bitcompiler/backends/`` (each registers itself)."""
    package = importlib.import_module("bitcompiler.backends")
    for module in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name != DEFAULT):
        if module.ispkg:
            importlib.import_module(f"{package.__name__}.{module.name}")


def target_names() -> list[str]:
    """Every target name a registered backend compiles for, the default first."""
    _discover()
    # the default, then by family (whatever imported its package first), in each family's own order
    return sorted(_TARGETS, key=lambda n: (n != DEFAULT, _TARGETS[n]))


def backend_for(target: Target) -> Backend:
    """The registered backend of ``target``'s family."""
    _discover()
    return _BACKENDS[target.family]()


def _capabilities(target: Target) -> Capabilities:
    try:
        return _cached_capabilities(target)
    except TypeError:  # an option value that cannot be hashed: not cached
        return target.backend.capabilities(target)


@functools.cache
def _cached_capabilities(target: Target) -> Capabilities:
    return target.backend.capabilities(target)
