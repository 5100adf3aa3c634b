"""cm.profile(x) on the CPU: each kernel of the compiled module timed, and the call as a whole."""

import pytest
import torch
from torch import nn

import bitcompiler as bc
from bitcompiler.errors import InputError


def compiled():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.MaxPool2d(2), nn.Hardtanh(), nn.Flatten(), nn.Linear(32 * 16, 4)
    )
    return bc.compile(model.eval(), (torch.randn(1, 1, 8, 8),), scheme="binary:act=binary")


def test_profile_names_the_kernels_the_call_runs_and_times_the_call():
    cm = compiled()
    prof = cm.profile(torch.randn(2, 1, 8, 8), repeat=5)
    assert prof.batch == 2 and prof.call_us > 0
    assert any(name.startswith("bitc_conv2d") for name in prof.kernels), prof.kernels
    assert all(us >= 0 for us in prof.kernels.values())
    assert not any(name.startswith("vm.builtin") for name in prof.kernels)
    assert "(outside kernels)" in str(prof) and "bitc_conv2d" in str(prof)


def test_profile_checks_its_inputs_like_a_call():
    cm = compiled()
    with pytest.raises(InputError, match="input 0"):
        cm.profile(torch.randn(2, 3, 8, 8))
