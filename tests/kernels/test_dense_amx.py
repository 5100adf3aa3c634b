"""The W1A1 dense kernel's AMX branch (``dense_amx``, calls of 32 batch rows or more): bit-exact
against the numerics and the vector-popcount nest for both epilogues, with padding past K, partial
batch tiles and 1 to 3 tasks on TVM's pool; small layers and targets without AMX have no branch;
a compiled model at batch 40 matches its reference."""

import numpy as np
import pytest
import torch

import bitcompiler as bc
from bitcompiler import amx
from bitcompiler.kernels import DenseSpec, amx_tiles, dense_amx, relaid_dense_kernel
from bitcompiler.kernels.dense_vpop import vpop_kernel, vpop_layout
from bitcompiler.quant import numerics as nu
from bitcompiler.target import Target, backend_for
from tests.conftest import assert_close as assert_close_t
from tests.kernels._util import assert_close, build, check_w1a1_extremes, epilogue_params, random_codes

CPU = backend_for(Target("cpu")).tvm_target(Target("cpu"))
needs_amx = pytest.mark.skipif(not amx_tiles.amx_target(CPU), reason="the host has no AMX tiles it may use")


@pytest.fixture(autouse=True)
def any_work(monkeypatch):
    """The branch for these small layers too (in a model it waits for 2^21 words of work)."""
    monkeypatch.setattr(dense_amx, "MIN_WORDS", 0)


def _uses_tiles(func) -> bool:
    return "tdpbssd" in func.script()


def _run(func):
    once = build(func, CPU)

    def run(inputs, shapes, calls=3):  # repeated on the pool: a task reading another's buffer would differ
        first = once(inputs, shapes)
        for _ in range(calls - 1):
            assert all(np.array_equal(a, b) for a, b in zip(first, once(inputs, shapes)))
        return first

    return run


# K=512: the smallest with the branch, one tile pair; K=1000: a last word of padding (and a partial
# byte), three pairs; batches: below the branch (31), one tile pair, a partial pair and tile (33, 47),
# two pairs, and a partial last pair (100)
@needs_amx
@pytest.mark.parametrize("k, n", [(512, 32), (1000, 96)])
@pytest.mark.parametrize("threshold", [False, True])
def test_amx_branch_matches_reference_and_the_vpop_nest(k, n, threshold):
    g = torch.Generator().manual_seed(k + n + threshold)
    spec = DenseSpec(k, n, 1, "pm1", "binary", False, threshold)
    with_tiles = vpop_kernel(spec, amx_cores=2)
    assert _uses_tiles(with_tiles)
    amx_run, plain = _run(with_tiles), build(vpop_kernel(spec), CPU)
    planes = nu.code_to_planes(random_codes((n, k), 1, "pm1", g), 1, "pm1")
    ep, kw = epilogue_params(n, threshold, g, False, k)
    if threshold:
        kw.update(scale=torch.ones(n), offset=torch.zeros(n), bias=torch.zeros(n))
    wt = torch.from_numpy(vpop_layout(planes.numpy(), k))
    for m in (31, 32, 33, 47, 64, 100):
        x = torch.randn(m, k, generator=g)
        x[0, :3] = 0.0  # sign(0) = +1
        x[-1, -1] = -0.0  # also +1, in the last partial byte where K % 8 != 0
        (y,) = amx_run([x, wt] + ep, [((m, n), "float32")])
        ref = nu.bit_linear(x, planes, k, "pm1", "binary", **kw)
        if threshold:
            assert np.array_equal(y, ref.numpy())
        else:
            assert_close(y, ref)
        (y_plain,) = plain([x, wt] + ep, [((m, n), "float32")])
        assert np.array_equal(y, y_plain), m


@needs_amx
def test_amx_accumulator_is_exact_at_the_extremes():
    """Unit scales, zero bias, batch 40: K where every bit agrees and -K where none does."""
    check_w1a1_extremes(
        lambda spec: vpop_kernel(spec, amx_cores=2), vpop_layout, 4096, 32, batch=40, row=37, target=CPU
    )


@needs_amx
def test_task_counts_agree():
    """1, 2 or 3 tasks (chunks of output tile pairs, the last short): the same bits."""
    k, n, m = 640, 160, 50
    g = torch.Generator().manual_seed(9)
    spec = DenseSpec(k, n, 1, "pm1", "binary", False, False)
    planes = nu.code_to_planes(random_codes((n, k), 1, "pm1", g), 1, "pm1")
    ep, _ = epilogue_params(n, False, g, False, k)
    inputs = [torch.randn(m, k, generator=g), torch.from_numpy(vpop_layout(planes.numpy(), k))] + ep
    outs = [_run(vpop_kernel(spec, amx_cores=c))(inputs, [((m, n), "float32")])[0] for c in (1, 2, 3)]
    assert np.array_equal(outs[0], outs[1]) and np.array_equal(outs[0], outs[2])


def test_calls_take_the_branch_from_32_rows_and_enough_work():
    dense_amx.MIN_WORDS = 1 << 21  # as in a model (the fixture puts it back)
    assert dense_amx.min_rows(4096, 4096) == 32  # 4096 x 64 words a row
    assert dense_amx.min_rows(1024, 256) == 512  # an MLP-Mixer's channel layer: not at 64 tokens
    text = vpop_kernel(DenseSpec(1024, 256, 1, "pm1", "binary", False, False), amx_cores=2).script()
    assert "M >= T.int64(512)" in text and "tdpbssd" in text


def test_only_layers_and_targets_that_pay_have_the_branch():
    assert dense_amx.fits(512, 32) and dense_amx.fits(4096, 4096)
    assert not dense_amx.fits(256, 1024)  # few inputs: the vector popcounts were as fast
    assert not dense_amx.fits(4096, 40)  # not whole pairs of 16-row tiles
    assert not _uses_tiles(vpop_kernel(DenseSpec(256, 1024, 1, "pm1", "binary", False, False), amx_cores=2))
    spec = DenseSpec(1024, 256, 1, "pm1", "binary", False, False)
    planes = nu.code_to_planes(random_codes((256, 1024), 1, "pm1", torch.Generator()), 1, "pm1").numpy()
    for target in ({"kind": "llvm", "mcpu": "icelake-server"}, {"kind": "llvm", "mcpu": "znver4"}):
        relaid = relaid_dense_kernel(spec, planes, target)
        assert relaid is not None and relaid.suffix == "vpop" and not _uses_tiles(relaid.func), target
    sapphire = relaid_dense_kernel(spec, planes, {"kind": "llvm", "mcpu": "sapphirerapids"})
    assert sapphire is not None and _uses_tiles(sapphire.func) == amx.enable()


@needs_amx
def test_compiled_w1a1_mlp_matches_its_reference_at_batch_40():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 512), torch.nn.Linear(512, 96), torch.nn.Linear(96, 10))
    cm = bc.compile(model.eval(), (torch.randn(40, 64),), scheme="binary:act=binary,first_last=quantize")
    x = torch.randn(40, 64)
    assert_close_t(cm(x), cm.reference(x))
