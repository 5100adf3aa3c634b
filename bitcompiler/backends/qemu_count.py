"""Exact instruction counts from QEMU's log of translated blocks, for every QEMU target
(``qemu-system-arm`` for Cortex-M boards, ``qemu-aarch64`` for Cortex-A programs).

QEMU logs each translated block's instructions once (``-d in_asm``) and each execution of a block
(``-d exec`` with ``nochain``, so no block runs without a log line). The count is the sum of the
executed blocks' sizes from the first instruction after ``bitc_marker_begin`` up to
``bitc_marker_end``: the model call and a few call/return instructions. A block runs to its end
unless an exception interrupts it, and none is taken inside the model, so this equals stepping one
instruction at a time (``-singlestep``, a log line per instruction: tests check both agree), at a
fraction of the cost. The log streams through a pipe and is never written to disk (a model runs
millions of blocks).
"""

from __future__ import annotations

import os
import re
import subprocess
import threading
from pathlib import Path

from bitcompiler.errors import FirmwareError


def log_options(fifo: Path) -> list[str]:
    """QEMU options that write the log :class:`BlockCounter` reads to ``fifo``."""
    return ["-d", "in_asm,exec,nochain", "-D", str(fifo)]


_TRACE = re.compile(r"^Trace \d+: 0x[0-9a-f]+ \[[0-9a-f]+/([0-9a-f]+)/")
_INSN = re.compile(r"^0x([0-9a-f]+):")


class BlockCounter(threading.Thread):
    """Reads QEMU's log from a pipe: block sizes from ``IN:`` listings, executions from ``Trace``.
    ``BlockCounter.open(work, begin, end)`` makes the pipe; start it once QEMU has been started."""

    def __init__(self, fifo: Path, begin: int, end: int) -> None:
        super().__init__(daemon=True)
        self.fifo, self.begin, self.end = fifo, begin, end
        self.count: int | None = None
        self.error = ""

    @classmethod
    def open(cls, work: Path, begin: int, end: int) -> BlockCounter:
        fifo = work / "trace.fifo"
        os.mkfifo(fifo)
        return cls(fifo, begin, end)

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
                        if state == 0 and pc == self.begin:  # begin's first instruction is not counted
                            state, n = 1, sizes[pc] - 1
                        elif state == 1 and pc == self.end:
                            state, self.count = 2, n
                        elif state == 1:
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


def run_counted(
    cmd: list[str], work: Path, marks: tuple[int, int] | None, log_at: int, timeout: int, what: str
) -> tuple[int, str, int | None]:
    """Run one QEMU command in ``work``: ``(exit code, stderr, instructions)``. With ``marks``
    (the begin and end markers' addresses) QEMU's block log is inserted at ``cmd[log_at]`` and
    the instructions between the markers are counted; otherwise the count is ``None``."""
    counter = None
    if marks is not None:
        counter = BlockCounter.open(work, *marks)
        cmd = [*cmd[:log_at], *log_options(counter.fifo), *cmd[log_at:]]
    proc = subprocess.Popen(cmd, cwd=work, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if counter is not None:
        counter.start()
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired as e:
        proc.kill()
        proc.communicate()
        raise FirmwareError(f"{what} did not finish within {timeout}s") from e
    if counter is not None:
        counter.join()
    return proc.returncode, err, counter.result() if counter is not None else None
