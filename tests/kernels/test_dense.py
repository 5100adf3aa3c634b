"""Dense kernels against numerics.bit_linear, one compiled kernel run at batch 1 and 5."""

import numpy as np
import pytest
import torch

from bitcompiler.kernels import DenseSpec, dense_kernel
from bitcompiler.quant import numerics as nu
from tests.kernels._util import act_inputs, assert_close, build, epilogue_params, random_codes

WEIGHTS = [("pm1", 1, False), ("uint", 2, True), ("uint", 3, False)]
MODES = [
    (act, w, thr)
    for act in ("binary", "int8", "float")
    for w in WEIGHTS
    for thr in (False, True)
    if not (thr and act == "float")
]


# K=100: 4 words (even: the CPU schedule reads int64 words) with a 4-bit tail;
# K=96: 3 words (odd: int32 words), no tail; K=20: a single partial word.
@pytest.mark.parametrize("k, n", [(100, 12), (96, 10), (20, 8)])
@pytest.mark.parametrize("act, weights, threshold", MODES)
def test_dense_matches_reference(k, n, act, weights, threshold):
    code, bits, has_offset = weights
    g = torch.Generator().manual_seed(k * 7 + n)
    spec = DenseSpec(k, n, bits, code, act, has_offset, threshold)
    run = build(dense_kernel(spec))
    planes = nu.code_to_planes(random_codes((n, k), bits, code, g), bits, code)
    ep, kw = epilogue_params(n, threshold, g, has_offset, k)
    if threshold:
        kw.update(scale=torch.ones(n), offset=torch.zeros(n), bias=torch.zeros(n))
    for m in (1, 5):
        x = torch.randn(m, k, generator=g)
        x[0, :3] = 0.0  # sign(0) = +1
        (y,) = run(act_inputs(x, act) + [planes] + ep, [((m, n), "float32")])
        ref = nu.bit_linear(x, planes, k, code, act, **kw)
        if threshold:
            assert np.array_equal(y, ref.numpy())
            assert set(np.unique(y)) <= {-1.0, 1.0}
        else:
            assert_close(y, ref)


def test_batch_is_symbolic_int64():
    f = dense_kernel(DenseSpec(64, 8, 1, "pm1", "binary", False, False))
    text = f.script()
    assert "M = T.int64()" in text or "M = TypeVar" in text
    assert "T.int64(2)" in text  # shapes are int64 throughout


def test_unscheduled_for_other_targets():
    spec = DenseSpec(64, 8, 2, "uint", "int8", True, False)
    f = dense_kernel(spec, target="c")
    assert "T.parallel" not in f.script() and "T.vectorized" not in f.script()
    run = build(f)  # still a valid, correct (serial) kernel
    g = torch.Generator().manual_seed(3)
    planes = nu.code_to_planes(random_codes((8, 64), 2, "uint", g), 2, "uint")
    ep, kw = epilogue_params(8, False, g, True, 64)
    x = torch.randn(2, 64, generator=g)
    (y,) = run(act_inputs(x, "int8") + [planes] + ep, [((2, 8), "float32")])
    assert_close(y, nu.bit_linear(x, planes, 64, "uint", "int8", **kw))


def test_wrong_spec_type():
    with pytest.raises(ValueError, match="DenseSpec"):
        dense_kernel("not a spec")  # type: ignore[arg-type]


@pytest.mark.parametrize("k, n", [(8168, 24), (4096, 20)])
def test_binary_pm1_long_rows_exact(k, n):
    """W1A1 integer sums stay exact over long rows (uint8 lane partial sums) at batch 1 and 64."""
    g = torch.Generator().manual_seed(k + n)
    codes = random_codes((n, k), 1, "pm1", g)
    codes[0] = 1  # row 0 against an all-negative x: every bit differs
    planes = nu.code_to_planes(codes, 1, "pm1")
    run = build(dense_kernel(DenseSpec(k, n, 1, "pm1", "binary", False, False)))
    ones, zeros = torch.ones(n), torch.zeros(n)
    for m in (1, 64):
        x = torch.randn(m, k, generator=g)
        x[0] = -1.0
        (y,) = run(act_inputs(x, "binary") + [planes, ones, zeros, zeros], [((m, n), "float32")])
        ref = nu.bit_linear(x, planes, k, "pm1", "binary", scale=ones, offset=zeros, bias=zeros)
        assert np.array_equal(y, ref.numpy())
        assert y[0, 0] == -k
