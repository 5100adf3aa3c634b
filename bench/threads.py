"""Thread scaling and whole-call overhead, each pair timed alternately in one process.

* 2 threads against 1 on the same compiled model (the W1A1 4096² layer, binary ResNet-18 and
  the MLP-Mixer of ``bench.models``): the process starts TVM's pool with
  ``TVM_NUM_THREADS=2`` and switches it between 1 and 2 threads (``bc.set_num_threads``) before
  each round, so both sides see the same machine load. torch runs on one thread here (it only
  computes the references).
* The W1A1 4096² layer at batch 1: the whole call ``cm(x)`` against its kernel alone (the TIR
  function the CPU lowering picks, built for the same target and called directly on
  preallocated TVM tensors), one thread.

Each round times both sides (median of repeated calls); a row's ratio is the median of the
rounds' ratios. The overhead row also gives the ratio of CPU time on the calling thread, which
other processes on a shared host do not inflate. Prints one JSON line.
"""

from __future__ import annotations

import json
import os
import statistics
import time

os.environ["TVM_NUM_THREADS"] = os.environ.get("BENCH_THREADS", "2")  # the pool's size
import torch

torch.set_num_threads(1)

import numpy as np
import tvm

import bitcompiler as bc
from bench import zoo
from bench.harness import median_seconds
from bitcompiler import kernels
from bitcompiler.quant import numerics
from bitcompiler.target import Target, backend_for

ROUNDS = int(os.environ.get("BENCH_ROUNDS", "7"))
W1A1 = "binary:act=binary,first_last=quantize"


def alternate(sides: dict, setup: dict | None = None) -> dict[str, list[float]]:
    """Per round, each side's median seconds (``setup[name]()`` runs before that side's timing)."""
    out: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(ROUNDS):
        for name, fn in sides.items():
            if setup:
                setup[name]()
            out[name].append(median_seconds(fn, repeat=30, min_time=0.1, max_time=1.0))
    return out


def cpu_alternate(sides: dict, calls: int = 300) -> dict[str, list[float]]:
    """Per round, each side's CPU seconds per call on this thread (``time.thread_time``): at one
    thread all the work is on the calling thread, and time other processes take is not counted."""
    out: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(ROUNDS):
        for name, fn in sides.items():
            t0 = time.thread_time()
            for _ in range(calls):
                fn()
            out[name].append((time.thread_time() - t0) / calls)
    return out


def ratio(times: dict[str, list[float]], num: str, den: str) -> float:
    return statistics.median(a / b for a, b in zip(times[num], times[den]))


def scaling_row(name: str, cm, x: torch.Tensor, exact: bool = True) -> dict:
    """``cm(x)`` at 2 threads against 1; the output equal to the reference (``exact``) or within
    1e-5 relative (a model with float ops Relax computes in another order, e.g. an MLP-Mixer)."""
    got, want = cm(x), cm.reference(x)
    if exact:
        assert torch.equal(got, want), f"{name}: compiled output differs from the reference"
    else:
        err = ((got - want).abs().max() / want.abs().max()).item()
        assert err <= 1e-5, f"{name}: compiled output {err:.2g} from the reference (relative)"

    def threads(n: int):
        def apply() -> None:
            bc.set_num_threads(n)
            assert bc.get_num_threads() == n

        return apply

    times = alternate({"t1": lambda: cm(x), "t2": lambda: cm(x)}, {"t1": threads(1), "t2": threads(2)})
    bc.set_num_threads(2)
    return {
        "bench": name,
        "kind": "threads",
        "batch": x.shape[0],
        "threads": 2,
        "t1_ms": 1e3 * statistics.median(times["t1"]),
        "t2_ms": 1e3 * statistics.median(times["t2"]),
        "speedup": ratio(times, "t1", "t2"),
        "load_1min": os.getloadavg()[0],  # a second thread pays only where a core is free for it
    }


