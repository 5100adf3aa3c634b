"""Linear 4096x4096 compiled W1A1 (binary:act=binary, first_last=quantize) against its peers.

Prints one JSON line; the thread count comes from BENCH_THREADS (set before import).
"""

from __future__ import annotations

import json
import os

import torch

from bench.harness import median_seconds

THREADS = int(os.environ.get("BENCH_THREADS", "1"))
torch.set_num_threads(THREADS)

import bitcompiler as bc  # noqa: E402
from bench import baselines  # noqa: E402


def main() -> None:
    torch.manual_seed(0)
    n = int(os.environ.get("BENCH_N", "4096"))
    model = torch.nn.Linear(n, n).eval()
    example = torch.randn(1, n)
    cm = bc.compile(model, (example,), scheme="binary:act=binary,first_last=quantize")
    peers = {
        "torch_fp32": baselines.torch_fp32(model),
        "torch_int8": baselines.torch_int8_dynamic(model),
        "ort_fp32": baselines.onnxruntime(model, example, THREADS),
        "ort_int8": baselines.onnxruntime(model, example, THREADS, int8=True),
        "tvm_fp32": baselines.tvm_fp32(model, example),
    }
    rows = []
    for batch in (1, 64):
        x = torch.randn(batch, n)
        got, ref = cm(x), cm.reference(x)
        err = ((got - ref).abs().max() / ref.abs().max()).item()
        assert err <= 1e-5, f"compiled output differs from the reference (relative error {err:.2g})"
        row = {"bench": f"linear{n}_w1a1", "batch": batch, "threads": THREADS}
        row["bitc_ms"] = 1e3 * median_seconds(lambda x=x: cm(x))
        for name, fn in peers.items():
            row[f"{name}_ms"] = 1e3 * median_seconds(lambda x=x, fn=fn: fn(x))
        rows.append(row)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
