"""Activation quantizers: packed words and int8 codes exactly equal to numerics."""

import math

import numpy as np
import pytest
import torch

from bitcompiler.kernels import pack_sign_nchw, pack_sign_rows, quantize_rows_int8
from bitcompiler.kernels._common import PARALLEL_MIN
from bitcompiler.quant import numerics as nu
from tests.kernels._util import act_inputs, build


@pytest.mark.parametrize("k", [64, 37, 5, 70000])
def test_pack_sign_rows(k):
    func = pack_sign_rows(k)
    assert ("T.parallel(" in func.script()) == (32 * nu.num_words(k) >= PARALLEL_MIN)  # 70000 only
    run = build(func)
    g = torch.Generator().manual_seed(k)
    for m in (1, 5):
        x = torch.randn(m, k, generator=g)
        x[0, 0] = 0.0
        x[-1, -1] = -0.0  # sign(-0) = +1 too (-0 >= 0)
        (y,) = run([x], [((m, nu.num_words(k)), "int32")])
        assert np.array_equal(y, nu.pack_bits((nu.sign(x) > 0).long()).numpy())


@pytest.mark.parametrize("rest", [(40,), (3, 5, 4), (7,), (256, 256)])
def test_quantize_rows_int8(rest):
    func = quantize_rows_int8(rest)
    # rows on threads only where one row is PARALLEL_MIN work (a launch costs more than less saves)
    assert ("T.parallel(" in func.script()) == (2 * math.prod(rest) + 1 >= PARALLEL_MIN)
    run = build(func)
    g = torch.Generator().manual_seed(len(rest))
    for m in (1, 5):
        x = torch.randn(m, *rest, generator=g) * 3
        if m == 5:
            x[1] = 0.0  # all-zero row: s = EPS / 127
        q, s = run([x], [((m, *rest), "int8"), ((m,), "float32")])
        rq, rs = nu.quantize_act_int8(x)
        assert np.array_equal(q, rq.numpy())
        assert np.array_equal(s, rs.numpy())


def test_quantize_rounds_half_to_even():
    run = build(quantize_rows_int8((8,)))
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5]])  # s = 1 exactly
    q, s = run([x], [((1, 8), "int8"), ((1,), "float32")])
    assert s[0] == 1.0
    assert q.tolist() == [[127, 0, 2, 2, 0, -2, -2, 4]]
    assert np.array_equal(q, nu.quantize_act_int8(x)[0].numpy())


