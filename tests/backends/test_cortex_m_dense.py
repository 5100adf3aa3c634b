"""Cortex-M dense layers with int8 or float activations on the hand-written C kernels
(backends/cortex_m/dense_c.py) against the reference, on the scalar (M3), DSP (M4) and Helium (M55)
code paths; the kernel layouts against the codes they store."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import bitcompiler as bc
from bitcompiler.backends.cortex_m import binary_c, dense_c
from bitcompiler.backends.cortex_m.qemu import INSTALL, missing_tools
from tests.conftest import assert_close

needs_toolchain = pytest.mark.skipif(
    bool(missing_tools()), reason=f"{', '.join(missing_tools())} missing; install with: {INSTALL}"
)
ISA = {"cortex-m3": "scalar", "cortex-m4": "dsp", "cortex-m55": "mve"}
CORES = [
    pytest.param("cortex-m3", marks=pytest.mark.slow),
    "cortex-m4",
    pytest.param("cortex-m55", marks=pytest.mark.slow),
]


def mlp3() -> nn.Module:
    """Widths that pad: K = 70 (not a multiple of 4, 8 or 16), 37 and 100 rows and inputs."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(70, 37), nn.ReLU(), nn.Linear(37, 100), nn.ReLU(), nn.Linear(100, 6))


@needs_toolchain
@pytest.mark.parametrize("core", CORES)
@pytest.mark.parametrize("bits", [8, 3])
def test_int8_dense_is_bit_exact(core, bits):
    """uint codes 0..255 (stored as Q - 128) and 0..7; every layer on the core's int8 kernel."""
    x = torch.randn(1, 70)
    cm = bc.compile(mlp3(), (x,), target=core, scheme=f"uniform:bits={bits},act=8,first_last=quantize")
    kernels = cm.report().extra["kernels"]
    dense = [k for label, k in kernels.items() if "bit_linear" in label]
    assert len(dense) == 3 and all(k.startswith(f"bitc_dense_int8_{ISA[core]}_") for k in dense), kernels
    xs = torch.randn(4, 70) * 3
    assert torch.equal(cm(xs), cm.reference(xs))


@needs_toolchain
@pytest.mark.parametrize("core", CORES)
def test_default_scheme_float_activations(core):
    """The default scheme: first and last layers 8-bit codes x float (VFMA on FPU cores, the
    portable kernel on M3), the middle one 1-bit x float through the partial-sum tables."""
    x = torch.randn(1, 70)
    cm = bc.compile(mlp3(), (x,), target=core, scheme="binary")
    kernels = list(cm.report().extra["kernels"].values())
    assert kernels[1].startswith("bitc_dense_float_table_37x100")
    first_last = "bitc_dense_float_uint8" if core == "cortex-m3" else "bitc_dense_float_codes"
    assert kernels[0].startswith(first_last) and kernels[2].startswith(first_last), kernels
    xs = torch.randn(4, 70)
    assert_close(cm(xs), cm.reference(xs))


@needs_toolchain
@pytest.mark.parametrize("core", ["cortex-m4", pytest.param("cortex-m55", marks=pytest.mark.slow)])
@pytest.mark.parametrize("k", [8, 20, 64, 136])
def test_sign_tables_at_every_chunk_shape(k, core):
    """One group, a partial group, exactly one chunk, a full chunk then a partial one (M55: the
    Helium table fill and gathers, predicated past the chunk's groups)."""
    torch.manual_seed(k)
    x = torch.randn(1, k)
    cm = bc.compile(nn.Linear(k, 5), (x,), target=core, scheme="binary:first_last=quantize")
    assert next(iter(cm.report().extra["kernels"].values())).startswith("bitc_dense_float_table")
    xs = torch.randn(3, k)
    assert_close(cm(xs), cm.reference(xs))


def test_stored_int8_codes_are_in_the_kernels_order():
    codes = np.arange(6 * 5, dtype=np.int8).reshape(6, 5)
    stored = dense_c.store_int8_codes(codes, 4).reshape(2, 2, 4, 4)  # [N/4][K/4][4 rows][4]
    assert stored[0, 0, 1].tolist() == codes[1, :4].tolist()
    assert stored[1, 1, 1].tolist() == [codes[5, 4], 0, 0, 0]
    assert stored[1, 0, 2].tolist() == [0, 0, 0, 0]  # padded rows are zero


def test_sign_bytes_group_eight_inputs_per_byte():
    planes = np.zeros((1, 2, 3), np.int32)
    planes[0, 1, 0] = 0x0000_0102  # row 1: input 1 and input 8
    planes[0, 1, 2] = 1  # row 1: input 64 (group 8: the second chunk)
    stored = dense_c.store_sign_bytes(planes, 70)  # 9 groups: chunks of 8 and 1
    first, second = stored[:16].reshape(2, 8), stored[16:]
    assert first[1, :2].tolist() == [2, 1] and second.tolist() == [0, 1]


@needs_toolchain
@pytest.mark.parametrize("core", ["cortex-m4", pytest.param("cortex-m55", marks=pytest.mark.slow)])
def test_w1a1_dense_in_c_is_exact(core):
    """Float and threshold epilogues; 7 words (M55: a vector and a predicated tail) and 2 words."""
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(200, 37), nn.Hardtanh(), nn.Linear(37, 70), nn.Hardtanh(), nn.Linear(70, 6))
    x = torch.randn(1, 200)
    cm = bc.compile(net, (x,), target=core, scheme="binary:act=binary,first_last=quantize")
    dense = [k for label, k in cm.report().extra["kernels"].items() if "bit_linear" in label]
    assert len(dense) == 3 and all(k.startswith(f"bitc_{ISA[core]}_dense_binary") for k in dense), dense
    xs = torch.randn(4, 200)
    assert torch.equal(cm(xs), cm.reference(xs))


