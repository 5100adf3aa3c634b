"""Single layers compiled by bitcompiler against their peers, warm and cold, at BENCH_THREADS threads.

Prints one JSON line (a list of rows). Cold runs evict the caches (a 64 MiB write) before each call.
Warm at one thread, ours and each peer are timed alternately in this process, in this thread's CPU
time (:func:`bench.harness.alternate_cpu_ms`: other processes on a shared host inflate neither
side); ``bitc_ms`` is the median of ours over those pairs. At more threads (the pools' CPU time is not this thread's)
and for a peer slower than ``SLOW_PEER_S``: wall time, one after the other.
"""

from __future__ import annotations

import json
import os
import statistics
import time

import torch

from bench.harness import alternate_cpu_ms, median_seconds

THREADS = int(os.environ.get("BENCH_THREADS", "1"))
torch.set_num_threads(THREADS)

import bitcompiler as bc
from bench import baselines, limits

_EVICT = torch.empty(16 * 2**20, dtype=torch.float32)
SLOW_PEER_S = 2.0  # a peer slower than this per call is timed once, not repeated


def cold(fn):
    def run(x):
        _EVICT.fill_(1.0)  # 64 MiB through the caches: weights come from DRAM again
        return fn(x)

    return run


def timed_ms(fn, x) -> float:
    t0 = time.perf_counter()
    fn(x)
    once = time.perf_counter() - t0
    if once > SLOW_PEER_S:
        return 1e3 * once
    return 1e3 * median_seconds(lambda: fn(x))


def warm_ms(ours, peer, x) -> tuple[float, float]:
    """``(ours ms, peer ms)`` warm (see the module docstring)."""
    t0 = time.perf_counter()
    peer(x)
    if THREADS == 1 and bc.get_num_threads() == 1 and time.perf_counter() - t0 <= SLOW_PEER_S:
        peer_ms, ours_ms = alternate_cpu_ms(lambda: peer(x), lambda: ours(x))
        return ours_ms, peer_ms
    return timed_ms(ours, x), timed_ms(peer, x)


def check(cm, x) -> None:
    got, ref = cm(x), cm.reference(x)
    err = ((got - ref).abs().max() / ref.abs().max()).item()
    assert err <= 1e-5, f"compiled output differs from the reference (relative error {err:.2g})"


def bench_layer(
    name: str, model: torch.nn.Module, shape: tuple, scheme: str, batches: tuple, peers: tuple, floor=None
) -> list[dict]:
    example = torch.randn(1, *shape)
    t0 = time.perf_counter()
    cm = bc.compile(model, (example,), scheme=scheme)
    compile_s = time.perf_counter() - t0
    make = {
        "torch_fp32": lambda: baselines.torch_fp32(model),
        "torch_int8": lambda: baselines.torch_int8_dynamic(model),
        "ort_fp32": lambda: baselines.onnxruntime(model, example, THREADS),
        "ort_int8": lambda: baselines.onnxruntime(model, example, THREADS, int8=True),
        "tvm_fp32": lambda: baselines.tvm_fp32(model, example),
    }
    runners = {p: make[p]() for p in peers}
    rows = []
    for batch in batches:
        x = torch.randn(batch, *shape)
        check(cm, x)
        row = {
            "bench": name,
            "scheme": scheme,
            "batch": batch,
            "threads": THREADS,
            "compile_s": compile_s,
        }
        ours = []
        for p, fn in runners.items():
            if p == "tvm_fp32" and batch > 1:
                continue  # TVM's default fp32 schedules take seconds per call at batch 64
            o, row[f"{p}_ms"] = warm_ms(cm, fn, x)
            ours.append(o)
        row["bitc_ms"] = statistics.median(ours)
        row["cold_bitc_ms"] = timed_ms(cold(cm), x)
        row["cold_torch_fp32_ms"] = timed_ms(cold(runners["torch_fp32"]), x)
        if floor is not None:
            row["floor_ms"] = floor(batch)
        rows.append(row)
    return rows


def main() -> None:
    torch.manual_seed(0)
    lim = limits.limits()
    n = 4096
    linear = torch.nn.Linear(n, n).eval()
    conv = torch.nn.Conv2d(256, 256, 3, padding=1).eval()
    all_peers = ("torch_fp32", "torch_int8", "ort_fp32", "ort_int8", "tvm_fp32")
    conv_peers = ("torch_fp32", "ort_fp32", "ort_int8", "tvm_fp32")
    rows = []
    rows += bench_layer(
        f"linear{n} W1A1",
        linear,
        (n,),
        "binary:act=binary,first_last=quantize",
        (1, 64),
        all_peers,
        floor=lambda b: limits.w1a1_floor_ms(n, n, b, lim),
    )
    rows += bench_layer(
        f"linear{n} W1 weight-only", linear, (n,), "binary:first_last=quantize", (1,), all_peers
    )
    rows += bench_layer(
        f"linear{n} W2A8", linear, (n,), "uniform:bits=2,act=8,first_last=quantize", (1,), all_peers
    )
    rows += bench_layer(
        "conv3x3 256->256 14x14 W1A1",
        conv,
        (256, 14, 14),
        "binary:act=binary,first_last=quantize",
        (1,),
        conv_peers,
        floor=lambda b: limits.w1a1_floor_ms(256 * 9, 256, b * 14 * 14, lim),
    )
    for r in rows:
        r["limits"] = lim
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
