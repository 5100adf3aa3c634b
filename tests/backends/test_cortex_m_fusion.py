"""Cortex-M convs in C with the float ops after them fused (backends/cortex_m/fusion.py, conv_c.py):
which maps are never stored, the arena plan replayed, and the compiled models against the
reference on the scalar (M3), DSP (M4) and Helium (M55) cores."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bitcompiler as bc
from bench.cortex_m import issue_cnn
from tests.backends.test_cortex_m_memory import check_plan, needs_toolchain, program_for
from tests.conftest import randomize_bn

RAM_GOAL = 48 * 1024
CORES = [
    pytest.param("cortex-m3", marks=pytest.mark.slow),
    pytest.param("cortex-m4", marks=pytest.mark.slow),
    pytest.param("cortex-m55", marks=pytest.mark.slow),
]


def cnn_input(batch: int = 1) -> tuple[torch.Tensor, ...]:
    return (torch.randn(batch, 1, 28, 28, generator=torch.Generator().manual_seed(1)),)


def stored(program) -> dict[str, int]:
    """Arena tensors by name -> bytes."""
    return {n: t.nbytes for n, t in program.tensors.items() if t.storage in program.plan.offsets}


def test_issue_cnn_plan_keeps_no_float_map():
    """The residual's 28x28x32 maps: c1 writes only its packed signs and is recomputed inside
    c2's kernel, c2 writes the packed signs of relu + add, c3 the channel sums of the mean."""
    program = program_for(issue_cnn(), cnn_input(), backend=True)
    check_plan(program)
    sizes = stored(program)
    assert max(sizes.values()) <= 28 * 28 * 4, sizes  # one int32 word (or less) per pixel
    assert program.plan.arena_bytes + 16 * 1024 <= RAM_GOAL, program.plan.arena_bytes
    labels = [s.label for s in program.steps]
    assert not any("relu" in label or "add" in label or "mean" in label for label in labels), labels
    c2 = next(s for s in program.steps if s.label.startswith("c2 "))
    assert "x_q8" in c2.reads, c2  # c1 recomputed from its int8 input


def test_recompute_off_stores_the_residual():
    program = program_for(issue_cnn(), cnn_input(), backend=True, recompute=False)
    check_plan(program)
    assert max(stored(program).values()) == 28 * 28 * 32 * 4  # c1's map, read by c2's kernel


class Fusions(nn.Module):
    """Each chain and sink: hardtanh + sub of a stored tensor (float sink, read by a max-pool and
    the next conv), mul by a constant then packed signs, a recomputed binary conv, a mean."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(2, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.c2, self.b2 = nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.c3, self.b3 = nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16)
        self.c4, self.b4 = nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = self.b1(self.c1(x))
        y = F.hardtanh(self.b2(self.c2(x)), -0.5, 2.0) - x  # x stored: c1's float map, read twice
        y = F.max_pool2d(y, 2) + F.avg_pool2d(y, 2)  # float ops on the float sink
        z = F.relu(self.b3(self.c3(y))) * 0.5
        z = z + F.hardtanh(self.b4(self.c4(z)))  # c3 recomputed in c4's kernel
        return self.fc(z.mean((2, 3)))


def fusions() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    torch.manual_seed(0)
    return randomize_bn(Fusions()), (torch.randn(2, 2, 12, 12),)


def test_every_chain_and_sink_plans_without_overlap():
    program = program_for(*fusions(), backend=True)
    check_plan(program)
    labels = [s.label for s in program.steps]
    assert any("sub" in n for s in program.steps for n in s.writes if s.label.startswith("c2 ")), labels
    c3 = next(s for s in program.steps if s.label.startswith("c3 "))
    c4 = next(s for s in program.steps if s.label.startswith("c4 "))
    assert set(c3.reads) <= set(c4.reads) and c4.writes == ["window_mean_1"], (
        c3,
        c4,
    )  # c3 again, then the mean


@needs_toolchain
@pytest.mark.parametrize("core", CORES)
def test_fused_chains_match_the_reference(core):
    model, x = fusions()
    cm = bc.compile(model, x, target=core, scheme="binary:act=binary")
    kernels = cm.report().extra["kernels"]
    assert sum("_binary_" in k for k in kernels.values()) == 3, kernels
    assert torch.equal(cm(*x), cm.reference(*x))


class RowShapes(nn.Module):
    """W1A1 convs in the shapes the dense row loop meets per pixel: two words a tap with padding
    bits (40 channels), stride and dilation with a two-pixel border, odd channel counts (the last
    row alone), a 1x1 conv (one group of two words, no border) and 5x5 taps (25 words: a last
    group of one)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 40, 3, padding=1), nn.BatchNorm2d(40)
        self.c2, self.b2 = nn.Conv2d(40, 33, 3, stride=2, padding=2, dilation=2), nn.BatchNorm2d(33)
        self.c3 = nn.Conv2d(33, 7, 1)
        self.c4 = nn.Conv2d(7, 5, 5, padding=2)
        self.fc = nn.Linear(5, 3)

    def forward(self, x):
        x = F.relu(self.b1(self.c1(x)))
        x = F.hardtanh(self.b2(self.c2(x)))
        x = F.hardtanh(self.c3(x), -0.5, 1.0)
        return self.fc(self.c4(x).mean((2, 3)))


