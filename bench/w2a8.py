"""W2A8 Linear 4096², batch 1, one thread: where a call's time goes, and the kernels before and after.

``python -m bench.w2a8`` prints one JSON line. Every side is timed alternately in this process, in
this thread's CPU time (median of repeated calls, best of ``BENCH_ROUNDS`` rounds):

* ``call``: the whole ``cm(x)`` compiled for the host (AVX-512 VNNI: ``kernels/dense_vnni.py``, which
  quantizes the activations itself);
* ``kernel``: that kernel alone, called on preallocated TVM tensors (float input);
* ``avx2_call``: the same layer compiled for ``mcpu=znver3`` (AVX2, no VNNI: the separate quantizer,
  then the ``vpmaddubsw`` kernel on interleaved codes), what a host without VNNI runs;
* ``avx2_kernel``: that kernel alone (int8 input), and ``quantizer``: the separate quantizer alone;
* ``torch_int8`` (``quantize_dynamic``, checked to hold quantized Linear modules) and ``ort_int8``
  (ONNX Runtime's dynamic quantization, checked to hold integer ops).
"""

from __future__ import annotations

import json
import os
import time

os.environ["TVM_NUM_THREADS"] = "1"  # before TVM is imported: all the work on this thread
import numpy as np
import torch

torch.set_num_threads(1)
import tvm

import bitcompiler as bc
from bench import baselines
from bench.harness import median_seconds
from bitcompiler import kernels
from bitcompiler.kernels import dense_int8

ROUNDS = int(os.environ.get("BENCH_ROUNDS", "5"))
SCHEME = "uniform:bits=2,act=8,first_last=quantize"


def kernel_alone(cm, n: int, quantized: bool):
    """The layer's dense kernel (the one the lowering picked for ``cm``'s target), called directly."""
    target = cm.target.tvm_target()
    spec = kernels.DenseSpec(n, n, 2, "uint", "int8", True, False)
    planes = np.random.default_rng(0).integers(-(2**31), 2**31, (2, n, n // 32), dtype=np.int64)
    relaid = kernels.relaid_dense_kernel(spec, planes.astype(np.int32), target)
    assert relaid is not None and relaid.float_input != quantized, relaid
    f = tvm.compile(tvm.IRModule({"main": relaid.func}), target=target)["main"]
    x = np.random.default_rng(1).standard_normal((1, n)).astype("float32")
    ins = [np.clip(np.round(x * 40), -127, 127).astype("int8"), np.ones(1, "float32")] if quantized else [x]
    args = [tvm.runtime.tensor(a) for a in [*ins, relaid.weights, *[np.ones(n, "float32")] * 3, 0 * x]]
    return lambda: f(*args)


def quantizer_alone(cm, n: int):
    target = cm.target.tvm_target()
    f = tvm.compile(tvm.IRModule({"main": kernels.quantize_rows_int8((n,), target)}), target=target)["main"]
    args = [
        tvm.runtime.tensor(a)
        for a in (np.ones((1, n), "float32"), np.zeros((1, n), "int8"), np.ones(1, "float32"))
    ]
    return lambda: f(*args)


def main() -> None:
    torch.manual_seed(0)
    n = 4096
    linear = torch.nn.Linear(n, n).eval()
    x = torch.randn(1, n)
    cm = bc.compile(linear, (x,), scheme=SCHEME)
    avx2 = bc.compile(linear, (x,), scheme=SCHEME, target=bc.Target("cpu", mcpu="znver3"))
    for c in (cm, avx2):
        assert torch.equal(c(x), c.reference(x)), "compiled output differs from the reference"
    assert dense_int8.w2_interleaved_fits(kernels.DenseSpec(n, n, 2, "uint", "int8", True, False))
    torch_int8, ort_int8 = (
        baselines.torch_int8_dynamic(linear),
        baselines.onnxruntime(linear, x, 1, int8=True),
    )
    sides = {
        "call": lambda: cm(x),
        "kernel": kernel_alone(cm, n, quantized=False),
        "avx2_call": lambda: avx2(x),
        "avx2_kernel": kernel_alone(avx2, n, quantized=True),
        "quantizer": quantizer_alone(avx2, n),
        "torch_int8": lambda: torch_int8(x),
        "ort_int8": lambda: ort_int8(x),
    }
    times: dict[str, list[float]] = {k: [] for k in sides}
    for _ in range(ROUNDS):
        for k, fn in sides.items():
            times[k].append(
                1e3 * median_seconds(fn, repeat=30, min_time=0.2, max_time=2.0, clock=time.thread_time)
            )
    ms = {f"{k}_ms": min(v) for k, v in times.items()}
    row = {"bench": "linear4096 W2A8", "batch": 1, "threads": 1, **ms}
    for peer in ("torch_int8", "ort_int8"):
        row[f"{peer}_over_call"] = ms[f"{peer}_ms"] / ms["call_ms"]
        row[f"{peer}_over_avx2_call"] = ms[f"{peer}_ms"] / ms["avx2_call_ms"]
    row["call_over_kernel"] = ms["call_ms"] / ms["kernel_ms"]
    row["weights_gb_per_s"] = n * n / 4 / (ms["kernel_ms"] * 1e-3) / 1e9
    print(json.dumps(row))


if __name__ == "__main__":
    main()
