"""Shared fixtures: the four model families every compile test uses, and the comparison rule."""

from __future__ import annotations

import os
import sys

os.environ.setdefault("BITC_DEBUG", "1")  # verify the graph after every pass in tests
os.environ.setdefault("TVM_NUM_THREADS", "2")
if "BITC_CACHE" not in os.environ:  # a private compile cache per test session, never the user's
    import atexit
    import shutil
    import tempfile

    os.environ["BITC_CACHE"] = tempfile.mkdtemp(prefix="bitc-test-cache-")
    atexit.register(shutil.rmtree, os.environ["BITC_CACHE"], ignore_errors=True)

import pytest
import torch
import torch.nn.functional as F
from torch import nn


def assert_close(got: torch.Tensor, ref: torch.Tensor, rtol: float = 1e-5) -> None:
    """Float epilogues: error within ``rtol`` of the reference's magnitude."""
    assert got.shape == ref.shape, (got.shape, ref.shape)
    scale = max(ref.abs().max().item(), 1e-6)
    err = (got.float() - ref.float()).abs().max().item()
    assert err <= rtol * scale, f"max error {err:.3g} > {rtol} x {scale:.3g}"


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(64, 96), nn.Linear(96, 48), nn.Linear(48, 10)

    def forward(self, x):
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x.flatten(1))))))


class ResCNN(nn.Module):
    """Conv + BatchNorm + residual + max and average pooling."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.c2, self.b2 = nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.c3, self.b3 = nn.Conv2d(16, 40, 3, stride=2, padding=1), nn.BatchNorm2d(40)
        self.fc = nn.Linear(40, 10)

    def forward(self, x):
        x = F.relu(self.b1(self.c1(x)))
        x = x + F.relu(self.b2(self.c2(x)))
        x = F.max_pool2d(x, 2)
        x = F.relu(self.b3(self.c3(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class DepthwiseCNN(nn.Module):
    """Depthwise-separable blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1)
        self.dw, self.bn1 = nn.Conv2d(32, 32, 3, padding=1, groups=32), nn.BatchNorm2d(32)
        self.pw, self.bn2 = nn.Conv2d(32, 48, 1), nn.BatchNorm2d(48)
        self.head = nn.Linear(48, 5)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = F.relu(self.bn1(self.dw(x)))
        x = F.relu(self.bn2(self.pw(x)))
        return self.head(F.avg_pool2d(x, x.shape[-1]).flatten(1))


class TransformerBlock(nn.Module):
    """LayerNorm + GELU MLP with residual, on (batch, tokens, dim)."""

    def __init__(self, dim: int = 48, tokens: int = 8) -> None:
        super().__init__()
        self.embed = nn.Linear(16, dim)
        self.norm = nn.LayerNorm(dim)
        self.up, self.down = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.head = nn.Linear(dim, 4)

    def forward(self, x):
        h = self.embed(x)
        h = h + self.down(F.gelu(self.up(self.norm(h))))
        return self.head(h.mean(1))


def randomize_bn(model: nn.Module, seed: int = 1) -> nn.Module:
    """Eval mode with random BatchNorm statistics and affine (so folding them is tested)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=g) - 0.5)
    return model.eval()


MODELS = {
    "mlp": (MLP, (1, 1, 8, 8)),
    "rescnn": (ResCNN, (1, 1, 12, 12)),
    "depthwise": (DepthwiseCNN, (1, 3, 8, 8)),
    "transformer": (TransformerBlock, (1, 8, 16)),
}


def make_model(name: str) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    torch.manual_seed(0)
    cls, shape = MODELS[name]
    return randomize_bn(cls()), (torch.randn(*shape),)


@pytest.fixture(params=sorted(MODELS))
def model_and_input(request):
    return make_model(request.param)


def write_factory_module(tmp_path, monkeypatch, name: str) -> None:
    """``tmp_path/<name>.py`` with ``make()`` (a 12 -> 3 MLP), importable from the working directory
    (the command line's ``MODULE:ATTR`` models)."""
    (tmp_path / f"{name}.py").write_text(
        "import torch\n"
        "def make():\n"
        "    return torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16),\n"
        "                               torch.nn.ReLU(), torch.nn.Linear(16, 3))\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [str(tmp_path), *sys.path])