@needs_toolchain
@pytest.mark.parametrize("core", CORES)
def test_w1a1_conv_row_shapes_match_the_reference(core):
    torch.manual_seed(0)
    model, x = randomize_bn(RowShapes()), torch.randn(2, 3, 9, 9)
    cm = bc.compile(model, (x[:1],), target=core, scheme="binary:act=binary")
    kernels = cm.report().extra["kernels"]
    assert sum("_binary_" in k for k in kernels.values()) == 3, kernels
    assert torch.equal(cm(x), cm.reference(x))


class SmallFields(nn.Module):
    """int8 convs whose field ``KH * KW * C`` is at most 16 (conv_c's code pairs by SMLAD): 9
    values with a dilated two-pixel border, 12 (two LDMs: four words, then two) with stride 2, 12
    in a 1x1 conv, and 7 (an odd field: the last pair holds one code); odd channel counts; a
    residual of two stems, so that one kernel sums two convs' pairs."""

    def __init__(self) -> None:
        super().__init__()
        self.c0, self.s0 = nn.Conv2d(1, 3, 3, padding=2, dilation=2), nn.Conv2d(1, 3, 3, padding=1)
        self.c1 = nn.Conv2d(3, 12, 2, stride=2)
        self.c2, self.c3 = nn.Conv2d(12, 7, 1), nn.Conv2d(7, 5, 1)
        self.fc = nn.Linear(5, 3)

    def forward(self, x):
        x = F.relu(self.c0(x)) + self.s0(x)  # two stems on the image: one recomputed in the other's kernel
        x = F.relu(self.c1(x))
        x = self.c3(F.hardtanh(self.c2(x)))
        return self.fc(x.mean((2, 3)))


@needs_toolchain
@pytest.mark.parametrize("core", CORES)
def test_small_field_int8_convs_match_the_reference(core):
    torch.manual_seed(0)
    model, x = SmallFields().eval(), torch.randn(2, 1, 10, 10)
    cm = bc.compile(model, (x[:1],), target=core, scheme="uniform:bits=8,act=8")
    source = (cm._runner.bundle / "kernels.c").read_text()
    pairs = core != "cortex-m3"  # DSP cores only: M3 has no SMLAD
    assert (source.count("ldm %[w]!") >= 5) == pairs, "every small-field conv sums code pairs"
    assert ("ldm %[w]!, {r4, r5}\\n" in source) == pairs, "two convs' pairs in one kernel: two words an LDM"
    assert torch.equal(cm(x), cm.reference(x))


@needs_toolchain
@pytest.mark.parametrize("core", CORES)
def test_issue_cnn_fits_48kb_and_matches_the_reference(core):
    x = cnn_input(2)
    cm = bc.compile(issue_cnn(), (x[0][:1],), target=core, scheme="binary:act=binary")
    ref = cm.reference(*x)
    assert not torch.equal(ref[0], ref[1]), "the binary convs' inputs must vary with the image"
    assert torch.equal(cm(*x), ref)
    extra = cm.report().extra
    assert extra["ram_bytes"] <= RAM_GOAL, extra  # measured: .data + .bss + the painted stack
    assert extra["arena_bytes"] <= extra["ram_bytes"]


@needs_toolchain
@pytest.mark.parametrize("core", CORES)
@pytest.mark.parametrize(
    "scheme", ["binary:act=binary,first_last=quantize", "uniform:bits=8,act=8,first_last=quantize"]
)
def test_mlp_784_128_10_is_bit_exact(core, scheme):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 10)).eval()
    x = torch.randn(2, 1, 28, 28)
    cm = bc.compile(net, (x[:1],), target=core, scheme=scheme)
    assert torch.equal(cm(x), cm.reference(x))
