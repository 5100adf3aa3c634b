"""The rows-in-lanes W1A1 kernel (Harley-Seal) against numerics.bit_linear, and its use by compile()."""

import numpy as np
import pytest
import torch

import bitcompiler as bc
from bitcompiler.kernels import DenseSpec
from bitcompiler.kernels.dense_avx2 import popcnt512_target
from bitcompiler.kernels.dense_lanes import fits, lanes_kernel, lanes_layout
from bitcompiler.quant import numerics as nu
from tests.backends.test_lower import kernels_called
from tests.conftest import assert_close as assert_close_t
from tests.kernels._util import (
    act_inputs,
    assert_close,
    build,
    check_w1a1_extremes,
    epilogue_params,
    host_target,
    random_codes,
)


# K=128: one Harley-Seal block; K=384: 3 blocks in one uint8 chunk; K=7936: 62 blocks, two chunks
# of 31 (the uint8 sums widen between them); N=32 and 96: one and three row groups
@pytest.mark.parametrize("k, n", [(128, 32), (384, 96), (7936, 32)])
@pytest.mark.parametrize("threshold", [False, True])
def test_lanes_matches_reference(k, n, threshold):
    g = torch.Generator().manual_seed(k + n)
    spec = DenseSpec(k, n, 1, "pm1", "binary", False, threshold)
    assert fits(spec)
    run = build(lanes_kernel(spec))
    planes = nu.code_to_planes(random_codes((n, k), 1, "pm1", g), 1, "pm1")
    ep, kw = epilogue_params(n, threshold, g, False, k)
    if threshold:
        kw.update(scale=torch.ones(n), offset=torch.zeros(n), bias=torch.zeros(n))
    pt = torch.from_numpy(lanes_layout(planes.numpy()))
    for m in (1, 5):
        x = torch.randn(m, k, generator=g)
        x[0, :3] = 0.0  # sign(0) = +1
        (y,) = run([x, pt] + ep, [((m, n), "float32")])  # the kernel packs x's signs itself
        ref = nu.bit_linear(x, planes, k, "pm1", "binary", **kw)
        if threshold:
            assert np.array_equal(y, ref.numpy())
        else:
            assert_close(y, ref)


def test_lanes_accumulator_is_exact():
    """Unit scales and zero bias: the output is the integer accumulator K - 2*popcount, exactly,
    including the extremes (all bits agree: K; all differ: -K). K=4096 is 32 blocks: uint8 sums
    over all of them would wrap at the all-differ row (32 x 8 = 256)."""
    check_w1a1_extremes(lanes_kernel, lanes_layout, 4096, 32, batch=3, row=0)


@pytest.mark.parametrize("p, scales, threshold", [(4, 4, False), (2, 128, False), (4, 0, True)])
def test_lanes_expand_equals_byte_lane_fused_kernel(p, scales, threshold):
    """The fused tiled epilogue (Y[m, c*R + n] from row n's accumulator, p or N scales) is the same
    as the byte-lane fused kernel's, exactly."""
    from bitcompiler.kernels.dense_binary import binary_bytes_func, byte_layout, schedule_binary
    from bitcompiler.kernels.template import Template, apply_hand

    k, r = 256, 64
    rows = DenseSpec(k, r, 1, "pm1", "binary", False, threshold)
    g = torch.Generator().manual_seed(p + scales)
    planes = nu.code_to_planes(random_codes((r, k), 1, "pm1", g), 1, "pm1")
    ref_func = apply_hand(Template("tiled", binary_bytes_func(rows, *byte_layout(rows), expand=p, scales=scales),
                                   lambda sch, choose: schedule_binary(sch, rows, False, choose)))  # fmt: skip
    if threshold:
        ep = [torch.randint(-1, 2, (p * r,), generator=g, dtype=torch.int32),
              torch.randint(-40, 40, (p * r,), generator=g, dtype=torch.int32)]  # fmt: skip
    else:
        ep = [torch.randn(scales, generator=g), torch.randn(p * r, generator=g)]
    x = torch.randn(3, k, generator=g)
    out = [((3, p * r), "float32")]
    (want,) = build(ref_func)(act_inputs(x, "binary") + [planes] + ep, out)
    pt = torch.from_numpy(lanes_layout(planes.numpy()))
    (got,) = build(lanes_kernel(rows, expand=p, scales=scales))([x, pt] + ep, out)
    assert np.array_equal(got, want)


def test_lanes_layout_transposes_bytes():
    planes = torch.arange(2 * 64 * 4, dtype=torch.int32).reshape(1, 64, 8)  # N=64, K=256
    pt = lanes_layout(planes.numpy())
    assert pt.shape == (2, 32, 32) and pt.dtype == np.uint8
    rows = planes[0].numpy().view(np.uint8)  # (64, 32): byte kb of row n
    assert pt[1, 5, 7] == rows[32 + 7, 5]


@pytest.mark.parametrize(
    "spec",
    [
        DenseSpec(100, 32, 1, "pm1", "binary", False, False),  # K not whole blocks
        DenseSpec(128, 40, 1, "pm1", "binary", False, False),  # N not whole row groups
        DenseSpec(128, 32, 2, "uint", "binary", True, False),  # not pm1
        DenseSpec(128, 32, 1, "pm1", "int8", False, False),  # not binary activations
    ],
)
def test_lanes_refuses_other_layers(spec):
    assert not fits(spec)
    with pytest.raises(ValueError, match="rows-in-lanes"):
        lanes_kernel(spec)


def test_compile_uses_lanes_kernel_for_w1a1_linear():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 64), torch.nn.Linear(64, 100)).eval()
    x = torch.randn(1, 256)
    cm = bc.compile(model, (x,), scheme="binary:act=binary,first_last=quantize")
    names = kernels_called(cm)
    # a host with AVX-512 vector popcounts takes the vpopcntq kernel instead (test_dense_vpop.py)
    suffix = "_vpop" if popcnt512_target(host_target()) else "_lanes"
    assert any("256x64" in name and name.endswith(suffix) for name in names), names
    assert not any("64x100_lanes" in name for name in names), names  # K=64: byte-lane kernel
    for batch in (1, 7):
        xb = torch.randn(batch, 256)
        assert_close_t(cm(xb), cm.reference(xb))


def test_lanes_batch_nest_launches_the_thread_pool_once():
    """Each nest's outermost loop is its only parallel loop (the batch nest's batch blocks are fused
    with the row-group tasks): one thread-pool launch per call, not one per batch block."""
    from tvm import s_tir, tirx

    sch = s_tir.Schedule(lanes_kernel(DenseSpec(256, 64, 1, "pm1", "binary", False, False)))
    for block in ("rows", "rows1"):
        kinds = [sch.get(lp).kind for lp in sch.get_loops(sch.get_sblock(block))]
        assert kinds[0] == tirx.ForKind.PARALLEL, block
        assert kinds.count(tirx.ForKind.PARALLEL) == 1, block
