"""Build the bundle with arm-none-eabi-gcc, run it under qemu-system-arm, measure it.

* sizes: ``arm-none-eabi-size -A`` per section; flash = .text + .rodata + .ARM.exidx + .data
  (its load image), RAM = .data + .bss (arena included) + the stack high-water mark measured by
  painting the stack before the model runs.
* instructions: exact, from QEMU's log of translated blocks read through a pipe
  (:mod:`bitcompiler.backends.qemu_count`): the instructions executed between the first
  execution of ``bitc_marker_begin`` and of ``bitc_marker_end`` (the model call plus a few call
  instructions).
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bitcompiler.backends.cortex_m.boards import Board
from bitcompiler.backends.qemu_count import run_counted
from bitcompiler.errors import FirmwareError, ToolchainMissing

INSTALL = "sudo apt-get install gcc-arm-none-eabi libnewlib-arm-none-eabi qemu-system-arm (or `make setup`)"
RUN_TIMEOUT_S = 600


def missing_tools() -> list[str]:
    return [
        t
        for t in ("arm-none-eabi-gcc", "arm-none-eabi-size", "qemu-system-arm", "make")
        if not shutil.which(t)
    ]


def require_toolchain() -> None:
    missing = missing_tools()
    if missing:
        raise ToolchainMissing(f"{', '.join(missing)} not found; install with: {INSTALL}")


@dataclass(frozen=True)
class Sizes:
    sections: dict[str, int]

    @property
    def flash_bytes(self) -> int:
        return sum(self.sections.get(s, 0) for s in (".text", ".rodata", ".ARM.exidx", ".data"))

    @property
    def static_ram_bytes(self) -> int:
        return self.sections.get(".data", 0) + self.sections.get(".bss", 0)


def build(directory: Path) -> Path:
    """``make`` in the bundle directory; returns the ELF."""
    require_toolchain()
    proc = subprocess.run(
        ["make", "-s", "-C", str(directory), "app.elf"], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise FirmwareError(f"building the firmware in {directory} failed:\n{proc.stdout}\n{proc.stderr}")
    return directory / "app.elf"


def sizes(elf: Path) -> Sizes:
    out = subprocess.run(
        ["arm-none-eabi-size", "-A", str(elf)], capture_output=True, text=True, check=True
    ).stdout
    sections = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0].startswith(".") and parts[1].isdigit():
            sections[parts[0]] = int(parts[1])
    return Sizes(sections)


def symbol_address(elf: Path, name: str) -> int:
    out = subprocess.run(["arm-none-eabi-nm", str(elf)], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[2] == name:
            return int(parts[0], 16) & ~1  # Thumb functions carry bit 0
    raise FirmwareError(f"symbol {name} not found in {elf}")


@dataclass(frozen=True)
class RunResult:
    output: np.ndarray
    stack_bytes: int
    instructions: int | None


def _qemu_cmd(board: Board, elf: Path) -> list[str]:
    return [
        "qemu-system-arm",
        "-M",
        board.name,
        "-nographic",
        "-monitor",
        "none",
        "-semihosting-config",
        "enable=on,target=native",
        "-kernel",
        str(elf),
    ]


def run(board: Board, elf: Path, x: np.ndarray, n_out: int, count: bool = False) -> RunResult:
    """One sample through the firmware under QEMU; optionally count the model's instructions."""
    require_toolchain()
    with tempfile.TemporaryDirectory(prefix="bitc-qemu-") as tmp:
        work = Path(tmp)
        (work / "bitc_in.bin").write_bytes(np.ascontiguousarray(x, dtype="<f4").tobytes())
        marks = None
        if count:
            marks = (symbol_address(elf, "bitc_marker_begin"), symbol_address(elf, "bitc_marker_end"))
        cmd = _qemu_cmd(board, elf)
        code, err, n = run_counted(cmd, work, marks, len(cmd), RUN_TIMEOUT_S, f"QEMU ({board.name})")
        if code != 0:
            raise FirmwareError(
                f"firmware on {board.name} exited with code {code} "
                f"(100 = hard fault, 2/3/4 = semihosting I/O failed): {err.strip()[-500:]}"
            )
        out = np.frombuffer((work / "bitc_out.bin").read_bytes(), dtype="<f4").copy()
        if out.size != n_out:
            raise FirmwareError(f"firmware wrote {out.size} outputs, expected {n_out}")
        stack = int(np.frombuffer((work / "bitc_stats.bin").read_bytes(), dtype="<u4")[0])
        return RunResult(out, stack, n)
