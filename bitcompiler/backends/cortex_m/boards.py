"""Cortex-M cores, the QEMU boards that emulate them, and the compiler flags for each.

Memory sizes are those of the QEMU machine (the FPGA images' code and data SRAMs); a target can
ask for a smaller part with ``Target("cortex-m4", flash_kb=256, ram_kb=64)``, and a model that
does not fit is an error before anything is built.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from bitcompiler.backends.base import Target
from bitcompiler.errors import TargetError


@dataclass(frozen=True)
class Board:
    name: str  # qemu-system-arm -M <name>
    cpu: str  # -mcpu
    fpu_flags: tuple[str, ...]  # -mfpu / -mfloat-abi
    flash_origin: int
    flash_bytes: int
    ram_origin: int
    ram_bytes: int
    has_fpu: bool

    @property
    def cflags(self) -> tuple[str, ...]:
        return ("-mthumb", f"-mcpu={self.cpu}", *self.fpu_flags)


KB = 1024
MB = 1024 * KB

BOARDS = {
    # MPS2 FPGA images: 4 MiB SSRAM1 at 0 (code), 4 MiB SSRAM2/3 at 0x20000000 (data)
    "mps2-an385": Board(
        "mps2-an385", "cortex-m3", ("-mfloat-abi=soft",), 0x0, 4 * MB, 0x20000000, 4 * MB, False
    ),
    "mps2-an386": Board(
        "mps2-an386",
        "cortex-m4",
        ("-mfpu=fpv4-sp-d16", "-mfloat-abi=hard"),
        0x0,
        4 * MB,
        0x20000000,
        4 * MB,
        True,
    ),
    "mps2-an500": Board(
        "mps2-an500",
        "cortex-m7",
        ("-mfpu=fpv5-d16", "-mfloat-abi=hard"),
        0x0,
        4 * MB,
        0x20000000,
        4 * MB,
        True,
    ),
    # MPS3 AN547: 512 KiB ITCM at 0 (code), 2x2 MiB ISRAM at 0x21000000 (data)
    "mps3-an547": Board(
        "mps3-an547", "cortex-m55", ("-mfloat-abi=hard",), 0x0, 512 * KB, 0x21000000, 4 * MB, True
    ),
}

DEFAULT_BOARD = {
    "cortex-m3": "mps2-an385",
    "cortex-m4": "mps2-an386",
    "cortex-m7": "mps2-an500",
    "cortex-m55": "mps3-an547",
}


def board_for(target: Target) -> Board:
    """The board ``target`` runs on: its ``board=`` option or the core's default board."""
    name = target.get("board") or DEFAULT_BOARD[target.name]
    if name not in BOARDS:
        raise TargetError(f"unknown board {name!r} for {target.name}; valid boards: {', '.join(BOARDS)}")
    board = BOARDS[name]
    if board.cpu != target.name:
        raise TargetError(
            f"board {name} has a {board.cpu}, not a {target.name}; "
            f"use board={DEFAULT_BOARD[target.name]!r} or target={board.cpu!r}"
        )
    flash_kb, ram_kb = target.get("flash_kb"), target.get("ram_kb")
    if flash_kb is not None:
        board = replace(board, flash_bytes=int(flash_kb) * KB)
    if ram_kb is not None:
        board = replace(board, ram_bytes=int(ram_kb) * KB)
    return board
