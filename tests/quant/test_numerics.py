import pytest
import torch

from bitcompiler.quant import numerics as nm


def test_pack_bits_layout_is_lsb_first_and_round_trips():
    bits = torch.zeros(40, dtype=torch.int64)
    bits[[0, 3, 31, 32, 39]] = 1
    words = nm.pack_bits(bits)
    assert words.dtype == torch.int32 and words.shape == (2,)
    assert words[0].item() == (1 | 8 | -(2**31))  # bit 31 set -> negative int32
    assert words[1].item() == (1 | (1 << 7))
    assert torch.equal(nm.unpack_bits(words, 40), bits)


def test_popcount_counts_set_bits():
    words = torch.tensor([0, 1, -1, 0x0F0F], dtype=torch.int32)
    assert nm.popcount(words).tolist() == [0, 1, 32, 8]


@pytest.mark.parametrize("bits", [1, 2, 5, 8])
def test_uint_planes_round_trip(bits):
    q = torch.randint(0, 2**bits, (7, 45))
    planes = nm.code_to_planes(q, bits, "uint")
    assert planes.shape == (bits, 7, 2)
    assert torch.equal(nm.planes_to_code(planes, 45, "uint"), q)


def test_pm1_planes_round_trip_and_validation():
    q = torch.randint(0, 2, (3, 33)) * 2 - 1
    assert torch.equal(nm.planes_to_code(nm.code_to_planes(q, 1, "pm1"), 33, "pm1"), q)
    with pytest.raises(ValueError, match="pm1"):
        nm.code_to_planes(torch.zeros(2, 3, dtype=torch.int64), 1, "pm1")
    with pytest.raises(ValueError, match="0..3"):
        nm.code_to_planes(torch.full((2, 2), 4), 2, "uint")


def test_affine_weight_matches_hand_computed_case():
    w = torch.tensor([[-1.0, 0.0], [0.5, 2.0]])
    q, alpha, delta = nm.affine_weight(w, 2)  # α = -1, δ = 3/3 = 1
    assert alpha.item() == -1.0 and delta.item() == pytest.approx(1.0)
    assert q.tolist() == [[0, 1], [2, 3]]  # (0.5+1)/1 = 1.5 rounds to 2 (half to even)
    assert nm.dequantize(q, delta.expand(2), alpha.expand(2)).tolist() == [[-1.0, 0.0], [1.0, 2.0]]


def test_binary_weight_is_sign_times_mean_abs_per_channel():
    w = torch.tensor([[1.0, -3.0], [0.0, -2.0]])
    q, alpha = nm.binary_weight(w)
    assert q.tolist() == [[1, -1], [1, -1]]  # sign(0) = +1
    assert alpha.tolist() == [2.0, 1.0]


def test_int8_activation_is_per_sample_symmetric():
    x = torch.tensor([[1.0, -0.5, 0.25], [10.0, 5.0, 0.0]])
    q, s = nm.quantize_act_int8(x)
    assert s.tolist() == pytest.approx([1 / 127, 10 / 127])
    assert q.tolist() == [[127, -64, 32], [127, 64, 0]]  # -63.5 -> -64, 31.75 -> 32


def test_bit_linear_binary_act_equals_xnor_popcount_formula():
    torch.manual_seed(0)
    k = 70
    x = torch.randn(3, k)
    q = torch.randint(0, 2, (5, k)) * 2 - 1
    planes = nm.code_to_planes(q, 1, "pm1")
    ones = torch.ones(5)
    y = nm.bit_linear(x, planes, k, "pm1", "binary", ones, torch.zeros(5), torch.zeros(5))
    a = nm.pack_bits((x >= 0).long())
    xnor = k - 2 * nm.popcount(a[:, None, :] ^ planes[0][None]).sum(-1)
    assert torch.equal(y, xnor.float())


def test_fold_identity_y_equals_delta_qx_plus_alpha_sumx():
    torch.manual_seed(1)
    w, x = torch.randn(6, 20), torch.randn(4, 20)
    q, alpha, delta = nm.affine_weight(w, 3)
    planes = nm.code_to_planes(q, 3, "uint")
    y = nm.bit_linear(x, planes, 20, "uint", "float", delta.expand(6), alpha.expand(6), torch.zeros(6))
    direct = x @ nm.dequantize(q, delta.expand(6), alpha.expand(6)).t()
    torch.testing.assert_close(y, direct, rtol=1e-5, atol=1e-5)


def test_integer_thresholds_reproduce_sign_of_epilogue():
    torch.manual_seed(2)
    scale = torch.tensor([0.5, -0.25, 0.0, 0.0, 2.0])
    bias = torch.tensor([1.3, 0.6, 0.1, -0.1, -4.0])
    acc = torch.arange(-20, 21, dtype=torch.float64)[:, None].expand(-1, 5)
    thr_sign, thr = nm.integer_thresholds(scale, bias)
    got = nm.threshold(acc, thr_sign, thr, channel_dim=1)
    want = nm.sign(scale.double() * acc + bias.double()).float()
    assert torch.equal(got, want)


def test_conv_reference_zero_pads_quantized_activations():
    torch.manual_seed(3)
    x = torch.randn(1, 3, 5, 5)
    q = torch.randint(0, 2, (4, 3, 3, 3)) * 2 - 1
    planes = nm.conv_codes_to_planes(q, 1, "pm1")
    assert planes.shape == (1, 4, 3, 3, 1)
    y = nm.bit_conv2d(
        x, planes, 3, (3, 3), "pm1", "binary", torch.ones(4), torch.zeros(4), torch.zeros(4), padding=(1, 1)
    )
    want = torch.nn.functional.conv2d(nm.sign(x), q.float(), padding=1)
    assert torch.equal(y, want)
    # a corner sees 4 of 9 taps: |acc| <= 4*3
    assert y[0, :, 0, 0].abs().max() <= 12


def test_code_center_selects_float_activations_times_offset_codes():
    assert nm.code_center(8, "uint", "float", True) == 128
    assert nm.code_center(5, "uint", "float", True) == 16
    assert nm.code_center(4, "uint", "float", True) == 0  # at most 8-fold cancellation
    assert nm.code_center(8, "uint", "int8", True) == 0  # integer sums: exact anyway
    assert nm.code_center(8, "uint", "float", False) == 0
    assert nm.code_center(1, "pm1", "float", False) == 0


def test_centered_reference_is_the_same_layer():
    """Centered codes with ``offset + 128·scale`` compute ``x @ (scale·Q + offset)ᵀ``: against that
    product in float64 the centered reference is within 1e-6 relative on inputs that cancel."""
    g = torch.Generator().manual_seed(0)
    n, k = 16, 1024
    q = torch.randint(0, 256, (n, k), generator=g)
    scale = 0.01 * (torch.rand(n, generator=g) + 0.5)
    offset, bias = -127.5 * scale, torch.zeros(n)
    x = torch.rand(4, k, generator=g)
    planes = nm.code_to_planes(q, 8, "uint")
    y = nm.bit_linear(x, planes, k, "uint", "float", scale, offset, bias)
    w = scale.double()[:, None] * q.double() + offset.double()[:, None]
    exact = x.double() @ w.t()
    assert float((y.double() - exact).abs().max() / exact.abs().max()) <= 1e-6
    shifted = nm.linear_codes(x, q, "float", scale, offset, bias, center=128)
    assert torch.equal(y, shifted)  # bit_linear reads the center from the planes
    assert torch.equal(nm.centered_offset(scale, offset, 128), offset + scale * 128.0)
