"""The training recipe the reproduction scripts share: momentum SGD, large LR, cosine, L2.

Calls ``step()`` on every quantizer that has one after each optimizer step (GWT's τ annealing).
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm


def subset(data: Dataset, n: int | None) -> Dataset:
    return data if n is None or n >= len(data) else Subset(data, range(n))


def train(
    model: nn.Module,
    data: Dataset,
    epochs: int,
    lr: float = 0.1,
    wd: float = 1e-4,
    seed: int = 0,
    batch_size: int = 128,
    on_epoch=None,
) -> float:
    """SGD(momentum 0.9, nesterov) + cosine schedule + weight decay; returns seconds."""
    torch.manual_seed(seed)
    loader = DataLoader(
        data, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed)
    )
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=wd)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * len(loader))
    steppers = [m for m in model.modules() if callable(getattr(m, "step", None)) and m is not model]
    t0 = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        for x, y in tqdm(loader, desc=f"epoch {epoch + 1}/{epochs}", leave=False, mininterval=5):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            for m in steppers:
                m.step()
        if on_epoch is not None:
            on_epoch(epoch)
    model.eval()
    return time.perf_counter() - t0


def mean_spread(values: list[float]) -> str:
    """``mean ± half-range`` in percent (accuracies) over seeds."""
    m = statistics.mean(values)
    half = (max(values) - min(values)) / 2
    return f"{100 * m:.2f} ± {100 * half:.2f}"
