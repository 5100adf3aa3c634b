"""The GPU targets: ``cuda`` (option ``arch``, sm_75 and newer, default sm_80) and ``opencl``.

The backend registry's view of them: family ``cuda`` and ``opencl``, both built by
:class:`bitcompiler.backends.gpu.GPUBackend`.
"""

from __future__ import annotations

import re
from typing import Any

from bitcompiler.errors import TargetError

FAMILIES = {"cuda": "cuda", "opencl": "opencl"}
DEFAULT_ARCH = "sm_80"
PTX_ARCHS = ("sm_75", "sm_80", "sm_90")  # the PTX every CUDA export carries
OPTIONS = {"cuda": {"arch"}, "opencl": set()}


def arch_of(target: Any) -> str:
    """The CUDA ``arch`` option of ``target``, checked (``sm_XY``, XY >= 75)."""
    arch = str(target.get("arch", DEFAULT_ARCH))
    found = re.fullmatch(r"sm_(\d+)[a-z]?", arch)
    if found is None or int(found.group(1)) < 75:
        raise TargetError(
            f"target cuda: arch={arch!r} is not supported; use an sm_XY architecture of sm_75 or newer "
            f"(default {DEFAULT_ARCH}), e.g. Target('cuda', arch='sm_90')"
        )
    return arch


def check(target: Any) -> None:
    """Raise :class:`TargetError` for options the GPU target does not take."""
    unknown = sorted(set(dict(target.options)) - OPTIONS[target.name])
    if unknown:
        allowed = ", ".join(sorted(OPTIONS[target.name])) or "none"
        raise TargetError(f"target {target.name}: unknown option(s) {', '.join(unknown)}; options: {allowed}")
    if target.name == "cuda":
        arch_of(target)


def tvm_target(target: Any) -> Any:
    """The ``tvm.target.Target`` (device plus LLVM host) a GPU target compiles with."""
    import tvm

    check(target)
    host = {"kind": "llvm"}
    if target.name == "cuda":
        return tvm.target.Target({"kind": "cuda", "arch": arch_of(target), "host": host})
    return tvm.target.Target({"kind": "opencl", "host": host})
