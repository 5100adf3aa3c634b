"""Failures the graph fuzzer found, each as the minimal model that showed it (now fixed)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import bitcompiler as bc
from bitcompiler.backends.cortex_m.qemu import INSTALL, missing_tools
from bitcompiler.cache import tensor_bytes
from tests.conftest import assert_close
from tests.fuzz.strategies import Spec, build
from tests.fuzz.test_fuzz_cpu import check_cpu


def test_linear_with_one_input_feature_adds_its_bias_once():
    """K=1: the matmul's unit reduction loop looked element-wise to the CPU's injective schedule
    rule, which then added the bias twice (``cm(0) == 2 * bias``)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(1, 3), nn.ReLU(), nn.Linear(3, 2)).eval()
    cm = bc.compile(net, (torch.randn(1, 1),), target="cpu", scheme="none")
    for x in (torch.zeros(1, 1), torch.randn(3, 1)):
        assert_close(cm(x), cm.reference(x))


def test_cache_hashes_an_expanded_size_one_constant():
    """A (1, 1) constant with stride 0 (expanded) kept its stride through ``contiguous()`` and
    ``view(torch.uint8)`` refused it: the compile cache was skipped with a warning."""
    t = torch.tensor(2.0).expand(1, 1)
    assert tensor_bytes(t) == tensor_bytes(torch.tensor([[2.0]]))
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="compile cache skipped")
        cm = bc.compile(nn.Linear(1, 1).eval(), (torch.randn(1, 1),), target="cpu", scheme="none")
    x = torch.randn(3, 1)
    assert_close(cm(x), cm.reference(x))


@pytest.mark.skipif(bool(missing_tools()), reason=f"{', '.join(missing_tools())} missing; {INSTALL}")
def test_cortex_m_int8_quantizer_of_one_feature_uses_the_updated_amax():
    """K=1 with int8 activations on Cortex-M: TVM's C codegen reused the load of ``amax`` from
    before ``amax = max(amax, |x|)`` (-FLT_MAX), so the scale was 1e-8 / 127 and every output
    ~-7e-11. Max/min over loads are now printed as selects."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(1, 1, bias=False)).eval()
    target = bc.Target("cortex-m4", count_instructions=False)
    cm = bc.compile(net, (torch.randn(1, 1),), target=target, scheme="binary:act=8")
    x = torch.randn(3, 1)
    assert_close(cm(x), cm.reference(x))


def test_binary_epilogue_is_bit_exact_at_batch_3():
    """Binary activations: integer popcount sums, so the output should equal the reference bit
    for bit; at batch 3 one element differed in the last bit (0.36432904 vs 0.36432907)."""
    torch.manual_seed(0)
    net = build(Spec(input=(1, 3), layers=(("linear", 3, 1, True),)))
    cm = bc.compile(net, (torch.randn(1, 3),), target="cpu", scheme="binary:act=binary,first_last=quantize")
    g = torch.Generator().manual_seed(1)
    torch.randn(1, 3, generator=g)  # the fuzz check's batch-1 draw comes first
    x = torch.randn(3, 3, generator=g)
    assert torch.equal(cm(x), cm.reference(x))


def test_cache_keys_the_input_shape():
    """The same model (same code, same weights) compiled at 4x4 then 3x3 loaded the 4x4 library
    from the compile cache: the key hashed no input shape, and the VM rejected the 3x3 input."""
    spec = Spec(input=(1, 1, 4, 4), layers=(("conv", 1, 1, 2, 1, 0, 1, False), ("gap",), ("flatten",)))
    for hw in (4, 3):
        cm = bc.compile(build(spec), (torch.randn(1, 1, hw, hw),), target="cpu", scheme="binary")
        x = torch.randn(2, 1, hw, hw)
        assert_close(cm(x), cm.reference(x))


# Three examples of make fuzz's 500 that exposed the comparison rule, not the compiler: they pin
# SCALE_FLOOR and QUANTIZER_STEP in test_fuzz_cpu (see there).
def test_output_that_cancels_to_near_zero_is_compared_against_the_floor():
    check_cpu(Spec(input=(1, 8), layers=(("linear", 8, 1, True),)), "bitnet:init_bits=2")
    check_cpu(
        Spec(
            input=(1, 1, 6, 6),
            layers=(
                ("maxpool", 2, 1),
                ("conv", 1, 1, 1, 1, 0, 1, False),
                ("conv", 1, 1, 1, 1, 0, 1, False),
                ("flatten",),
                ("linear", 25, 1, False),
            ),
        ),
        "bitwise:bits=1,act=8",
    )


def test_gelu_branch_before_an_int8_layer_may_move_one_quantizer_step():
    gelu = (("conv", 3, 3, 3, 1, 1, 3, True), ("bn", 3), ("act", "gelu"))
    relu = (("conv", 3, 3, 3, 1, 1, 1, False), ("act", "relu"))
    spec = Spec(input=(1, 3, 6, 6), layers=(("cat", gelu, relu), ("flatten",), ("linear", 216, 1, False)))
    check_cpu(spec, "uniform:bits=1,act=8")