def w1a1_kernel_call(n: int):
    """The kernel the CPU lowering picks for an n x n W1A1 layer (AVX-512 `vpopcntq` or AVX2 rows in
    lanes), called directly at batch 1."""
    target = backend_for(Target("cpu")).tvm_target(Target("cpu"))
    spec = kernels.DenseSpec(n, n, 1, "pm1", "binary", False, False)
    relaid = kernels.relaid_dense_kernel(spec, np.ones((1, n, numerics.num_words(n)), "int32"), target)
    assert relaid is not None and relaid.suffix in ("vpop", "lanes"), (
        "this host has no AVX2 W1A1 dense kernel"
    )
    f = tvm.compile(tvm.IRModule({"main": relaid.func}), target=target)["main"]
    args = [
        np.ones((1, n), "float32"),
        relaid.weights,
        *[np.ones(n, "float32")] * 3,
        np.zeros((1, n), "float32"),
    ]
    targs = [tvm.runtime.tensor(a) for a in args]
    return lambda: f(*targs)


def overhead_row(n: int) -> dict:
    bc.set_num_threads(1)
    cm = bc.compile(torch.nn.Linear(n, n).eval(), (torch.randn(1, n),), scheme=W1A1)
    x = torch.randn(1, n)
    assert torch.equal(cm(x), cm.reference(x))
    sides = {"call": lambda: cm(x), "kernel": w1a1_kernel_call(n)}
    times, cpu = alternate(sides), cpu_alternate(sides)
    bc.set_num_threads(2)
    return {
        "bench": f"linear{n} W1A1",
        "kind": "overhead",
        "batch": 1,
        "threads": 1,
        "call_ms": 1e3 * statistics.median(times["call"]),
        "kernel_ms": 1e3 * statistics.median(times["kernel"]),
        "call_over_kernel": ratio(times, "call", "kernel"),
        "call_cpu_us": 1e6 * statistics.median(cpu["call"]),
        "kernel_cpu_us": 1e6 * statistics.median(cpu["kernel"]),
        "call_over_kernel_cpu": ratio(cpu, "call", "kernel"),
    }


def main() -> None:
    torch.manual_seed(0)
    bc.set_num_threads(2)
    n = 4096
    rows = [overhead_row(n)]
    linear = bc.compile(torch.nn.Linear(n, n).eval(), (torch.randn(1, n),), scheme=W1A1)
    for batch in (1, 64):
        rows.append(scaling_row(f"linear{n} W1A1", linear, torch.randn(batch, n)))
    resnet = zoo.randomized(zoo.ResNet18())
    cm = bc.compile(resnet, (torch.randn(1, 3, 32, 32),), scheme="binary:act=binary")
    rows.append(scaling_row("ResNet-18 (CIFAR)", cm, torch.randn(1, 3, 32, 32)))
    mixer = bc.compile(zoo.MLPMixer().eval(), (torch.randn(1, 3, 32, 32),), scheme="binary:act=binary")
    rows.append(scaling_row("MLP-Mixer", mixer, torch.randn(1, 3, 32, 32), exact=False))
    print(json.dumps(rows))


def markdown(rows: list[dict]) -> list[str]:
    from bench.harness import markdown_table

    lines = markdown_table(
        ["benchmark", "batch", "1 thread ms", "2 threads ms", "2 vs 1 thread"],
        [
            [
                r["bench"],
                str(r["batch"]),
                f"{r['t1_ms']:.3f}",
                f"{r['t2_ms']:.3f}",
                f"**{r['speedup']:.2f}x**",
            ]
            for r in rows
            if r["kind"] == "threads"
        ],
    )
    for r in rows:
        if r["kind"] == "threads" and "load_1min" in r:
            lines.append(
                f"- {r['bench']}, batch {r['batch']}: load average (1 min) {r['load_1min']:.1f} on 2 cores"
            )
    for r in rows:
        if r["kind"] == "overhead":
            lines.append(
                f"- {r['bench']}, batch 1, 1 thread: whole call {1e3 * r['call_ms']:.1f} µs, kernel alone "
                f"{1e3 * r['kernel_ms']:.1f} µs: the call takes **{r['call_over_kernel']:.2f}x** the kernel "
                f"(CPU time of the calling thread: {r['call_cpu_us']:.1f} against {r['kernel_cpu_us']:.1f} µs, "
                f"{r['call_over_kernel_cpu']:.2f}x)"
            )
    return lines


if __name__ == "__main__":
    main()
