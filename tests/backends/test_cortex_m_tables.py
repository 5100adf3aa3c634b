"""W1A1 convs on Cortex-M by lookup tables (backends/cortex_m/conv_tables.py): the tables against
a direct count, the width chosen within the flash budget, and compiled models against the
reference on the scalar (M3), DSP (M4) and Helium (M55) cores with each width."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bitcompiler as bc
from bitcompiler import kernels
from bitcompiler.backends.cortex_m.conv_tables import choose_bits, fields, store_tables, table_bytes
from bitcompiler.errors import TargetError
from tests.backends.test_cortex_m_memory import needs_toolchain
from tests.conftest import randomize_bn

CORES = [
    pytest.param("cortex-m3", marks=pytest.mark.slow),
    pytest.param("cortex-m4", marks=pytest.mark.slow),
    pytest.param("cortex-m55", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize(("c", "o"), [(32, 32), (40, 33), (7, 20)])
def test_tables_count_the_matching_bits(bits, c, o):
    """Summed over a pixel's fields, the entries of its words give, per output channel, the
    number of equal sign bits over the valid channels (the padding bits never count)."""
    rng = np.random.default_rng(0)
    taps, cw = 9, -(-c // 32)
    valid = np.zeros((taps * cw, 32), bool)
    for i in range(taps * cw):
        valid[i, : min(32, c - 32 * (i % cw))] = True
    bits_w = rng.integers(0, 2, (o, taps * cw, 32)).astype(bool) & valid
    bits_x = rng.integers(0, 2, (taps * cw, 32)).astype(bool) & valid
    pack = lambda b: np.packbits(b, axis=-1, bitorder="little").view("<u4")[..., 0].astype(np.int64)
    words, x = pack(bits_w).astype(np.uint32).view(np.int32), pack(bits_x)
    tab = (
        store_tables(words, taps, cw, c, bits)
        .view(np.uint8)
        .reshape(-1, len(fields(taps, cw, c, bits)), 1 << bits, 32)
    )
    got = np.zeros(tab.shape[0] * 32, np.int64)
    for n, (i, pos, _) in enumerate(fields(taps, cw, c, bits)):
        v = (int(x[i]) >> pos) & ((1 << bits) - 1)
        got += tab[:, n, v].reshape(-1)
    want = ((bits_w == bits_x[None]) & valid[None]).sum((1, 2))
    assert np.array_equal(got[:o], want)


def test_width_follows_the_flash_budget():
    spec = kernels.ConvSpec(
        in_channels=32,
        out_channels=64,
        in_h=14,
        in_w=14,
        kernel=(3, 3),
        padding=(1, 1),
        stride=(1, 1),
        dilation=(1, 1),
        groups=1,
        bits=1,
        code="pm1",
        act="binary",
        has_offset=False,
        threshold=False,
    )
    assert table_bytes(spec, 4) == 2 * 72 * 16 * 32 and table_bytes(spec, 8) == 2 * 36 * 256 * 32
    assert choose_bits(spec, 1 << 20) == 8
    assert choose_bits(spec, 100_000) == 4  # bytes do not fit: nibbles
    assert choose_bits(spec, 50_000) == 0  # nothing fits: the popcount rows
    assert choose_bits(spec, 1 << 20, "off") == 0 and choose_bits(spec, 1 << 20, 4) == 4
    with pytest.raises(TargetError, match="conv_tables='fast'"):
        choose_bits(spec, 1 << 20, "fast")


class TableShapes(nn.Module):
    """Table convs with padding bits in the last word (40 channels, two words a tap), 64 output
    channels (two blocks), an odd count (33: the last block partial) after stride 2 and dilation
    2 with a two-pixel border, whose float outputs reach the mean (no sign hides an error)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 40, 3, padding=1), nn.BatchNorm2d(40)
        self.c2, self.b2 = nn.Conv2d(40, 64, 3, padding=1), nn.BatchNorm2d(64)
        self.c3, self.b3 = nn.Conv2d(64, 33, 3, stride=2, padding=2, dilation=2), nn.BatchNorm2d(33)
        self.fc = nn.Linear(33, 4)

    def forward(self, x):
        x = F.hardtanh(self.b1(self.c1(x)))
        x = F.hardtanh(self.b2(self.c2(x)))
        return self.fc(self.b3(self.c3(x)).mean((2, 3)))


@needs_toolchain
@pytest.mark.parametrize("core", CORES)
@pytest.mark.parametrize("bits", [4, 8])
def test_table_convs_match_the_reference(core, bits, tmp_path):
    torch.manual_seed(0)
    model, x = randomize_bn(TableShapes()), torch.randn(3, 3, 11, 9)
    cm = bc.compile(model, (x[:1],), target=bc.Target(core, conv_tables=bits), scheme="binary:act=binary")
    cm.export(tmp_path)
    # c2 and c3; byte tables (720 KiB, 1.1 MiB) exceed half the M55 board's 512 KiB: popcount rows
    tables = 0 if (core, bits) == ("cortex-m55", 8) else 2
    assert (tmp_path / "weights.h").read_text().count(f"_tab{bits}[") == tables
    assert torch.equal(cm(x), cm.reference(x))


@needs_toolchain
@pytest.mark.slow
def test_tables_that_leave_no_flash_fall_back_to_the_popcount_rows():
    """48 KiB of flash: c2's nibble tables (36 KiB) fit the tables' budget (3/4) but not the
    board with the program: built again without tables, and still exact."""
    from bench.cortex_m import issue_cnn

    x = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    cm = bc.compile(
        issue_cnn(), (x[:1],), target=bc.Target("cortex-m4", flash_kb=48), scheme="binary:act=binary"
    )
    extra = cm.report().extra
    assert extra["conv_tables"] == "off" and extra["flash_bytes"] <= 48 * 1024, extra
    assert torch.equal(cm(x), cm.reference(x))
