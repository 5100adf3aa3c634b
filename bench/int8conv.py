"""W2A8 convolutions (int8 activations x 2-bit codes, kernels/conv_int8.py) against torch fp32.

Two 3x3 layers (64 -> 64 channels at 32x32, 128 -> 128 at 16x16, each a single-conv model under
``uniform:bits=2,act=8,first_last=quantize``) and one pytorchcv model (resnet20_cifar10 under
``uniform:bits=2,act=8``), batch 1, one thread. Each is compiled, checked against its numeric
reference (``cm.reference``, bit-exact integer sums; ``int8_act_convs`` counts the convs the
report lists with int8 activations), then timed against eager torch fp32 on the
same model object, alternating in one process, in this thread's CPU time (``time.thread_time``).
``python -m bench int8conv`` writes the table into BENCHMARKS.md; ``python -m bench.int8conv
resnet20_cifar10`` runs one.
"""

from __future__ import annotations

import sys
import warnings

import torch
from torch import nn

import bitcompiler as bc
from bench.corpus import build
from bench.harness import alternate_cpu_ms, print_rows

LAYER_SCHEME = "uniform:bits=2,act=8,first_last=quantize"


def _layer(c: int, size: int) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return nn.Conv2d(c, c, 3, padding=1).eval(), torch.randn(1, c, size, size)


CASES = {
    "conv3x3 64->64 32x32": (lambda: _layer(64, 32), LAYER_SCHEME),
    "conv3x3 128->128 16x16": (lambda: _layer(128, 16), LAYER_SCHEME),
    "resnet20_cifar10": (lambda: build("resnet20_cifar10"), "uniform:bits=2,act=8"),
}


def measure(name: str) -> dict:
    make, scheme = CASES[name]
    model, x = make()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cm = bc.compile(model, (x,), scheme=scheme)
    row: dict = {"bench": name, "scheme": scheme, "batch": 1, "threads": torch.get_num_threads()}
    convs = [r for r in cm.report().layers if r.op == "conv2d"]  # what the bitcompiler side runs
    row["int8_act_convs"] = f"{sum('act=int8' in r.note for r in convs)} of {len(convs)}"
    with torch.no_grad():
        row["exact"] = bool(torch.equal(cm(x), cm.reference(x)))
        row["torch_fp32_ms"], row["bitc_ms"] = alternate_cpu_ms(lambda: model(x), lambda: cm(x))
    row["speed"] = row["torch_fp32_ms"] / row["bitc_ms"]
    return row


def main(names: list[str]) -> None:
    print_rows(measure, names or list(CASES))


def markdown(rows: list[dict]) -> list[str]:
    from bench.harness import markdown_table

    head = [
        "W2A8 (batch 1, 1 thread)",
        "int8-act convs",
        "torch fp32 ms (CPU)",
        "bitcompiler ms (CPU)",
        "speed",
    ]
    body = [
        [
            f"{r['bench']} (`{r['scheme']}`)",
            r["int8_act_convs"],
            f"{r['torch_fp32_ms']:.2f}",
            f"{r['bitc_ms']:.2f}",
            f"**{r['torch_fp32_ms'] / r['bitc_ms']:.2f}x**" + ("" if r["exact"] else " (not exact)"),
        ]
        for r in rows
    ]
    return markdown_table(head, body)


if __name__ == "__main__":
    main(sys.argv[1:])
