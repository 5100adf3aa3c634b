"""The CPU backend compiles for the Target it is given, not for the host: kernels follow its ISA."""

import pytest
import torch
from torch import nn

import bitcompiler as bc
from bitcompiler.backends.lower import to_relax

# x86-64-v2: SSE4.2, no AVX; every x86 host can run code built for it
GENERIC = bc.Target("cpu", mcpu="nehalem")
# the suffixes of the kernels that read weights relaid for AVX2 (kernels.relaid_dense_kernel)
AVX2_SUFFIXES = ("_lanes", "_vpop", "_r8", "_il", "_codes")


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 8 * 8, 256),
        nn.ReLU(),
        nn.Linear(256, 10),
    ).eval()


def _kernels(cm: bc.CompiledModel, target: bc.Target) -> dict[str, str]:
    mod = to_relax(cm._exported, target)
    return {gv.name_hint: mod[gv].script() for gv in mod.functions if gv.name_hint.startswith("bitc_")}


def test_capabilities_come_from_the_target_not_the_host():
    assert not GENERIC.capabilities.has("avx2")
    assert GENERIC.capabilities.vector_bits == 128
    assert bc.Target("cortex-m4").capabilities.word_bits == 32


@pytest.mark.parametrize("scheme", ["binary:act=binary", "uniform:bits=2,act=8", "binary"])
def test_a_non_avx2_target_gets_the_generic_kernels(scheme):
    x = torch.randn(1, 3, 8, 8)
    cm = bc.compile(_model(), (x,), target=GENERIC, scheme=scheme)
    generic = _kernels(cm, GENERIC)
    assert generic and not any(n.endswith(AVX2_SUFFIXES) for n in generic), sorted(generic)
    assert not any("llvm.x86.avx2" in text for text in generic.values())
    if bc.Target("cpu").capabilities.has("avx2"):  # the same graph for this host picks AVX2 kernels
        host = _kernels(cm, bc.Target("cpu"))
        assert any(n.endswith(AVX2_SUFFIXES) or "llvm.x86.avx2" in t for n, t in host.items()), sorted(host)
    xb = torch.randn(4, 3, 8, 8)
    if "act=" in scheme:  # integer activations: bit-exact
        assert torch.equal(cm(xb), cm.reference(xb))
    else:  # float activations: float sums in another order, 1e-5 relative to the output's scale
        got, ref = cm(xb), cm.reference(xb)
        assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()
