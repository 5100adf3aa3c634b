"""Tiled dense kernels against numerics.tiled_linear: row-aligned (two stages, and fused for binary
activations on the CPU) and unaligned shapes."""

import numpy as np
import pytest
import torch

from bitcompiler.kernels import (
    ConvSpec,
    TiledConvSpec,
    TiledDenseSpec,
    conv2d_kernel,
    dense_kernel,
    tiled_conv_expand_kernel,
    tiled_expand_kernel,
    tiled_fused_kernel,
    tiled_unaligned_kernel,
)
from bitcompiler.quant import numerics as nu
from tests.kernels._util import act_inputs, assert_close, build

MODES = [("binary", False), ("binary", True), ("int8", False), ("int8", True), ("float", False)]


def _layer(k, n, p, act, threshold, per_channel, seed):
    g = torch.Generator().manual_seed(seed)
    tile = torch.randint(0, 2, (n * k // p,), generator=g) * 2 - 1
    words = nu.pack_tile(tile, n, k, p)
    scale = torch.rand(n if per_channel else p, generator=g) + 0.5
    bias = torch.rand(n, generator=g) - 0.5
    ts = torch.randint(-1, 2, (n,), generator=g).to(torch.int32)
    th = torch.randint(-k, k + 1, (n,), generator=g).to(torch.int32)
    spec = TiledDenseSpec(k, n, p, act, threshold, scale.numel())
    epi = [ts, th] if threshold else [scale, bias]
    return spec, words, scale, bias, ts, th, epi, g


def _reference(x, words, spec, scale, bias, ts, th):
    thr = (ts, th) if spec.threshold else (None, None)
    return nu.tiled_linear(x, words, spec.in_features, spec.out_features, spec.p, spec.act, scale, bias, *thr)


def _check(y, ref, threshold):
    if threshold:
        assert np.array_equal(y, ref.numpy())
    else:
        assert_close(y, ref)


# K=100 (even words -> int64 word schedule, tail bits), K=96 (odd words); N=16 at p=4 and p=8
ALIGNED = [(100, 16, 4, act, thr) for act, thr in MODES if (act, thr) != ("int8", True)] + [
    (96, 16, 8, "binary", False)
]
UNALIGNED = [
    (100, 10, 4, "binary", False),
    (100, 10, 4, "int8", True),
    (100, 10, 4, "float", False),
    (20, 12, 8, "binary", True),
]


@pytest.mark.parametrize("k, n, p, act, threshold", ALIGNED)
def test_row_aligned_two_stage_matches_reference(k, n, p, act, threshold):
    spec, words, scale, bias, ts, th, epi, g = _layer(k, n, p, act, threshold, p == 8, k + n + p)
    assert spec.aligned and words.shape == (1, n // p, nu.num_words(k))
    rows = build(dense_kernel(spec.rows_spec()))
    expand = build(tiled_expand_kernel(spec))
    r = spec.rows
    for m in (1, 3):
        x = torch.randn(m, k, generator=g)
        x[0, :2] = 0.0
        xin = act_inputs(x, act)
        stage1 = xin if act != "int8" else [xin[0], torch.ones(m)]
        (a,) = rows([*stage1, words, torch.ones(r), torch.zeros(r), torch.zeros(r)], [((m, r), "float32")])
        # stage 1 is the exact integer dot product of each distinct row, computed once
        q_rows = nu.unpack_tile(words, n, k, p).reshape(r, k)
        xi, _ = nu.quantize_act(x, act)
        exact = (xi @ q_rows.double().t()).float().numpy()
        if act == "float":
            assert_close(a, torch.from_numpy(exact))
        else:
            assert np.array_equal(a, exact)
        xs = [xin[1]] if act == "int8" and not threshold else []
        (y,) = expand([a, *xs, *epi], [((m, n), "float32")])
        _check(y, _reference(x, words, spec, scale, bias, ts, th), threshold)


# K = 512 / 256 (full 32-byte vectors: the byte-lane rows kernel), R = 8 / 4 / 6 rows per block,
# p scales or N scales (after a merged affine), threshold
FUSED = [
    (512, 64, 8, False, False),
    (512, 64, 8, True, False),
    (256, 16, 4, False, True),
    (256, 24, 4, True, True),
]


@pytest.mark.parametrize("k, n, p, threshold, per_channel", FUSED)
def test_row_aligned_fused_matches_reference(k, n, p, threshold, per_channel):
    spec, words, scale, bias, ts, th, epi, g = _layer(k, n, p, "binary", threshold, per_channel, k + n)
    func = tiled_fused_kernel(spec)
    assert func is not None and "T.parallel" in func.script()
    run = build(func)
    for m in (1, 3):
        x = torch.randn(m, k, generator=g)
        x[0, :2] = 0.0
        (y,) = run([*act_inputs(x, "binary"), words, *epi], [((m, n), "float32")])
        _check(y, _reference(x, words, spec, scale, bias, ts, th), threshold)


def test_fused_only_where_it_applies():
    assert tiled_fused_kernel(TiledDenseSpec(512, 64, 8, "int8", False, 8)) is None  # not binary
    assert tiled_fused_kernel(TiledDenseSpec(100, 16, 4, "binary", False, 4)) is None  # short rows
    assert tiled_fused_kernel(TiledDenseSpec(100, 10, 4, "binary", False, 4)) is None  # unaligned
    assert tiled_fused_kernel(TiledDenseSpec(512, 64, 8, "binary", False, 8), target="c") is None


# q = 10*100/4 = 250 (rows straddle chunks), q = 12*20/8 = 30 > K (a tile spans rows at an offset)
@pytest.mark.parametrize("k, n, p, act, threshold", UNALIGNED)
def test_unaligned_matches_reference(k, n, p, act, threshold):
    spec, words, scale, bias, ts, th, epi, g = _layer(k, n, p, act, threshold, False, k * n + p)
    assert not spec.aligned and words.shape == (nu.num_words(n * k // p),)
    run = build(tiled_unaligned_kernel(spec))
    for m in (1, 4):
        x = torch.randn(m, k, generator=g)
        (y,) = run([*act_inputs(x, act), words, *epi], [((m, n), "float32")])
        _check(y, _reference(x, words, spec, scale, bias, ts, th), threshold)


def test_spec_errors():
    with pytest.raises(ValueError, match="must divide"):
        TiledDenseSpec(10, 3, 4, "binary", False, 4)
    with pytest.raises(ValueError, match="row-aligned"):
        tiled_expand_kernel(TiledDenseSpec(100, 10, 4, "binary", False, 4))
    with pytest.raises(ValueError, match="threshold"):
        TiledDenseSpec(16, 8, 4, "float", True, 4)


# conv: c, o, hw, p, stride, act, threshold, per-channel scales. 64 input channels with binary
# activations take the register-blocked byte-lane conv for the R filters; 20 take the generic one
CONV = [
    (64, 32, 8, 4, 1, "binary", False, False),
    (64, 32, 8, 8, 2, "binary", True, False),
    (20, 12, 7, 3, 1, "binary", False, True),
    (16, 16, 6, 4, 1, "int8", False, False),
    (16, 16, 6, 4, 2, "int8", True, False),
    (8, 12, 5, 2, 1, "float", False, True),
]


@pytest.mark.parametrize("c, o, hw, p, s, act, threshold, per_channel", CONV)
def test_row_aligned_tiled_conv_matches_reference(c, o, hw, p, s, act, threshold, per_channel):
    g = torch.Generator().manual_seed(c + o + p)
    r = o // p
    filters = torch.randint(0, 2, (r, c, 3, 3), generator=g) * 2 - 1
    planes = nu.conv_codes_to_planes(filters, 1, "pm1")
    scale = torch.rand(o if per_channel else p, generator=g) + 0.5
    bias = torch.rand(o, generator=g) - 0.5
    ts = torch.randint(-1, 2, (o,), generator=g).to(torch.int32)
    th = torch.randint(-9 * c, 9 * c + 1, (o,), generator=g).to(torch.int32)
    rows = ConvSpec(c, r, hw, hw, (3, 3), (s, s), (1, 1), (1, 1), 1, 1, "pm1", act, False, False)
    spec = TiledConvSpec(o, rows.out_h, rows.out_w, p, act, threshold, scale.numel())
    stage1, stage2 = build(conv2d_kernel(rows)), build(tiled_conv_expand_kernel(spec))
    conv = {"stride": (s, s), "padding": (1, 1)}
    for m in (1, 2):
        x = torch.randn(m, c, hw, hw, generator=g)
        x[0, :, 0, 0] = 0.0
        xin = act_inputs(x, act, 1 if act == "binary" else None)
        first = xin if act != "int8" else [xin[0], torch.ones(m)]
        unit = [torch.ones(r), torch.zeros(r), torch.zeros(r)]
        (a,) = stage1([*first, planes, *unit], [((m, r, rows.out_h, rows.out_w), "float32")])
        # stage 1 is the exact integer accumulator of each distinct filter, computed once
        xi, _ = nu.quantize_act(x, act)
        exact = torch.nn.functional.conv2d(xi, filters.double(), **conv).float().numpy()
        if act == "float":
            assert_close(a, torch.from_numpy(exact))
        else:
            assert np.array_equal(a, exact)
        xs = [xin[1]] if act == "int8" and not threshold else []
        (y,) = stage2(
            [a, *xs, *([ts, th] if threshold else [scale, bias])],
            [((m, o, rows.out_h, rows.out_w), "float32")],
        )
        thr = (ts, th) if threshold else (None, None)
        ref = nu.tiled_conv2d(x, planes, c, o, p, act, scale, bias, (s, s), (1, 1), (1, 1), *thr)
        _check(y, ref, threshold)


def test_tiled_conv_reference_is_the_expanded_binary_conv():
    g = torch.Generator().manual_seed(0)
    filters = torch.randint(0, 2, (3, 8, 3, 3), generator=g) * 2 - 1
    x, scale, bias = torch.randn(2, 8, 5, 5, generator=g), torch.rand(4) + 0.5, torch.randn(12, generator=g)
    got = nu.tiled_conv2d(
        x, nu.conv_codes_to_planes(filters, 1, "pm1"), 8, 12, 4, "binary", scale, bias, padding=(1, 1)
    )
    full = nu.expand_tile(filters.reshape(-1), (12, 8, 3, 3))
    want = nu.conv2d_codes(
        x, full, "binary", scale.repeat_interleave(3), torch.zeros(12), bias, padding=(1, 1)
    )
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match="divide"):
        nu.tiled_conv2d(x, nu.conv_codes_to_planes(filters, 1, "pm1"), 8, 10, 4, "binary", scale, bias)
