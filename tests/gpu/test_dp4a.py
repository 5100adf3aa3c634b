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
    w4 = dp4a.dp4a_codes(planes.numpy(), k, code)
    assert w4.shape == (n, k // 4) and w4.dtype == np.int32
    assert np.array_equal(w4.view(np.int8).reshape(n, k), planes_to_code(planes, k, code).numpy())


def test_conv_codes_are_the_planes_codes_as_signed_bytes() -> None:
    torch.manual_seed(3)
    q = torch.randint(0, 4, (6, 3, 3, 8))  # (O, KH, KW, C): 2-bit codes
    planes = code_to_planes(q, 2, "uint")
    w4 = dp4a.dp4a_codes(planes.numpy(), 8, "uint")
    assert w4.shape == (6, 3, 3, 2)
    assert np.array_equal(w4.view(np.int8).reshape(6, 3, 3, 8), q.numpy())


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
    for inp in (x, torch.randn_like(x) * 3, torch.randn(3, 42), torch.randn(70, 42)):  # tiles padded
        got, ref = cm(inp), cm.reference(inp)
        assert torch.equal(got, ref), (got - ref).abs().max()


class Convs(nn.Module):
    """A 3-channel stem (plane-reading kernel), then 16 -> 32 (stride 2, padding) and 32 -> 32
    (dilation 2) convs on dp4a, BatchNorm between them, and a depthwise conv (groups: planes)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.c2, self.b2 = nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32)
        self.c3 = nn.Conv2d(32, 32, 3, padding=2, dilation=2)
        self.c4 = nn.Conv2d(32, 32, 3, padding=1, groups=32)

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        x = torch.relu(self.b2(self.c2(x)))
        return self.c4(torch.relu(self.c3(x)))


@needs_opencl
@pytest.mark.parametrize("scheme", ["uniform:bits=2,act=8", "binary:act=8", "uniform:bits=7,act=8"])
def test_opencl_dp4a_conv_bit_exact(scheme: str) -> None:
    from tests.conftest import randomize_bn

    torch.manual_seed(12)
    model, x = randomize_bn(Convs(), seed=4), torch.randn(2, 3, 9, 9)
    cm = _compile(model, x, "opencl", f"{scheme},first_last=quantize")
    kernels = [launch["kernel"] for launch in cm._runner.plan["launches"]]
    dp4a_convs = [k for k in kernels if k.startswith("bitc_conv2d") and "_dp4a" in k]
    assert len(dp4a_convs) == 2, kernels  # 16 -> 32 and 32 -> 32; not the stem, not the depthwise
    for inp in (x, torch.randn_like(x) * 2, torch.randn(5, 3, 9, 9)):
        got, ref = cm(inp), cm.reference(inp)
        assert torch.equal(got, ref), (got - ref).abs().max()


@needs_nvcc
@pytest.mark.parametrize("net", ["mlp", "convs"])
def test_cuda_dp4a_source_and_ptx(net: str) -> None:
    model, x = _mlp() if net == "mlp" else (Convs().eval(), torch.randn(2, 3, 9, 9))
    cm = _compile(model, x, "cuda", "uniform:bits=2,act=8,first_last=quantize")
    runner = cm._runner
    assert "__dp4a(" in runner.source
    names = [k["kernel"] for k in runner.plan["launches"] if k["kernel"].endswith("_dp4a_kernel")]
    assert names
    for arch, ptx in runner.ptx.items():
        for name in names:
            body = ptx[ptx.index(f".entry {name}(") :]
            assert "dp4a.s32.s32" in body[: body.index("\n}\n")], (arch, name)
