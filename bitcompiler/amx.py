"""Intel AMX tile state for this process: Linux hands it out only on request.

A process must ask the kernel for the AMX tile data (``arch_prctl(ARCH_REQ_XCOMP_PERM,
XFEATURE_XTILEDATA)``, Linux 5.16 and later) before its first tile instruction, or that
instruction faults. :func:`enable` asks once; the CPU backend calls it when it picks a target
(AMX kernels are chosen only where it succeeded) and when it loads a compiled model. The
permission covers every thread of the process (TVM's pool included). No TVM import here: loading
an exported model goes through this module.
"""

from __future__ import annotations

import ctypes
import functools
import platform
import sys

_SYS_ARCH_PRCTL = 158  # x86-64
_ARCH_REQ_XCOMP_PERM = 0x1023
_XFEATURE_XTILEDATA = 18


def host_has_amx() -> bool:
    """Whether this CPU reports the AMX tile and int8 instructions (Linux ``/proc/cpuinfo``)."""
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return False
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return {"amx_tile", "amx_int8"} <= flags
    except OSError:
        return False
    return False


@functools.cache
def enable() -> bool:
    """Ask for the AMX tile state once; True where this process may run tile instructions."""
    if not host_has_amx():
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.syscall(_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA) == 0
    except (OSError, AttributeError):
        return False
