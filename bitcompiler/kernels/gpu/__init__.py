"""GPU schedules for the bit kernels: the CPU's compute definitions (:mod:`bitcompiler.kernels`,
built with a non-LLVM target, i.e. unscheduled) bound to GPU threads.

Every dense and conv bit kernel has the same shape: an integer (or float) accumulator block
``acc`` (W1A1: ``popcount`` of XOR-ed packed words), an optional activation sum ``sumx``, and the
epilogue block ``Y`` that writes the output. :class:`BitKernelRule` gives each output element one
thread, with its accumulator in a register (``acc`` and ``sumx`` computed at the thread); the
activation packing and quantizing kernels and the float parts of the graph go to TVM's dlight
rules. (dlight's own rules must not see ``acc``/``Y``: with one reduction step they fold the
epilogue into the accumulator's init and compute a wrong result.)
"""

from __future__ import annotations

from typing import Any

from tvm import s_tir
from tvm.s_tir import dlight as dl

THREADS = 128  # threads per block for the one-output-per-thread schedule
# the blocks a bit kernel's ``Y`` reads (each computed per output, in a register); ``acc_tail``:
# the last partial word of a float-activation dense row
PRODUCERS = ("acc", "acc_tail", "sumx", "cnt")


def _block(sch: s_tir.Schedule, name: str) -> Any | None:
    try:
        return sch.get_sblock(name)
    except Exception:  # noqa: BLE001 - TVM raises its own error type for a missing block
        return None


def schedule_bit_kernel(func: Any, threads: int = THREADS) -> s_tir.Schedule | None:
    """``func`` (a dense or conv bit kernel: blocks ``acc``, ``Y``, maybe ``sumx``) scheduled for a
    GPU, or None when it is not one."""
    sch = s_tir.Schedule(func)
    y, acc = _block(sch, "Y"), _block(sch, "acc")
    if y is None or acc is None:
        return None
    names = {sch.get(b).name_hint for b in sch.get_child_blocks(sch.get_sblock("root"))}
    if not names <= {"Y", *PRODUCERS}:
        return None  # not a bit kernel's shape: dlight's rules schedule it
    fused = sch.fuse(*sch.get_loops(y))
    bx, tx = sch.split(fused, [None, threads])
    sch.bind(bx, "blockIdx.x")
    sch.bind(tx, "threadIdx.x")
    for name in PRODUCERS:
        b = _block(sch, name)
        if b is not None:
            sch.compute_at(b, tx, preserve_unit_loops=True)
            sch.set_scope(b, 0, "local")
    return sch


class BitKernelRule(dl.ScheduleRule):  # type: ignore[misc]
    """dlight rule for the bit kernels (:func:`schedule_bit_kernel`); None for other functions."""

    def apply(self, func: Any, target: Any, _tunable: bool) -> Any:
        return schedule_bit_kernel(func)
