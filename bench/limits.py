"""This machine's limits for the bit kernels: memory bandwidth and popcount throughput (one thread)."""

from __future__ import annotations

import os

import numpy as np
import torch

from bench.harness import median_seconds


def memory_bandwidth_gbs() -> float:
    """Read bandwidth: summing a 256 MiB int64 array."""
    a = torch.ones(32 * 2**20, dtype=torch.int64)
    t = median_seconds(lambda: a.sum(), repeat=5)
    return a.numel() * 8 / t / 1e9


def popcount_words_per_s() -> float:
    """64-bit words per second through a vectorized popcount-and-add loop over an L1-resident buffer."""
    import tvm
    from tvm import te
    from tvm.target import codegen

    n, reps = 2048, 512  # 16 KiB of words, summed 512 times
    a = te.placeholder((n,), "int64", name="A")
    r = te.reduce_axis((0, reps), "r")
    w = te.reduce_axis((0, n), "w")
    s = te.compute((1,), lambda i: te.sum(tvm.tirx.popcount(a[w]), axis=[r, w]), name="S")
    func = te.create_prim_func([a, s])
    sch = tvm.s_tir.Schedule(func)
    blk = sch.get_sblock(s.op.name)
    _, _rr, ww = sch.get_loops(blk)
    _wo, wi = sch.split(ww, [None, 4])
    rf = sch.rfactor(wi, 0)
    sch.vectorize(sch.get_loops(rf)[-1])
    target = tvm.target.Target({"kind": "llvm", "mcpu": codegen.llvm_get_system_cpu()})
    lib = tvm.compile(sch.mod, target=target)
    x = tvm.runtime.tensor(np.random.randint(-(2**62), 2**62, n, dtype=np.int64))
    out = tvm.runtime.tensor(np.zeros(1, dtype=np.int64))
    f = lib["main"]
    t = median_seconds(lambda: f(x, out), repeat=20)
    return n * reps / t


def limits() -> dict[str, float]:
    return {"memory_gbs": memory_bandwidth_gbs(), "popcount_gwords_s": popcount_words_per_s() / 1e9}


def w1a1_floor_ms(k: int, n: int, batch: int, lim: dict[str, float]) -> float:
    """Lower bound for a W1A1 dense: weight bytes at memory bandwidth vs word popcounts at peak rate."""
    words = batch * n * k / 64
    return 1e3 * max(n * k / 8 / (lim["memory_gbs"] * 1e9), words / (lim["popcount_gwords_s"] * 1e9))


if __name__ == "__main__":
    os.environ.setdefault("TVM_NUM_THREADS", "1")
    print(limits())
