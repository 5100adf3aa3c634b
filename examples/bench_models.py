"""Small models for ``bitc bench`` (``examples.bench_models:small_cnn``), e.g.

    PYTHONPATH=. bitc bench examples.bench_models:small_cnn --targets cpu,cortex-m4,cuda,opencl \\
        --schemes none,binary,binary:act=binary,uniform:bits=2 --data fashion-mnist --epochs 1 --out bench-out
"""

from __future__ import annotations

from torch import nn


def small_cnn(classes: int = 10) -> nn.Module:
    """28x28 grey images: two conv blocks (BatchNorm, hardtanh, max-pool) and a linear classifier."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.Hardtanh(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.Hardtanh(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 7 * 7, classes),
    )  # fmt: skip


def digits_mlp(classes: int = 10) -> nn.Module:
    """8x8 digits: an MLP with BatchNorm after each hidden layer."""
    return nn.Sequential(
        nn.Flatten(), nn.Linear(64, 128), nn.BatchNorm1d(128), nn.ReLU(),
        nn.Linear(128, 128), nn.BatchNorm1d(128), nn.ReLU(), nn.Linear(128, classes),
    )  # fmt: skip
