"""Linear 4096x4096 compiled W1A1 (binary:act=binary, first_last=quantize) vs torch fp32 eager.

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


def main() -> None:
    torch.manual_seed(0)
    n = int(os.environ.get("BENCH_N", "4096"))
    model = torch.nn.Linear(n, n).eval()
    rows = []
    for batch in (1, 64):
        x = torch.randn(batch, n)
        cm = bc.compile(model, (torch.randn(1, n),), scheme="binary:act=binary,first_last=quantize")
        assert torch.equal(cm(x), cm.reference(x)), "compiled output differs from the reference"
        with torch.no_grad():
            t_torch = median_seconds(lambda: model(x))
        t_bitc = median_seconds(lambda: cm(x))
        rows.append({"bench": f"linear{n}_w1a1", "batch": batch, "threads": THREADS,
                     "torch_fp32_ms": 1e3 * t_torch, "bitc_ms": 1e3 * t_bitc, "speedup": t_torch / t_bitc})
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
