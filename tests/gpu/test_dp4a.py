"""k-bit weights x int8 activations on ``__dp4a``: the codes' byte layout against the numerics, the
kernel on pocl (OpenCL's helper of the same name) bit-exact against the reference, and the CUDA
source and PTX using the instruction."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from bitcompiler.kernels.gpu import dp4a
from bitcompiler.kernels.spec import DenseSpec
from bitcompiler.quant.numerics import code_to_planes, planes_to_code
from tests.gpu.test_gpu import _compile, needs_nvcc, needs_opencl


@pytest.mark.parametrize(("bits", "code"), [(1, "pm1"), (2, "uint"), (7, "uint")])
def test_codes_are_the_planes_codes_as_signed_bytes(bits: int, code: str) -> None:
    torch.manual_seed(bits)
    n, k = 5, 72
    q = torch.randint(0, 2, (n, k)) * 2 - 1 if code == "pm1" else torch.randint(0, 2**bits, (n, k))
    planes = code_to_planes(q, bits, code)
    spec = DenseSpec(k, n, bits, code, "int8", code == "uint", False)
    w4 = dp4a.dp4a_codes(planes.numpy(), spec)
    assert w4.shape == (n, k // 4) and w4.dtype == np.int32
    assert np.array_equal(w4.view(np.int8).reshape(n, k), planes_to_code(planes, k, code).numpy())


def test_dp4a_takes_what_fits_a_signed_byte() -> None:
    assert dp4a.dp4a_fits(DenseSpec(64, 8, 7, "uint", "int8", True, False))
    assert not dp4a.dp4a_fits(DenseSpec(64, 8, 8, "uint", "int8", True, False))  # codes up to 255
    assert not dp4a.dp4a_fits(DenseSpec(66, 8, 2, "uint", "int8", True, False))  # K % 4
    assert not dp4a.dp4a_fits(DenseSpec(64, 8, 1, "pm1", "binary", False, False))


class MLP(nn.Module):
    """K = 42 (not a multiple of 4: the plane-reading kernel), then K = 64 and 96 (dp4a)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.bn = nn.Linear(42, 64), nn.BatchNorm1d(64)
        self.b, self.c = nn.Linear(64, 96), nn.Linear(96, 8)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.bn(self.a(x))))))


def _mlp() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(11)
    model = MLP().eval()
    model.bn.running_mean.uniform_(-0.5, 0.5)
    model.bn.running_var.uniform_(0.5, 1.5)
    return model, torch.randn(64, 42)


SCHEMES = [
    "uniform:bits=2,act=8",
    "uniform:bits=4,act=8",
    "binary:act=8",
    "uniform:bits=2,act=8,first_last=quantize",
]


@needs_opencl
@pytest.mark.parametrize("scheme", SCHEMES)
def test_opencl_dp4a_dense_bit_exact(scheme: str) -> None:
    model, x = _mlp()
    cm = _compile(model, x, "opencl", scheme)
    kernels = [launch["kernel"] for launch in cm._runner.plan["launches"]]
    assert any(k.endswith("64x96_dp4a_kernel") for k in kernels), kernels
    assert not any("42x64_dp4a" in k for k in kernels), kernels
    assert "__dp4a" in cm._runner.source
    for inp in (x, torch.randn_like(x) * 3):
        got, ref = cm(inp), cm.reference(inp)
        assert torch.equal(got, ref), (got - ref).abs().max()


@needs_nvcc
def test_cuda_dp4a_source_and_ptx() -> None:
    model, x = _mlp()
    cm = _compile(model, x, "cuda", "uniform:bits=2,act=8")
    runner = cm._runner
    assert "__dp4a(" in runner.source
    names = [k["kernel"] for k in runner.plan["launches"] if k["kernel"].endswith("_dp4a_kernel")]
    assert names
    for arch, ptx in runner.ptx.items():
        for name in names:
            body = ptx[ptx.index(f".entry {name}(") :]
            assert "dp4a.s32.s32" in body[: body.index("\n}\n")], (arch, name)
