"""Timing helpers shared by the benchmarks: median of repeated runs after warm-up."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable


def median_seconds(
    fn: Callable[[], object],
    repeat: int = 50,
    min_time: float = 0.2,
    max_time: float = 3.0,
    clock: Callable[[], float] = time.perf_counter,
) -> float:
    """Median time of ``fn()`` over ``repeat`` runs (and at least ``min_time`` seconds), wall
    time unless ``clock`` says otherwise (``time.thread_time``: this thread's CPU time).

    A slow peer stops after ``max_time`` seconds (at least 3 timed runs).
    """
    fn()
    times: list[float] = []
    start = clock()
    while len(times) < repeat or clock() - start < min_time:
        if len(times) >= 3 and clock() - start > max_time:
            break
        t0 = clock()
        fn()
        times.append(clock() - t0)
        if len(times) > 10_000:
            break
    return statistics.median(times)


def markdown_table(head: list[str], rows: list[list[str]]) -> list[str]:
    """A GitHub markdown table, one string per line."""
    return ["| " + " | ".join(line) + " |" for line in [head, ["---"] * len(head), *rows]]


def machine() -> dict[str, str]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import torch
    import tvm

    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "tvm": tvm.__version__,
    }


def run_in_subprocess(module: str, threads: int, *args: str) -> str:
    """Run ``python -m module`` with the thread count fixed before torch/TVM import (TVM reads it once)."""
    import tempfile

    # a fresh compile cache: compile times are cold, recompiles hit only what this run cached
    env = dict(
        os.environ,
        TVM_NUM_THREADS=str(threads),
        OMP_NUM_THREADS=str(threads),
        BENCH_THREADS=str(threads),
        BITC_CACHE=tempfile.mkdtemp(prefix="bitc-bench-cache-"),
    )
    out = subprocess.run(
        [sys.executable, "-m", module, *args], env=env, capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        raise RuntimeError(f"{module} ({threads} threads) failed:\n{out.stderr[-4000:]}")
    return out.stdout


def alternate_cpu_ms(
    peer: Callable[[], object], ours: Callable[[], object], rounds: int = 3
) -> tuple[float, float]:
    """``(peer ms, ours ms)``: the best of ``rounds`` alternating medians of this thread's CPU time
    per call (other processes on a shared host cannot inflate it)."""
    a, b = [], []
    for _ in range(rounds):
        a.append(median_seconds(peer, repeat=20, min_time=0.2, max_time=2.0, clock=time.thread_time))
        b.append(median_seconds(ours, repeat=20, min_time=0.2, max_time=2.0, clock=time.thread_time))
    return 1e3 * min(a), 1e3 * min(b)


def print_rows(measure: Callable[[str], dict], names: list[str]) -> None:
    """One thread; each name's row to stderr as it comes, then all rows as JSON on stdout."""
    import json

    import torch

    torch.set_num_threads(1)
    rows = []
    for name in names:
        rows.append(measure(name))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(json.dumps(rows))
