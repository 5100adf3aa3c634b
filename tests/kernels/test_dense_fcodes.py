"""Float activations times 5- to 8-bit centered codes stored as bytes (``binary``'s first and
last layers): the same numbers as the reference, and the kernel a compiled model picks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bitcompiler as bc
from bitcompiler.backends.exact_float import fence_products
from bitcompiler.kernels import DenseSpec, relaid_dense_kernel
from bitcompiler.kernels.dense_avx2 import avx2_target
from bitcompiler.kernels.dense_fcodes import fits
from bitcompiler.quant import numerics as nu
from tests.kernels._util import build, host_target

needs_avx2 = pytest.mark.skipif(
    not avx2_target(host_target()), reason="the byte-code kernel is for AVX2 hosts"
)


def test_fits_only_centered_float_codes():
    assert fits(DenseSpec(64, 8, 8, "uint", "float", True, False))
    assert fits(DenseSpec(64, 8, 5, "uint", "float", True, False))
    assert not fits(DenseSpec(64, 8, 8, "uint", "int8", True, False))  # integer sums: other kernels
    assert not fits(DenseSpec(64, 8, 4, "uint", "float", True, False))  # not centered
    assert not fits(DenseSpec(64, 8, 1, "pm1", "float", False, False))


@needs_avx2
@pytest.mark.parametrize(
    ("k", "n", "bits", "m"), [(1280, 1000, 8, 1), (1032, 16, 8, 3), (37, 6, 6, 2), (15, 3, 8, 1)]
)
def test_matches_the_reference(k, n, bits, m):
    g = torch.Generator().manual_seed(k + n)
    spec = DenseSpec(k, n, bits, "uint", "float", True, False)
    planes = nu.code_to_planes(torch.randint(0, 2**bits, (n, k), generator=g), bits, "uint")
    scale = 0.01 * (torch.rand(n, generator=g) + 0.5)
    epi = {"scale": scale, "offset": -(2**bits - 1) / 2 * scale, "bias": torch.randn(n, generator=g)}
    x = torch.relu(torch.randn(m, k, generator=g)) + 1.0  # non-negative: the offset term would cancel
    ref = nu.bit_linear(x, planes, k, "uint", "float", **epi)
    relaid = relaid_dense_kernel(spec, planes.numpy(), host_target())
    assert relaid is not None and relaid.suffix == "fcodes" and relaid.float_input
    args = [x, torch.from_numpy(relaid.weights), epi["scale"], epi["offset"], epi["bias"]]
    (y,) = build(fence_products(relaid.func))(args, [((m, n), "float32")])
    err = float((torch.as_tensor(y) - ref).abs().max() / ref.abs().max())
    assert err <= 1e-6, err


@needs_avx2
def test_a_classifier_under_binary_uses_it():
    """``binary`` keeps the first and last layers 8-bit with float activations: a pointwise head on
    a 1x1 map (mobilenet's classifier) and a Linear both run the byte-code kernel and match the
    reference."""
    from tests.backends.test_lower import kernels_called

    torch.manual_seed(0)
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(48, 40, 1), nn.Flatten()).eval()
    dense = nn.Sequential(nn.Linear(96, 64), nn.ReLU(), nn.Linear(64, 10)).eval()
    for model, shape in ((head, (48, 4, 4)), (dense, (96,))):
        x = torch.randn(2, *shape)
        cm = bc.compile(model, (x[:1],), scheme="binary")
        names = kernels_called(cm)
        assert any(n.endswith("_fcodes") for n in names), names
        ref = cm.reference(x)
        assert float((cm(x) - ref).abs().max() / ref.abs().max()) <= 1e-5
