"""Storage within 10% of nominal: every layer's reported bits/weight is at most 1.1x its nominal
width plus its scales, the bytes are what the CPU artifact stores, and outputs stay exact."""

import pytest
import torch
from torch import nn

import bitcompiler as bc
from bitcompiler.quant.bitlayers import BIT_LAYERS
from tests.conftest import assert_close


class Awkward(nn.Module):
    """Every layer kind whose rows do not fill 32-bit words."""

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.stem = nn.Conv2d(cin, 24, 3, padding=1)  # 1 or 3 input channels
        self.dw = nn.Conv2d(24, 24, 3, padding=1, groups=24)  # depthwise
        self.grouped = nn.Conv2d(24, 48, 3, padding=1, groups=4)  # 6 channels a group
        self.pw = nn.Conv2d(48, 40, 1)  # 1x1, 48 channels
        self.fc1 = nn.Linear(40 * 4 * 4, 50)
        self.fc2 = nn.Linear(50, 10)  # 50 inputs: odd row length

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(self.dw(x))
        x = nn.functional.max_pool2d(torch.relu(self.grouped(x)), 2)
        x = nn.functional.avg_pool2d(torch.relu(self.pw(x)), 2)
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def layer_ratios(cm: bc.CompiledModel, aligned: bool = False) -> dict[str, float]:
    """bits/weight over (nominal bits + scale bits per weight), per bit layer. ``aligned``: the
    nominal bits rounded up to whole 32-bit words first (every buffer is word-aligned, which is
    more than 10% of a tiny layer: 16 one-bit weights and 4 scales are 18 bytes, stored in 20)."""
    ratios = {}
    for row in cm.report().layers:
        m = cm.graph.get_submodule(row.name) if hasattr(cm.graph, "get_submodule") else None
        if m is None or not isinstance(m, BIT_LAYERS):
            continue
        nominal = m.bits * row.weights + 32 * m.n_floats
        if aligned:
            nominal = 32 * -(-nominal // 32)
        ratios[row.name] = row.bits_per_weight * row.weights / nominal
    return ratios


@pytest.mark.parametrize("cin", [1, 3])
@pytest.mark.parametrize(
    "scheme",
    ["binary", "binary:act=binary", "uniform:bits=2,act=8", "uniform:bits=4", "binary:first_last=quantize"],
)
def test_every_layer_within_ten_percent_of_nominal(cin, scheme):
    model = Awkward(cin).eval()
    x = torch.randn(1, cin, 16, 16)
    cm = bc.compile(model, (x,), scheme=scheme)
    ratios = layer_ratios(cm)
    assert len(ratios) == 6, ratios
    assert max(ratios.values()) <= 1.1, ratios
    xb = torch.randn(3, cin, 16, 16)
    if scheme == "binary:act=binary" or "act=8" in scheme:
        assert torch.equal(cm(xb), cm.reference(xb))
    else:
        assert_close(cm(xb), cm.reference(xb))


def test_cortex_m_reports_the_padded_planes_it_stores():
    # the C bundle stores the planes as they are: its report says so (no claim it does not keep)
    from bitcompiler.report import build_report

    model = Awkward(3).eval()
    cm = bc.compile(model, (torch.randn(1, 3, 16, 16),), scheme="binary")
    padded = build_report(cm.graph, "cortex-m4", "binary", [])
    assert padded.weight_bytes > cm.report().weight_bytes
