"""The AVX-512 vector-popcount W1A1 kernel against numerics.bit_linear and the rows-in-lanes kernel,
and its use by compile() on a host that has ``vpopcntq``."""

import numpy as np
import pytest
import torch

import bitcompiler as bc
from bitcompiler.kernels import DenseSpec
from bitcompiler.kernels.dense_avx2 import popcnt512_target
from bitcompiler.kernels.dense_lanes import lanes_kernel, lanes_layout
from bitcompiler.kernels.dense_vpop import fits, vpop_kernel, vpop_layout
from bitcompiler.quant import numerics as nu
from tests.backends.test_lower import kernels_called
from tests.conftest import assert_close as assert_close_t
from tests.kernels._util import (
    assert_close,
    build,
    check_w1a1_extremes,
    epilogue_params,
    host_target,
    random_codes,
)

pytestmark = pytest.mark.skipif(
    not popcnt512_target(host_target()), reason="the host has no AVX-512 vector popcount (vpopcntq)"
)


# K=64: one word; K=1024, N=256: the MLP-Mixer's channel layer; N=8 and 40: one and five row groups;
# K=16, 100, 196, 200: a last word of padding (a Mixer's token layer over 16 or 196 patches), 100
# and 196 also a last partial byte; batches 1 (its own nest), 5 (a partial block of 4 rows) and 64
@pytest.mark.parametrize("k, n", [(64, 8), (1024, 40), (256, 256), (16, 16), (100, 8), (196, 24), (200, 40)])
@pytest.mark.parametrize("threshold", [False, True])
def test_vpop_matches_reference_and_the_lanes_kernel(k, n, threshold):
    g = torch.Generator().manual_seed(k + n)
    spec = DenseSpec(k, n, 1, "pm1", "binary", False, threshold)
    assert fits(spec)
    run = build(vpop_kernel(spec))
    planes = nu.code_to_planes(random_codes((n, k), 1, "pm1", g), 1, "pm1")
    ep, kw = epilogue_params(n, threshold, g, False, k)
    if threshold:
        kw.update(scale=torch.ones(n), offset=torch.zeros(n), bias=torch.zeros(n))
    wt = torch.from_numpy(vpop_layout(planes.numpy(), k))
    lanes = lanes_fits = n % 32 == 0 and k % 128 == 0
    if lanes_fits:
        lanes = build(lanes_kernel(spec))
    for m in (1, 5, 64):
        x = torch.randn(m, k, generator=g)
        x[0, :3] = 0.0  # sign(0) = +1
        x[-1, 3] = -0.0  # also +1: -0.0 >= 0
        x[-1, -1] = -0.0  # in the last partial byte where K % 8 != 0
        (y,) = run([x, wt] + ep, [((m, n), "float32")])  # the kernel packs x's signs itself
        ref = nu.bit_linear(x, planes, k, "pm1", "binary", **kw)
        if threshold:
            assert np.array_equal(y, ref.numpy())
        else:
            assert_close(y, ref)
        if lanes_fits:  # the same numbers as the rows-in-lanes kernel, bit for bit
            pt = torch.from_numpy(lanes_layout(planes.numpy()))
            (y_lanes,) = lanes([x, pt] + ep, [((m, n), "float32")])
            assert np.array_equal(y, y_lanes)


@pytest.mark.parametrize("threshold", [False, True])
def test_vpop_gelu_variant_packs_by_the_gelu_sign_rule(threshold):
    """``gelu=True``: the kernel reads a GELU's input and binarizes it as ``numerics.gelu_sign32``
    (+1 at and above 0 and at and below -5.54): the numbers of the rule followed by the plain kernel."""
    g = torch.Generator().manual_seed(3)
    k, n = 252, 40  # a last partial byte too
    spec = DenseSpec(k, n, 1, "pm1", "binary", False, threshold)
    run = build(vpop_kernel(spec, gelu=True))
    planes = nu.code_to_planes(random_codes((n, k), 1, "pm1", g), 1, "pm1")
    ep, kw = epilogue_params(n, threshold, g, False, k)
    if threshold:
        kw.update(scale=torch.ones(n), offset=torch.zeros(n), bias=torch.zeros(n))
    wt = torch.from_numpy(vpop_layout(planes.numpy(), k))
    for m in (1, 5, 64):
        x = 6 * torch.randn(m, k, generator=g)
        limit = float(np.float32(nu.GELU_ZERO_BELOW))
        x[0, :4] = torch.tensor([0.0, -0.0, limit, float(np.nextafter(np.float32(limit), 0))])
        x[-1, -2:] = torch.tensor([limit, -1.0])  # the rule in the last partial byte
        (y,) = run([x, wt] + ep, [((m, n), "float32")])
        ref = nu.bit_linear(nu.exact_unary(x, "gelu_sign"), planes, k, "pm1", "binary", **kw)
        if threshold:
            assert np.array_equal(y, ref.numpy())
        else:
            assert_close(y, ref)
        assert (nu.exact_unary(x, "gelu_sign") != nu.sign(x)).any()  # the rule moved some signs


def test_vpop_runs_batches_of_few_words_on_the_calling_thread():
    """Batch rows x N x K/64 words below PARALLEL_MIN take a serial copy of the batched nest (the
    test above runs both: 256 x 256 at batch 64 is 65,536 words, at batch 5 far fewer)."""
    text = vpop_kernel(DenseSpec(64, 128, 1, "pm1", "binary", False, False)).script()
    assert "M * T.int64(128) >= T.int64(65536)" in text and 'T.sblock("rows_serial' in text
    serial = text.split('T.sblock("rows_serial')[0].rsplit("else:", 1)[1]
    assert "T.parallel(" not in serial


def test_vpop_accumulator_is_exact_at_the_extremes():
    """Unit scales, zero bias: the output is K - 2*popcount exactly, K where every bit agrees and -K
    where none does."""
    check_w1a1_extremes(vpop_kernel, vpop_layout, 4096, 8, batch=6, row=5)


@pytest.mark.parametrize(
    "spec",
    [
        DenseSpec(128, 12, 1, "pm1", "binary", False, False),  # N not whole groups of 8
        DenseSpec(128, 32, 2, "uint", "binary", True, False),  # not pm1
        DenseSpec(128, 32, 1, "pm1", "int8", False, False),  # not binary activations
    ],
)
def test_vpop_refuses_other_layers(spec):
    assert not fits(spec)
    with pytest.raises(ValueError, match="vector-popcount"):
        vpop_kernel(spec)


def test_compile_uses_vpop_kernel_for_w1a1_linear():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 64), torch.nn.Linear(64, 96), torch.nn.Linear(96, 10))
    cm = bc.compile(model.eval(), (torch.randn(1, 256),), scheme="binary:act=binary,first_last=quantize")
    names = kernels_called(cm)
    assert any("256x64" in name and name.endswith("_vpop") for name in names), names
    assert any("64x96" in name and name.endswith("_vpop") for name in names), names
    assert not any("96x10" in name and "_vpop" in name for name in names), names  # K=96: not whole words
    for batch in (1, 7):
        xb = torch.randn(batch, 256)
        assert_close_t(cm(xb), cm.reference(xb))
