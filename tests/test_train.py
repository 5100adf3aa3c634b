"""bitcompiler.train.fit: the learning-rate schedule option."""

import math

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from bitcompiler.train import fit


def _data(n: int = 64) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 8, generator=g), torch.randint(0, 2, (n,), generator=g))


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))


def test_constant_schedule_is_the_default_and_keeps_the_lr():
    h = fit(_net(), _data(), epochs=2, lr=3e-3, progress=False, batch_size=16)
    assert h.lr == [3e-3] * 8


def test_cosine_schedule_decays_to_zero_over_all_epochs():
    net = _net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    h = fit(net, _data(), epochs=2, optimizer=opt, progress=False, batch_size=16, schedule="cosine")
    total = 8  # 2 epochs x 4 batches
    assert h.steps == total
    expect = [0.1 * (1 + math.cos(math.pi * t / total)) / 2 for t in range(total)]
    assert h.lr == pytest.approx(expect, abs=1e-9)
    assert float(opt.param_groups[0]["lr"]) == pytest.approx(0.0, abs=1e-12)  # after the last step


def test_unknown_schedule_is_an_error():
    with pytest.raises(ValueError, match="cosine"):
        fit(_net(), _data(), epochs=1, progress=False, schedule="linear")
