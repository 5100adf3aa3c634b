"""Passes keep the facts they ensure: under BITC_DEBUG each ensured fact is checked on the graph."""

import pytest
import torch
from torch import nn

import bitcompiler as bc
from bitcompiler.capture import symbolic_trace
from bitcompiler.passes import DEFAULT_PASSES, PassContext, PassError, Pipeline, checked_facts, graph_pass
from bitcompiler.quant.schemes import Scheme


@pytest.fixture
def debug(monkeypatch):
    monkeypatch.setenv("BITC_DEBUG", "1")


def _conv_bn():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()).eval()


class PreActivation(nn.Module):
    """A BatchNorm after an add (pre-activation ResNets): no layer to fold it into."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        return self.conv(torch.relu(self.bn(x + 1.0)))


def test_every_built_in_fact_has_a_check():
    ensured = set().union(*(p.ensures for p in DEFAULT_PASSES))
    assert ensured <= checked_facts(), ensured - checked_facts()


def test_the_default_pipeline_keeps_its_facts(debug):
    x = torch.randn(2, 8, 6, 6)
    for scheme in ("binary", "uniform:bits=2,act=8", "tiled:p=4"):
        ctx = PassContext(scheme=Scheme.parse(scheme), example_inputs=(x,))
        Pipeline.default().run(symbolic_trace(PreActivation().eval()), ctx)


def test_a_pass_that_claims_a_fact_it_breaks_is_caught(debug):
    claims = graph_pass(name="claims_bn_folded", requires={"canonical"}, ensures={"bn_folded"})(lambda gm: gm)
    pipe = Pipeline([DEFAULT_PASSES[0], claims])
    with pytest.raises(PassError, match="claims_bn_folded.*ensures 'bn_folded', but BatchNorm"):
        pipe.run(symbolic_trace(_conv_bn()), PassContext(example_inputs=(torch.randn(1, 3, 4, 4),)))
    # without BITC_DEBUG facts are trusted, as the order check trusts them
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BITC_DEBUG", "0")
        pipe.run(symbolic_trace(_conv_bn()), PassContext())


def test_users_register_checks_for_their_own_facts(debug):
    @bc.fact_check("no_relu")
    def _no_relu(gm):
        mods = dict(gm.named_modules())
        left = [n.name for n in gm.graph.nodes if isinstance(mods.get(str(n.target)), nn.ReLU)]
        return f"relu left at {left}" if left else None

    keeps = graph_pass(name="says_no_relu", ensures={"no_relu"})(lambda gm: gm)
    with pytest.raises(PassError, match="says_no_relu.*ensures 'no_relu', but relu left"):
        Pipeline([keeps]).run(symbolic_trace(_conv_bn()), PassContext())
