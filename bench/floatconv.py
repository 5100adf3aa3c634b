"""Float (``none``) models from the zoo that were slower than torch fp32, batch 1, one thread.

The five pytorchcv CIFAR architectures whose float convs lost to torch (wide, dense, grouped,
network-in-network): each compiled under ``none`` and timed against eager torch fp32 on the same
model object, alternating in one process. Times are this thread's CPU time (``time.thread_time``):
on a shared host, wall time counts the other processes' turns on the core, CPU time does not.
``python -m bench floatconv`` writes the table into BENCHMARKS.md; ``python -m bench.floatconv
nin_cifar10`` runs one.
"""

from __future__ import annotations

import sys
import time
import warnings

import torch

import bitcompiler as bc
from bench.corpus import build
from bench.harness import alternate_cpu_ms, print_rows
from bench.wild import relative_error

MODELS = (
    "densenet40_k12_cifar10",
    "nin_cifar10",
    "wrn16_10_cifar10",
    "resnext20_16x4d_cifar10",
    "xdensenet40_2_k24_bc_cifar10",
)


def measure(name: str) -> dict:
    model, x = build(name)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cm = bc.compile(model, (x,), scheme="none")
    row: dict = {"bench": name, "scheme": "none", "batch": 1, "threads": torch.get_num_threads()}
    row["compile_s"] = time.perf_counter() - t0
    xb = torch.randn(4, *x.shape[1:], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        row["err_vs_float"] = max(relative_error(cm(i), model(i)) for i in (x, xb))
        row["torch_fp32_ms"], row["bitc_ms"] = alternate_cpu_ms(lambda: model(x), lambda: cm(x))
    return row


def main(names: list[str]) -> None:
    print_rows(measure, names or list(MODELS))


def markdown(rows: list[dict]) -> list[str]:
    from bench.harness import markdown_table

    head = [
        "model (`none`, batch 1, 1 thread)",
        "torch fp32 ms (CPU)",
        "bitcompiler ms (CPU)",
        "speed",
        "vs eager float",
    ]
    body = [
        [
            r["bench"],
            f"{r['torch_fp32_ms']:.2f}",
            f"{r['bitc_ms']:.2f}",
            f"**{r['torch_fp32_ms'] / r['bitc_ms']:.2f}x**",
            f"{r['err_vs_float']:.1e}",
        ]
        for r in rows
    ]
    return markdown_table(head, body)


if __name__ == "__main__":
    main(sys.argv[1:])
