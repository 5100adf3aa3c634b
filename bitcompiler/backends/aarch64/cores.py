"""Cortex-A cores of the ``aarch64`` target: compiler flags and ISA features of each.

``Target("aarch64", mcpu="cortex-a76")``; the default is ``cortex-a72``. Every core has NEON
(Advanced SIMD, 128-bit); ``dotprod`` (``sdot``/``udot``) only the Armv8.2 cores (A76).
"""

from __future__ import annotations

from dataclasses import dataclass

from bitcompiler.backends.base import Target
from bitcompiler.errors import TargetError


@dataclass(frozen=True)
class Core:
    name: str  # -mcpu
    arch: str  # the architecture version, for the report
    features: frozenset[str]

    @property
    def cflags(self) -> tuple[str, ...]:
        return (f"-mcpu={self.name}",)

    @property
    def qemu_cpu(self) -> str:
        """``qemu-aarch64 -cpu``: QEMU 7 models the A53, A72 and A76 by these names."""
        return self.name


CORES = {
    "cortex-a53": Core("cortex-a53", "armv8-a", frozenset({"neon"})),
    "cortex-a72": Core("cortex-a72", "armv8-a", frozenset({"neon"})),
    "cortex-a76": Core("cortex-a76", "armv8.2-a", frozenset({"neon", "dotprod"})),
}
DEFAULT_CORE = "cortex-a72"


def core_for(target: Target) -> Core:
    """The core of ``target`` (its ``mcpu=`` option, default cortex-a72)."""
    name = target.get("mcpu") or DEFAULT_CORE
    if name not in CORES:
        raise TargetError(f"unknown mcpu {name!r} for target aarch64; valid: {', '.join(CORES)}")
    return CORES[name]
