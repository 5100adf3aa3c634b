"""Float activations times 8-bit codes with an offset (the first and last layers of ``binary``):
the epilogue ``scale·acc + offset·sumx`` cancels about 128-fold, so the reference and every kernel
multiply centered codes ``Q - 128`` and use the offset ``offset + 128·scale``
(``numerics.code_center``, ``kernels.spec.Coding.center``): nothing cancels, and float32 sums in
the kernel's order agree with the reference's float64 sums within 1e-6 on inputs that cancel
(non-negative activations, as after a ReLU; symmetric weights), where uncentered float32 sums
missed it by ~1e-4 relative (CondenseNet's classifier)."""

from __future__ import annotations

import torch

from bitcompiler.backends.exact_float import fence_products
from bitcompiler.kernels import ConvSpec, DenseSpec, conv2d_kernel, dense_kernel
from bitcompiler.kernels.dense_avx2 import avx2_target, float_dense_func
from bitcompiler.quant import numerics as nu
from tests.kernels._util import build, host_target


def _affine(n: int, g: torch.Generator) -> dict:
    """8-bit affine weights centred on zero: ``w = scale·q + offset``, ``offset ≈ -127.5·scale``."""
    scale = 0.01 * (torch.rand(n, generator=g) + 0.5)
    return {"scale": scale, "offset": -127.5 * scale, "bias": torch.zeros(n)}


def _build(func):
    """Built as the CPU pipeline builds it: the epilogue's products fenced (no FMA)."""
    return build(fence_products(func))


def _relative(got, ref: torch.Tensor) -> float:
    return float((torch.as_tensor(got) - ref).abs().max() / ref.abs().max())


def test_selection():
    assert DenseSpec(64, 8, 8, "uint", "float", True, False).center == 128
    assert DenseSpec(64, 8, 5, "uint", "float", True, False).center == 16
    assert DenseSpec(64, 8, 8, "uint", "int8", True, False).center == 0  # integer sums: exact
    assert DenseSpec(64, 8, 8, "uint", "float", False, False).center == 0  # no offset to cancel
    assert DenseSpec(64, 8, 1, "pm1", "float", False, False).center == 0  # signed codes already
    assert DenseSpec(64, 8, 2, "uint", "float", True, False).center == 0  # 2-bit: little to cancel


def test_dense_centered_sums_match_the_reference():
    k, n = 1032, 16
    g = torch.Generator().manual_seed(0)
    spec = DenseSpec(k, n, 8, "uint", "float", True, False)
    planes = nu.code_to_planes(torch.randint(0, 256, (n, k), generator=g), 8, "uint")
    epi = _affine(n, g)
    x = torch.relu(torch.randn(4, k, generator=g)) + 1.0
    ref = nu.bit_linear(x, planes, k, "uint", "float", **epi)
    args = [x, planes, epi["scale"], epi["offset"], epi["bias"]]
    (y,) = _build(dense_kernel(spec, host_target()))(args, [((4, n), "float32")])
    assert _relative(y, ref) <= 1e-6
    if avx2_target(host_target()):  # the uncentered float32 table kernel these layers used: the test can fail
        (y32,) = _build(float_dense_func(spec).with_attr("global_symbol", "main"))(
            args, [((4, n), "float32")]
        )
        assert _relative(y32, ref) > 1e-5


def test_conv_centered_sums_match_the_reference():
    c, o, hw = 64, 16, 8
    g = torch.Generator().manual_seed(1)
    spec = ConvSpec(c, o, hw, hw, (3, 3), (1, 1), (1, 1), (1, 1), 1, 8, "uint", "float", True, False)
    q = torch.randint(0, 256, (o, c, 3, 3), generator=g)
    planes = nu.conv_codes_to_planes(q, 8, "uint")
    epi = _affine(o, g)
    x = torch.relu(torch.randn(2, c, hw, hw, generator=g)) + 1.0
    ref = nu.bit_conv2d(x, planes, c, (3, 3), "uint", "float", padding=(1, 1), **epi)
    args = [x, planes, epi["scale"], epi["offset"], epi["bias"]]
    (y,) = _build(conv2d_kernel(spec, host_target()))(args, [(tuple(ref.shape), "float32")])
    assert _relative(y, ref) <= 1e-6
