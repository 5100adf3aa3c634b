"""`make demo`: train a small binary CNN on Fashion-MNIST, compile it for this CPU, compare.

Prints float vs compiled-binary test accuracy, the compiled model's report and
its latency against torch fp32 eager, all measured in this run.
"""

from __future__ import annotations

import os
import time

import torch
from torch import nn

import bitcompiler as bc
from bitcompiler import datasets
from bitcompiler.train import accuracy, fit

SCHEME = "binary:act=binary"  # W1A1 inside, first and last layer 8-bit
BUDGET = float(os.environ.get("BITC_DEMO_SECONDS", "45"))  # training seconds per model


def small_cnn(size: int) -> nn.Module:
    """(conv-BN-pool-hardtanh) x3, then a linear classifier (no ReLU before sign: it would erase it)."""
    final = size // 8
    block = lambda cin, cout: [
        nn.Conv2d(cin, cout, 3, padding=1),
        nn.BatchNorm2d(cout),
        nn.MaxPool2d(2),
        nn.Hardtanh(),
    ]
    return nn.Sequential(
        *block(1, 32), *block(32, 64), *block(64, 128), nn.Flatten(), nn.Linear(128 * final**2, 10)
    )


def latency_ms(fn, x: torch.Tensor, repeat: int = 30) -> float:
    for _ in range(3):
        fn(x)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t0)
    return 1e3 * sorted(times)[len(times) // 2]


def main() -> None:
    torch.manual_seed(0)
    name = "fashion-mnist"
    if not datasets.available(name):
        name = "digits"
        print(
            "Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist); using scikit-learn's digits"
        )
    train, test = datasets.load(name, "train"), datasets.load(name, "test")
    size = train.tensors[0].shape[-1]
    print(f"data: {name}, {len(train)} train / {len(test)} test images of {size}x{size}")

    print(f"training float CNN ({BUDGET:.0f} s budget)...")
    float_model = small_cnn(size)
    fit(float_model, train, epochs=3, time_budget=BUDGET)
    print(f"training binary CNN, scheme {SCHEME!r} ({BUDGET:.0f} s budget)...")
    binary_model = bc.prepare(small_cnn(size), SCHEME)
    fit(binary_model, train, epochs=3, time_budget=BUDGET, lr=2e-3)

    t0 = time.perf_counter()
    cm = bc.compile(binary_model, (test.tensors[0][:1],), target="cpu")
    compile_s = time.perf_counter() - t0
    xs, ys = test.tensors
    compiled_pred = torch.cat([cm(xs[i : i + 1000]).argmax(1) for i in range(0, len(xs), 1000)])
    reference_ok = torch.equal(cm(xs[:256]).argmax(1), cm.reference(xs[:256]).argmax(1))

    print()
    print(cm.report())
    print()
    print(f"compile time            {compile_s:6.1f} s")
    print(f"float CNN accuracy      {100 * accuracy(float_model, test):6.2f} %  (torch fp32)")
    print(f"binary CNN accuracy     {100 * accuracy(binary_model, test):6.2f} %  (training graph)")
    print(
        f"compiled accuracy       {100 * (compiled_pred == ys).float().mean().item():6.2f} %  "
        f"(compiled == reference on 256 images: {reference_ok})"
    )
    float_model.eval()
    with torch.no_grad():
        for batch in (1, 64):
            x = xs[:batch]
            t_torch = latency_ms(float_model, x)
            t_bitc = latency_ms(cm, x)
            print(
                f"latency batch {batch:>3}: torch fp32 eager {t_torch:7.3f} ms, bitcompiler {t_bitc:7.3f} ms "
                f"({t_torch / t_bitc:4.1f}x), {torch.get_num_threads()} threads"
            )


if __name__ == "__main__":
    main()
