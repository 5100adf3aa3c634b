"""Tuning, hand schedules vs tuned records in one process: the W1A1 Linear 4096x4096 (batch 1;
its dense kernel) and binary ResNet-18 (CIFAR, batch 1; its conv kernels: the int8 stem and the
W1A1 convs with their fused epilogues and shortcuts).

A fresh tuning database and compile cache (temporary directories) for every run; the untuned and
tuned models are timed in alternating rounds so that load from other processes hits both alike.
Prints one JSON line. BENCH_THREADS (set before import), BENCH_N, BENCH_TUNE_TRIALS (per
kernel; ResNet-18 half as many) and BENCH_TUNE_BUDGET (seconds a model) pick the case.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time

THREADS = int(os.environ.get("BENCH_THREADS", "1"))
os.environ["TVM_NUM_THREADS"] = str(THREADS)
os.environ["BITC_CACHE"] = tempfile.mkdtemp(prefix="bitc-bench-tune-")

import torch

from bench.harness import median_seconds

torch.set_num_threads(THREADS)

import bitcompiler as bc

SCHEME = "binary:act=binary,first_last=quantize"


def tune_row(
    name: str, model: torch.nn.Module, x: torch.Tensor, scheme: str, trials: int, budget: float
) -> dict:
    """``model`` compiled untuned and tuned (``trials`` per kernel within ``budget`` s), checked against
    its reference and timed in alternating rounds."""
    untuned = bc.compile(model, (x,), scheme=scheme)
    start = time.perf_counter()
    tuned = bc.tune(model, (x,), scheme=scheme, trials=trials, time_budget=budget, db=tempfile.mkdtemp())
    tune_s = time.perf_counter() - start
    for cm in (untuned, tuned):
        got, ref = cm(x), cm.reference(x)
        err = ((got - ref).abs().max() / ref.abs().max()).item()
        assert err <= 1e-5, f"compiled output differs from the reference (relative error {err:.2g})"
    times: dict[str, list[float]] = {"untuned": [], "tuned": []}
    for _ in range(5):  # alternate, so both see the same background load
        times["untuned"].append(median_seconds(lambda: untuned(x), repeat=100))
        times["tuned"].append(median_seconds(lambda: tuned(x), repeat=100))
    row = {
        "bench": name,
        "batch": 1,
        "threads": THREADS,
        "trials": trials,
        "tuned_kernels": tuned.report().extra.get("tuned kernels", 0),
        "tune_s": round(tune_s, 2),
        "untuned_ms": 1e3 * statistics.median(times["untuned"]),
        "tuned_ms": 1e3 * statistics.median(times["tuned"]),
    }
    row["speedup"] = row["untuned_ms"] / row["tuned_ms"]
    return row


def main() -> None:
    from bench import zoo

    torch.manual_seed(0)
    n = int(os.environ.get("BENCH_N", "4096"))
    trials = int(os.environ.get("BENCH_TUNE_TRIALS", "32"))
    budget = float(os.environ.get("BENCH_TUNE_BUDGET", "120"))
    rows = [
        tune_row(
            f"linear{n}_w1a1_tune", torch.nn.Linear(n, n).eval(), torch.randn(1, n), SCHEME, trials, budget
        )
    ]
    resnet = zoo.randomized(zoo.ResNet18())
    x = torch.randn(1, 3, 32, 32)
    rows.append(tune_row("resnet18_w1a1_tune", resnet, x, "binary:act=binary", max(trials // 2, 1), budget))
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
