"""Build an aarch64 bundle with ``aarch64-linux-gnu-gcc``, run it (``qemu-aarch64`` on another
host, natively on an aarch64 Linux host) and count the instructions the model executes.

Instruction counts are exact: QEMU's log of translated blocks, read through a pipe
(:mod:`bitcompiler.backends.qemu_count`, shared with the Cortex-M boards).
"""

from __future__ import annotations

import functools
import platform
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bitcompiler.backends.aarch64.cores import Core
from bitcompiler.backends.qemu_count import run_counted
from bitcompiler.errors import FirmwareError, ToolchainMissing

CC = "aarch64-linux-gnu-gcc"
QEMU = "qemu-aarch64"
LIBC = "the aarch64 C library headers"  # a cross gcc without them fails on <stdio.h>
PACKAGES = {CC: "gcc-aarch64-linux-gnu", QEMU: "qemu-user", "make": "make", LIBC: "libc6-dev-arm64-cross"}
RUN_TIMEOUT_S = 900


def native() -> bool:
    """Whether this host runs aarch64 Linux programs itself."""
    return platform.machine().lower() in ("aarch64", "arm64") and platform.system() == "Linux"


def missing_tools(count: bool = False) -> list[str]:
    """The tools building and running a bundle needs that are not on ``PATH``. On an aarch64
    host the native ``gcc`` builds and runs; QEMU is then needed only to count instructions."""
    needed = ["gcc" if native() and not shutil.which(CC) else CC]
    if not native() or count:
        needed.append(QEMU)
    needed.append("make")
    missing = [t for t in needed if not shutil.which(t)]
    if not native() and CC not in missing and not _cross_libc():
        missing.append(LIBC)
    return missing


@functools.cache
def _cross_libc() -> bool:
    """Whether the cross compiler finds the C library's headers (Debian installs the compiler
    without them when recommended packages are skipped)."""
    try:
        done = subprocess.run(
            [CC, "-E", "-x", "c", "-", "-o", "/dev/null"],
            input=b"#include <stdio.h>\n",
            capture_output=True,
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def install_hint(tools: list[str]) -> str:
    pkgs = sorted({PACKAGES.get(t, t) for t in tools})
    return f"sudo apt-get install {' '.join(pkgs)} (Debian/Ubuntu; `make setup` does it when root)"


def require_toolchain(count: bool = False) -> None:
    missing = missing_tools(count)
    if missing:
        raise ToolchainMissing(
            f"target aarch64: {', '.join(missing)} not found; install with: {install_hint(missing)}"
        )


def compiler() -> str:
    return CC if shutil.which(CC) or not native() else "gcc"


def build(directory: Path) -> Path:
    """``make`` in the bundle directory; returns the program."""
    require_toolchain()
    proc = subprocess.run(
        ["make", "-s", "-C", str(directory), "app", f"CC={compiler()}"],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise FirmwareError(
            f"building the aarch64 program in {directory} failed:\n{proc.stdout}\n{proc.stderr}"
        )
    return directory / "app"


def symbol_address(exe: Path, name: str) -> int:
    nm = "aarch64-linux-gnu-nm" if shutil.which("aarch64-linux-gnu-nm") else "nm"
    out = subprocess.run([nm, str(exe)], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[2] == name:
            return int(parts[0], 16)
    raise FirmwareError(f"symbol {name} not found in {exe}")


@dataclass(frozen=True)
class RunResult:
    output: np.ndarray
    instructions: int | None


def _command(core: Core, exe: Path, count: bool) -> list[str]:
    if native() and not count:
        return [str(exe)]
    return [QEMU, "-cpu", core.qemu_cpu, str(exe)]


def run(core: Core, exe: Path, x: np.ndarray, n_out: int, count: bool = False) -> RunResult:
    """One sample through the program; with ``count``, also the model's instruction count."""
    require_toolchain(count)
    with tempfile.TemporaryDirectory(prefix="bitc-a64-") as tmp:
        work = Path(tmp)
        src, dst = work / "in.bin", work / "out.bin"
        src.write_bytes(np.ascontiguousarray(x, dtype="<f4").tobytes())
        cmd = [*_command(core, exe, count), str(src), str(dst)]
        marks = None
        if count:
            marks = (symbol_address(exe, "bitc_marker_begin"), symbol_address(exe, "bitc_marker_end"))
        code, err, n = run_counted(cmd, work, marks, 1, RUN_TIMEOUT_S, " ".join(cmd[:3]))
        if code != 0:
            raise FirmwareError(f"{exe} ({core.name}) exited with code {code}: {err.strip()[-500:]}")
        out = np.frombuffer(dst.read_bytes(), dtype="<f4").copy()
        if out.size != n_out:
            raise FirmwareError(f"the program wrote {out.size} outputs, expected {n_out}")
        return RunResult(out, n)
