"""Float activations (docs/guide.md, "Exactness"): a layer with float activations sums in float32
in its target's order and the reference in float64, so the contract is a maximum relative error of
1e-5 on every target. Most at risk are 5- to 8-bit codes with an offset (``binary``'s first and last
layers): uncentered, ``scale·acc + offset·sumx`` cancelled about 128-fold and missed the reference
by 1.2e-5 to 2e-5 on Cortex-M and OpenCL; centered codes (``numerics.code_center``) keep them near
1e-6. The inputs are non-negative (as after a ReLU or a max-pooled hardtanh): they cancel most."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import bitcompiler as bc
from bitcompiler.backends.cortex_m.qemu import missing_tools
from examples.bench_models import small_cnn
from tests.conftest import randomize_bn
from tests.gpu.test_gpu import needs_opencl

needs_qemu = pytest.mark.skipif(bool(missing_tools()), reason="arm-none-eabi-gcc / qemu-system-arm missing")
TARGETS = [
    pytest.param("cpu"),
    pytest.param("opencl", marks=needs_opencl),
    pytest.param("cortex-m4", marks=needs_qemu),
]
SLOW_M4 = [*TARGETS[:2], pytest.param("cortex-m4", marks=[needs_qemu, pytest.mark.slow])]  # 25-55 s


def _dense() -> nn.Module:
    """One layer: under ``binary`` it is first and last, so 8-bit codes with an offset."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(1024, 32)).eval()


def _cnn() -> nn.Module:
    torch.manual_seed(1)
    return randomize_bn(small_cnn()).eval()


def _max_rel_error(cm: bc.CompiledModel, xs: list[torch.Tensor]) -> float:
    errs = []
    for x in xs:
        got, ref = cm(x), cm.reference(x)
        errs.append(float((got - ref).abs().max() / ref.abs().max()))
    return max(errs)


def _compile(model: nn.Module, x: torch.Tensor, target: str, scheme: str) -> bc.CompiledModel:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return bc.compile(model, (x,), target=target, scheme=scheme)


@pytest.mark.parametrize("target", TARGETS)
def test_offset_codes_with_float_activations_within_1e5(target: str) -> None:
    torch.manual_seed(2)
    xs = [torch.rand(1, 1024) for _ in range(3)]
    cm = _compile(_dense(), xs[0], target, "binary")
    assert _max_rel_error(cm, xs) <= 1e-5


@pytest.mark.parametrize("target", SLOW_M4)
@pytest.mark.parametrize("scheme", ["binary", "binary:first_last=quantize", "uniform:bits=6,act=float"])
def test_float_activation_cnn_within_1e5(target: str, scheme: str) -> None:
    """8-bit (offset), 6-bit (offset) and +-1 layers with float activations, end to end."""
    torch.manual_seed(3)
    xs = [torch.rand(1, 1, 28, 28) for _ in range(2)]
    cm = _compile(_cnn(), xs[0], target, scheme)
    assert _max_rel_error(cm, xs) <= 1e-5
