"""Build the bundle with arm-none-eabi-gcc, run it under qemu-system-arm, measure it.

* sizes: ``arm-none-eabi-size -A`` per section; flash = .text + .rodata + .ARM.exidx + .data
  (its load image), RAM = .data + .bss (arena included) + the stack high-water mark measured by
  painting the stack before the model runs.
* instructions: QEMU's one-instruction-per-block mode with ``-d nochain,exec`` logs one line per
  executed instruction; the count is the lines between the first execution of
  ``bitc_marker_begin`` and of ``bitc_marker_end`` (the model call plus a few call instructions).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bitcompiler.backends.cortex_m.boards import Board
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
        cmd = _qemu_cmd(board, elf)
        log = work / "trace.log"
        if count:
            cmd += ["-singlestep", "-d", "nochain,exec", "-D", str(log)]
        try:
            proc = subprocess.run(
                cmd, cwd=work, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, check=False
            )
        except subprocess.TimeoutExpired as e:
            raise FirmwareError(f"QEMU ({board.name}) did not finish within {RUN_TIMEOUT_S}s") from e
        if proc.returncode != 0:
            raise FirmwareError(
                f"firmware on {board.name} exited with code {proc.returncode} "
                f"(100 = hard fault, 2/3/4 = semihosting I/O failed): {proc.stderr.strip()[-500:]}"
            )
        out = np.frombuffer((work / "bitc_out.bin").read_bytes(), dtype="<f4").copy()
        if out.size != n_out:
            raise FirmwareError(f"firmware wrote {out.size} outputs, expected {n_out}")
        stack = int(np.frombuffer((work / "bitc_stats.bin").read_bytes(), dtype="<u4")[0])
        instructions = count_instructions(log, elf) if count else None
        return RunResult(out, stack, instructions)


_PC = re.compile(r"\[[0-9a-f]+/([0-9a-f]+)/")


def count_instructions(log: Path, elf: Path) -> int:
    """Executed instructions from the first ``bitc_marker_begin`` to the first ``bitc_marker_end``."""
    begin, end = symbol_address(elf, "bitc_marker_begin"), symbol_address(elf, "bitc_marker_end")
    counting, n = False, 0
    with log.open() as f:
        for line in f:
            m = _PC.search(line)
            if m is None:
                continue
            pc = int(m.group(1), 16)
            if not counting:
                counting = pc == begin
                continue
            if pc == end:
                return n
            n += 1
    raise FirmwareError(f"markers not found in the QEMU trace {log} (begin={begin:#x}, end={end:#x})")