@pytest.mark.parametrize(
    "c, h, w, groups",
    [
        (6, 3, 4, 1),
        (40, 2, 3, 2),
        (8, 3, 3, 8),
        (70, 2, 2, 1),
        (70, 3, 14, 1),
        (96, 2, 7, 3),
        (3, 256, 256, 1),
        (64, 32, 32, 1),
        (64, 32, 31, 2),
    ],
)
def test_pack_sign_nchw(c, h, w, groups):
    func = pack_sign_nchw(c, h, w, groups)
    # threads where one sample is PARALLEL_MIN floats read (65,536: a ResNet stem's 64 x 32 x 32)
    assert ("T.parallel(" in func.script()) == (c * h * w >= PARALLEL_MIN)
    run = build(func)
    g = torch.Generator().manual_seed(c)
    for m in (1, 3):
        x = torch.randn(m, c, h, w, generator=g)
        x[0, 0, 0, 0] = 0.0
        (y,) = run([x], [((m, h, w, groups, nu.num_words(c // groups)), "int32")])
        assert np.array_equal(y, act_inputs(x, "binary", groups)[0].numpy())


def test_pack_sign_nchw_vectorizes_widths_no_power_of_two_divides():
    """A 14-wide row is one vector compare per channel word (LLVM splits it), not 14 scalar ones:
    a ResNet 14x14 map packed 5x faster."""
    import tvm

    from tests.kernels._util import host_target

    ll = tvm.compile(tvm.IRModule({"main": pack_sign_nchw(64, 14, 14, 1)}), target=host_target()).mod
    assert "fcmp oge <14 x float>" in ll.inspect_source("ll")


def test_bad_arguments():
    with pytest.raises(ValueError):
        pack_sign_rows(0)
    with pytest.raises(ValueError):
        pack_sign_nchw(6, 2, 2, 4)
    with pytest.raises(ValueError):
        quantize_rows_int8(())


@pytest.mark.parametrize(("c", "h", "w"), [(256, 14, 14), (32, 28, 28), (64, 7, 8)])
def test_pack_sign_nchw_vectorizes_the_plane_when_its_rows_do_not_divide(c, h, w):
    """Rows and columns fused: a 14x14 plane (no vector of whole rows) is packed 4 pixels a step."""
    script = pack_sign_nchw(c, h, w, 1, "llvm -mcpu=core-avx2").script()
    assert "T.vectorized" in script


EXTREMES = [3.4028235e38, -3.4028235e38, 1e-45, -1e-45, -0.0, 0.0]


def _checked_cases():
    # (name, kernel(check), input shape without batch, output shapes per batch)
    def quant(rest):
        return (
            "quantize",
            lambda check: quantize_rows_int8(rest, check=check),
            rest,
            lambda m: [((m, *rest), "int8"), ((m,), "float32")],
        )

    def pack(c, h, w, g):
        return (
            "pack",
            lambda check: pack_sign_nchw(c, h, w, g, check=check),
            (c, h, w),
            lambda m: [((m, h, w, g, nu.num_words(c // g)), "int32")],
        )

    # (3, 256, 256): the parallel schedules; (70, 3, 14): a tail word; (5, 3, 7): no 8 lanes divide
    return [
        quant((3, 32, 32)),
        quant((5, 3, 7)),
        quant((3, 256, 256)),
        pack(256, 14, 14, 1),
        pack(70, 3, 14, 1),
        pack(96, 2, 7, 3),
        pack(3, 256, 256, 1),
    ]


@pytest.mark.parametrize("case", _checked_cases(), ids=lambda c: f"{c[0]}-{'x'.join(map(str, c[2]))}")
def test_checked_kernels_raise_on_nan_or_inf_and_compute_what_the_unchecked_do(case):
    """``check=True`` (a model's input): the same outputs bit for bit, extremes included, and a
    ``ValueError`` for a NaN or Inf anywhere; the unchecked kernel raises nothing."""
    _name, make, rest, outs = case
    plain, checked = build(make(False)), build(make(True))
    g = torch.Generator().manual_seed(7)
    for m in (1, 3):
        x = torch.randn(m, *rest, generator=g) * 5
        flat = x.view(m, -1)
        flat[0, : len(EXTREMES)] = torch.tensor(EXTREMES[: flat.shape[1]])
        for a, b in zip(plain([x], outs(m)), checked([x], outs(m))):
            assert np.array_equal(a, b)
        for bad in (float("nan"), float("inf"), -float("inf")):
            for row, col in ((0, 0), (m - 1, flat.shape[1] - 1), (m - 1, flat.shape[1] // 2)):
                y = x.clone()
                y.view(m, -1)[row, col] = bad
                with pytest.raises(ValueError, match="NaN or Inf"):
                    checked([y], outs(m))
                plain([y], outs(m))  # no check: whatever it computes, no error


def test_check_rows_refuses_a_kernel_without_the_buffer():
    from bitcompiler.kernels import finite

    with pytest.raises(ValueError, match="no buffer 'EX'"):
        finite.check_rows(quantize_rows_int8((8,)), "EX", 0)
    assert finite.checked_params(quantize_rows_int8((8,), check=True)) == [0]
    assert finite.checked_params(pack_sign_nchw(8, 2, 2, 1, check=True)) == [0]
    assert finite.checked_params(pack_sign_nchw(8, 2, 2, 1)) == []