@needs_toolchain
@pytest.mark.slow
def test_helium_tiled_rows_and_scalar_option():
    """The tiled layer's row kernel on Helium; ``mve=False`` gives the same numbers on the DSP path."""
    torch.manual_seed(2)
    net = nn.Linear(256, 256)  # tiled at this size (a 256x128 layer stays binary)
    x = torch.randn(1, 256)
    scheme = "tiled:p=4,act=binary,first_last=quantize"
    xs = torch.randn(3, 256)
    for mve, isa in ((True, "mve"), (False, "dsp")):
        cm = bc.compile(net, (x,), target=bc.Target("cortex-m55", mve=mve), scheme=scheme)
        assert any(k.startswith(f"bitc_{isa}_tiled_rows") for k in cm.report().extra["kernels"].values())
        assert torch.equal(cm(xs), cm.reference(xs))


def test_half_codes_pair_two_inputs_per_word():
    q = np.arange(5 * 3).reshape(5, 3) - 7  # N = 5 (padded to 8 rows), K = 3 (padded to 4)
    words = dense_c.store_half_codes(q).reshape(2, 2, 4)  # [N/4][K/2][4 rows]
    assert words[0, 0, 1:2].view(np.float16).tolist() == [q[1, 0], q[1, 1]]
    assert words[1, 1, 0:1].view(np.float16).tolist() == [q[4, 2], 0]
    assert words[1, 0, 3] == 0  # padded rows are zero


@needs_toolchain
@pytest.mark.parametrize("core", CORES)
def test_int8_convs_run_the_dense_loop_on_im2col_rows(core):
    """Padding, stride 2, 3 and 8 input channels (K = 27 and 72), 8 and 6 output channels."""
    torch.manual_seed(3)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 6, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6 * 5 * 5, 10),
    )
    x = torch.randn(1, 3, 10, 10)
    cm = bc.compile(net, (x,), target=core, scheme="uniform:bits=8,act=8,first_last=quantize")
    kernels = cm.report().extra["kernels"]
    convs = [k for label, k in kernels.items() if "bit_conv2d" in label]
    assert len(convs) == 2 and all(k.startswith(f"bitc_conv2d_int8_{ISA[core]}_") for k in convs), kernels
    xs = torch.randn(3, 3, 10, 10)
    assert torch.equal(cm(xs), cm.reference(xs))


def test_w1a1_weights_in_the_kernels_order():
    """Rows in pairs (the odd last row alone), group by group; a group of three as p0, p0^p1, p0^p2."""
    rng = np.random.default_rng(0)
    planes = rng.integers(-(2**31), 2**31, size=(1, 3, 5), dtype=np.int64).astype(np.int32)  # KW 5: 3 + 2
    words = binary_c.store_w1a1_words(planes)
    p = planes[0]
    three = lambda r: [p[r, 0], p[r, 0] ^ p[r, 1], p[r, 0] ^ p[r, 2]]
    expected = [*three(0), *three(1), *p[0, 3:5], *p[1, 3:5], *three(2), *p[2, 3:5]]
    assert words.tolist() == [int(v) for v in expected]
    assert binary_c.groups(8) == [(0, 3), (3, 3), (6, 2)] and binary_c.groups(4) == [(0, 3), (3, 1)]


@needs_toolchain
@pytest.mark.parametrize("core", CORES)
def test_w1a1_rows_tokens_and_special_inputs(core):
    """The DSP kernel's cases: odd rows (33, 7), a last group of one word (K = 100: 3 + 1 words) and
    of two (K = 33 + 32), three token rows a call; -0.0, denormals and the largest floats pack as
    ``x >= 0``."""
    torch.manual_seed(4)
    net = nn.Sequential(nn.Linear(100, 33), nn.Hardtanh(), nn.Linear(33, 65), nn.Hardtanh(), nn.Linear(65, 7))
    x = torch.randn(1, 3, 100)
    cm = bc.compile(net, (x,), target=core, scheme="binary:act=binary,first_last=quantize")
    kernels = cm.report().extra["kernels"]
    assert kernels["pack_sign"].startswith("bitc_pack_sign"), kernels
    xs = torch.randn(2, 3, 100)
    big = torch.finfo(torch.float32).max
    xs[0, 0, :6] = torch.tensor([0.0, -0.0, big, -big, 1e-45, -1e-45])
    xs[1, 2, -3:] = torch.tensor([-0.0, -1e-45, 0.0])
    assert torch.equal(cm(xs), cm.reference(xs))


@needs_toolchain
@pytest.mark.parametrize("core", [pytest.param("cortex-m3", marks=pytest.mark.slow), "cortex-m4"])
@pytest.mark.parametrize("k", [960, 1000])
def test_w1a1_long_rows(core, k):
    """Ten and eleven groups of words a row: the M3 folds its byte sums every ten groups."""
    torch.manual_seed(5)
    cm = bc.compile(
        nn.Linear(k, 5), (torch.randn(1, k),), target=core, scheme="binary:act=binary,first_last=quantize"
    )
    assert cm.report().extra["kernels"]["linear (bit_linear)"].startswith(f"bitc_{ISA[core]}_dense_binary")
    xs = torch.randn(3, k)
    assert torch.equal(cm(xs), cm.reference(xs))
