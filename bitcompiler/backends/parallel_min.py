"""Threads only where they pay: a float op too small for a parallel launch runs on the calling thread.

Every parallel loop is a launch of TVM's thread pool: the calling thread hands a task to each
worker and waits for the last to finish. That costs a few microseconds with the workers spinning
on idle cores, and far more when a worker has to wait for a core another process holds. The float
ops an MLP-Mixer leaves to Relax take 1-25 µs each at batch 1 (a residual add over 64 x 256
floats: 2 µs), and all 51 of its kernel calls were parallel: at 2 threads the model took 0.74 ms
against 0.57 ms at 1.

:class:`SerialBelow` wraps the CPU's dlight rules: it schedules a function as the wrapped rule
does, then, if the function's work is below ``PARALLEL_MIN`` (:mod:`bitcompiler.kernels._common`,
the threshold the bit kernels use too), replays the schedule without
its ``parallel`` steps (the same loops, vectorized alike, on one thread). The work is the number
of block instances summed over the function's blocks (elements written, plus elements summed by a
reduction), a symbolic extent (the dynamic batch) counted as one: the decision is the one for a
single sample, so at larger batches a small op stays on one thread too.
"""

from __future__ import annotations

from typing import Any

from tvm import s_tir, tirx
from tvm.s_tir.dlight.base import ScheduleRule

from bitcompiler.kernels._common import PARALLEL_MIN, work


def without_parallel(func: tirx.PrimFunc, sch: s_tir.Schedule) -> s_tir.Schedule:
    """``sch`` (a schedule of ``func``) replayed on ``func`` without its ``parallel`` steps."""
    trace = sch.trace
    assert trace is not None
    keep = [inst for inst in trace.insts if inst.kind.name != "Parallel"]
    decisions = {inst: d for inst, d in trace.decisions.items() if inst in keep}
    serial = s_tir.Schedule(func)
    s_tir.schedule.Trace(keep, decisions).apply_to_schedule(serial, remove_postproc=False)
    return serial


class SerialBelow(ScheduleRule):
    """``rule``'s schedule, on one thread where the function's work is below ``minimum``."""

    def __init__(self, rule: ScheduleRule, minimum: int = PARALLEL_MIN) -> None:
        self.rule = rule
        self.minimum = minimum

    def apply(self, func: tirx.PrimFunc, target: Any, tunable: bool) -> Any:
        try:
            sch = self.rule.apply(func, target, tunable)
        except (AssertionError, ValueError, IndexError, RuntimeError):
            # a rule that fails on a function it took for its kind does not apply: TVM's GEMV rule
            # asserts on a reduction of length 1 (one token's attention, ``(8, 1, 1) @ (8, 1, 32)``,
            # in a ViT whose last stage has one token); the next rule schedules it
            return None
        if not isinstance(sch, s_tir.Schedule) or not isinstance(func, tirx.PrimFunc):
            return sch
        if work(func) >= self.minimum or not _has_parallel(sch):
            return sch
        return without_parallel(func, sch)


def _has_parallel(sch: s_tir.Schedule) -> bool:
    trace = sch.trace
    return trace is not None and any(inst.kind.name == "Parallel" for inst in trace.insts)
