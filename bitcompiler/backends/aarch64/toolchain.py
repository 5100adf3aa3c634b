"""Build an aarch64 bundle with ``aarch64-linux-gnu-gcc``, run it (``qemu-aarch64`` on another
host, natively on an aarch64 Linux host) and count the instructions the model executes.

Instruction counts are exact: QEMU logs each translated block's instructions once (``-d in_asm``)
and each execution of a block (``-d exec`` with ``nochain``, so no block runs without a log
line); the count is the sum of the executed blocks' sizes from the first instruction after
``bitc_marker_begin`` up to ``bitc_marker_end`` (the model call and a few call/return
instructions, the same span the Cortex-M counter measures one instruction at a time). The log streams through a pipe and is never
written to disk (a 4096x4096 int8 layer runs millions of blocks).
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bitcompiler.backends.aarch64.cores import Core
from bitcompiler.errors import FirmwareError, ToolchainMissing

CC = "aarch64-linux-gnu-gcc"
QEMU = "qemu-aarch64"
PACKAGES = {CC: "gcc-aarch64-linux-gnu", QEMU: "qemu-user", "make": "make"}
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
    return [t for t in needed if not shutil.which(t)]


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
        cmd = _command(core, exe, count)
        counter: _Counter | None = None
        if count:
            fifo = work / "trace.fifo"
            os.mkfifo(fifo)
            cmd[1:1] = ["-d", "in_asm,exec,nochain", "-D", str(fifo)]
            counter = _Counter(
                fifo, symbol_address(exe, "bitc_marker_begin"), symbol_address(exe, "bitc_marker_end")
            )
        try:
            proc = subprocess.Popen(
                [*cmd, str(src), str(dst)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
            if counter is not None:
                counter.start()
            _, err = proc.communicate(timeout=RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired as e:
            proc.kill()
            proc.communicate()
            raise FirmwareError(f"{' '.join(cmd[:3])} did not finish within {RUN_TIMEOUT_S}s") from e
        if counter is not None:
            counter.join()
        if proc.returncode != 0:
            raise FirmwareError(
                f"{exe} ({core.name}) exited with code {proc.returncode}: {err.strip()[-500:]}"
            )
        out = np.frombuffer(dst.read_bytes(), dtype="<f4").copy()
        if out.size != n_out:
            raise FirmwareError(f"the program wrote {out.size} outputs, expected {n_out}")
        return RunResult(out, counter.result() if counter is not None else None)


_TRACE = re.compile(r"^Trace \d+: 0x[0-9a-f]+ \[[0-9a-f]+/([0-9a-f]+)/")
_INSN = re.compile(r"^0x([0-9a-f]+):")


class _Counter(threading.Thread):
    """Reads QEMU's log from a pipe: block sizes from ``IN:`` listings, executions from ``Trace``."""

    def __init__(self, fifo: Path, begin: int, end: int) -> None:
        super().__init__(daemon=True)
        self.fifo, self.begin, self.end = fifo, begin, end
        self.count: int | None = None
        self.error = ""

    def run(self) -> None:
        sizes: dict[int, int] = {}
        block: int | None = None
        state = 0  # 0: before begin, 1: counting, 2: done
        n = 0
        try:
            with self.fifo.open() as f:
                for line in f:
                    if line.startswith("Trace"):
                        block = None
                        if state == 2:
                            continue
                        m = _TRACE.match(line)
                        if m is None:
                            continue
                        pc = int(m.group(1), 16)
                        if state == 0 and pc == self.begin:  # as on Cortex-M: begin's first one not counted
                            state, n = 1, sizes[pc] - 1
                        elif pc == self.end:
                            state, self.count = 2, n
                        else:
                            n += sizes[pc]
                    elif line.startswith("IN:"):
                        block = -1
                    elif block is not None:
                        m = _INSN.match(line)
                        if m is None:
                            continue
                        pc = int(m.group(1), 16)
                        if block == -1:
                            block, sizes[pc] = pc, 0
                        sizes[block] += 1
        except Exception as e:  # noqa: BLE001 - reported by result()
            self.error = repr(e)

    def result(self) -> int:
        if self.count is None:
            raise FirmwareError(
                f"markers not found in the QEMU trace (begin={self.begin:#x}, end={self.end:#x}) {self.error}"
            )
        return self.count
