"""bitcompiler.train.fit: the learning-rate schedule option and the schemes' recipes."""

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


# ----------------------------------------------------------------------------- recipes (#18.4)
def _prepared(scheme: str, bn: bool = True) -> nn.Module:
    import bitcompiler as bc

    torch.manual_seed(0)
    layers = [nn.Linear(8, 32), *([nn.BatchNorm1d(32)] if bn else []), nn.ReLU(), nn.Linear(32, 32)]
    layers += [*([nn.BatchNorm1d(32)] if bn else []), nn.ReLU(), nn.Linear(32, 2)]
    return bc.prepare(nn.Sequential(*layers), scheme)


@pytest.mark.parametrize("scheme", ["binary", "bitwise:bits=6", "gwt", "none"])
def test_fit_without_optimizer_or_lr_uses_the_schemes_recipe(scheme):
    from bitcompiler.recipes import recipe

    r = recipe(scheme)
    h = fit(_prepared(scheme), _data(), epochs=2, progress=False, batch_size=16)
    assert h.lr[0] == pytest.approx(r.lr)
    assert (h.lr[-1] < h.lr[0]) == (r.schedule == "cosine")


def test_a_given_lr_or_optimizer_overrides_the_recipe():
    h = fit(_prepared("binary"), _data(), epochs=1, lr=3e-3, progress=False, batch_size=16)
    assert h.lr == [3e-3] * 4


def test_known_failures_warn():
    with pytest.warns(UserWarning, match="no BatchNorm"):
        fit(_prepared("bitwise:bits=6", bn=False), _data(), epochs=1, progress=False)
    # tiled:p=4 with the 2-way classifier tiled too: such nets stay near chance
    with pytest.warns(UserWarning, match=r"layer\(s\) 6 with <= 16 outputs"):
        fit(_prepared("tiled:p=4,min_weights=64,first_last=quantize"), _data(), epochs=1, progress=False)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit(_prepared("bitwise:bits=6"), _data(), epochs=1, progress=False)
        fit(_prepared("tiled:p=4,min_weights=64"), _data(), epochs=1, progress=False)
