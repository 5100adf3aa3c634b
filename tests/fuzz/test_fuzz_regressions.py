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
