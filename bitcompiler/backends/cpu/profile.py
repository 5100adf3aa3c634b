"""Where a CPU model's call goes: each kernel's time and the time outside the kernels.

The Relax VM calls an instrument before and after every call instruction (kernels and its own
builtins: allocation, shape checks); :func:`profile` times each kernel between the two on the
calling thread's CPU clock, sums them over ``repeat`` calls, and times the same number of plain
calls (no instrument) for the whole. The instrument's own Python callback adds about a
microsecond to each timed span; the mean span of the VM's builtins (whose own work is far
shorter) is taken as that bias and subtracted from each kernel. Set ``TVM_NUM_THREADS=1`` to see
all the work on the calling thread (a parallel kernel's other threads are not on its clock).
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

_CLOCK = time.thread_time


@dataclass(frozen=True)
class Profile:
    """Per-call microseconds: ``kernels`` (name -> time, largest first) and the whole call."""

    kernels: dict[str, float]
    call_us: float
    batch: int

    @property
    def outside_us(self) -> float:
        """The call's time outside the kernels (the VM's checks and allocations, Python)."""
        return max(self.call_us - sum(self.kernels.values()), 0.0)

    def __str__(self) -> str:
        lines = [f"profile, batch {self.batch}: {self.call_us:.1f} us a call (this thread's CPU time)"]
        lines.append(f"{'kernel':44s} {'us':>9s} {'share':>6s}")
        rows = [*self.kernels.items(), ("(outside kernels)", self.outside_us)]
        for name, us in rows:
            lines.append(f"{name:44s} {us:9.1f} {100 * us / self.call_us:5.1f}%")
        return "\n".join(lines)


def profile(runner: Any, call: Any, inputs: list, batch: int, repeat: int = 100) -> Profile:
    """Time ``repeat`` calls of ``call(*inputs)`` (the whole) and the kernels of as many calls of
    ``runner``'s VM entry with an instrument set on a second VM over the same executable."""
    for _ in range(3):  # warm-up: caches, the allocator's pool
        call(*inputs)
    t0 = _CLOCK()
    for _ in range(repeat):
        call(*inputs)
    whole = (_CLOCK() - t0) / repeat
    import tvm
    from tvm import relax

    from bitcompiler.backends.cpu.runner import _aligned

    vm = relax.VirtualMachine(runner.executable, tvm.cpu())
    totals: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    started: dict[str, float] = {}

    def instrument(_func: Any, symbol: str, before: bool, _ret: Any, *_args: Any) -> int:
        if before:
            started[symbol] = _CLOCK()
        else:
            totals[symbol] += _CLOCK() - started.pop(symbol)
            counts[symbol] += 1
        return 0

    vm.set_instrument(instrument)
    plain = [_aligned(x) for x in inputs]
    # the entry the call takes: the batch-1 one where the pipeline made it
    entry = vm["main_b1" if batch == 1 and runner.entries[1] is not runner.entries[0] else "main"]
    for _ in range(repeat):
        entry(*plain)
    # the VM's builtins take well under a microsecond: their mean timed span is the callback's bias
    builtins = [k for k in totals if k.startswith("vm.builtin.")]
    bias = sum(totals[k] for k in builtins) / max(sum(counts[k] for k in builtins), 1)
    timed = {k: max(v - bias * counts[k], 0.0) for k, v in totals.items() if k not in builtins}
    kernels = {k: 1e6 * v / repeat for k, v in sorted(timed.items(), key=lambda kv: -kv[1])}
    return Profile(kernels, 1e6 * whole, batch)
