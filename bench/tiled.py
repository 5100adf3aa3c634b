"""Tiled p=8 W1A1 Linear 4096x4096 against the plain binary layer of the same shape, batch 1.

Both are compiled in this process (``tiled:p=8`` vs ``binary``, act=binary, first_last=quantize);
the tiled kernel computes the R = N/8 distinct rows once and reuses them 8 times (one fused kernel:
the rows' W1A1 dense -- rows in vector lanes -- with the 8-fold expand as its epilogue). Prints one JSON
line; the thread count comes from BENCH_THREADS (set before import).
"""

from __future__ import annotations

import json
import os

import torch

from bench.harness import median_seconds

THREADS = int(os.environ.get("BENCH_THREADS", "1"))
torch.set_num_threads(THREADS)

import numpy as np
import tvm

import bitcompiler as bc
from bitcompiler import kernels
from bitcompiler.quant import numerics


def kernel_us(n: int, p: int) -> tuple[float, float]:
    """The bit kernels alone (median µs of direct calls, batch 1): the plain dense vs the fused tiled
    kernel, each the one the CPU lowering picks for this shape, on its weights in the order it reads."""
    target = tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()})
    kw, r = numerics.num_words(n), n // p

    def timed(prim, args):
        f = tvm.compile(tvm.IRModule({"main": prim}), target=target)["main"]
        return _median_us(f, [tvm.runtime.tensor(a) for a in args])

    def pick(relaid, plain_func, rows: int):
        """(func, activation input, weights): the relaid kernel when the lowering would take it."""
        planes = np.ones((1, rows, kw), "int32")
        if relaid is not None:
            x = np.ones((1, n), "float32") if relaid.float_input else np.ones((1, kw), "int32")
            return relaid.func, x, relaid.weights
        return plain_func(), np.ones((1, kw), "int32"), planes

    dense = kernels.DenseSpec(n, n, 1, "pm1", "binary", False, False)
    spec = kernels.TiledDenseSpec(n, n, p, "binary", False, p)
    ones = np.ones((1, n, kw), "int32")
    func, x, w = pick(kernels.relaid_dense_kernel(dense, ones), lambda: kernels.dense_kernel(dense), n)
    plain = timed(func, [x, w] + [np.ones(n, "float32")] * 3 + [np.zeros((1, n), "float32")])
    tile = np.ones((1, r, kw), "int32")
    func, x, w = pick(kernels.relaid_tiled_kernel(spec, tile), lambda: kernels.tiled_fused_kernel(spec), r)
    assert func is not None, "the fused tiled kernel applies to binary row-aligned layers of 256+ bits"
    tiled = timed(func, [x, w, np.ones(p, "float32"), np.ones(n, "float32"), np.zeros((1, n), "float32")])
    return plain, tiled


def _median_us(f, args) -> float:
    return 1e6 * median_seconds(lambda: f(*args), repeat=200)


def main() -> None:
    torch.manual_seed(0)
    n, p = int(os.environ.get("BENCH_N", "4096")), int(os.environ.get("BENCH_P", "8"))
    model = torch.nn.Linear(n, n).eval()
    example = torch.randn(1, n)
    binary = bc.compile(model, (example,), scheme="binary:act=binary,first_last=quantize")
    tiled = bc.compile(model, (example,), scheme=f"tiled:p={p},act=binary,first_last=quantize")
    rows = []
    for batch in (1,):
        x = torch.randn(batch, n)
        got, ref = tiled(x), tiled.reference(x)
        err = ((got - ref).abs().max() / ref.abs().max()).item()
        assert err <= 1e-5, f"compiled output differs from the reference (relative error {err:.2g})"
        row = {"bench": f"linear{n}_w1a1_tiled_p{p}", "batch": batch, "threads": THREADS}
        row["bitc_ms"] = 1e3 * median_seconds(lambda x=x: tiled(x))
        row["bitc_binary_ms"] = 1e3 * median_seconds(lambda x=x: binary(x))
        row["kernel_binary_us"], row["kernel_tiled_us"] = kernel_us(n, p)
        row["speedup_call"] = row["bitc_binary_ms"] / row["bitc_ms"]
        row["speedup_kernel"] = row["kernel_binary_us"] / row["kernel_tiled_us"]
        row["weight_bytes"] = tiled.report().weight_bytes
        row["binary_weight_bytes"] = binary.report().weight_bytes
        rows.append(row)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
