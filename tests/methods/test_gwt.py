"""gwt scheme: exact gradients of the group transform, exact binary inference, τ annealing, the gap."""

import pytest
import torch
from torch import nn

import bitcompiler as bc
from bitcompiler.methods import gwt
from bitcompiler.quant import numerics as nu
from bitcompiler.quant.schemes import Scheme
from tests.conftest import assert_close


@pytest.mark.parametrize("group", [None, 12])
def test_transform_gradient_matches_finite_differences(group):
    theta = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    # exact backprop (no straight-through): autograd's gradient equals central differences tightly
    assert torch.autograd.gradcheck(lambda t: nu.gwt_weight(t, 3.0, group), (theta,), eps=1e-6, atol=1e-8)


def test_layer_gradient_is_exact_through_the_quantizer():
    torch.manual_seed(0)
    net = bc.prepare(nn.Sequential(nn.Linear(5, 3)), "gwt:first_last=quantize,tau_start=2").double()
    x = torch.randn(7, 5, dtype=torch.float64)
    w = net[0].weight
    loss = lambda: (net(x) ** 2).sum()
    loss().backward()
    fd = torch.zeros_like(w)
    with torch.no_grad():
        for i in range(w.numel()):
            old = w.view(-1)[i].item()
            w.view(-1)[i] = old + 1e-6
            up = loss().item()
            w.view(-1)[i] = old - 1e-6
            down = loss().item()
            w.view(-1)[i] = old
            fd.view(-1)[i] = (up - down) / 2e-6
    assert torch.allclose(w.grad, fd, rtol=1e-6, atol=1e-7)


def test_codes_are_exactly_binary_with_per_channel_scale():
    torch.manual_seed(1)
    layer = bc.prepare(nn.Sequential(nn.Linear(6, 4)), "gwt:first_last=quantize")[0]
    c = layer.codes()
    theta = layer.weight.detach()
    z = theta - theta.mean(1, keepdim=True)
    assert c.code == "pm1" and c.bits == 1 and c.n_floats == 4 and c.tiles == 1
    assert torch.equal(c.q, torch.where(z >= 0, 1, -1))
    assert torch.allclose(c.scale, theta.abs().mean(1)) and not c.offset.any()
    with gwt.binarized(layer):
        assert torch.equal(layer.wq(layer.weight), nu.dequantize(c.q, c.scale, c.offset))


def test_group_of_two_channels_shares_a_scale_and_misaligned_group_is_an_error():
    torch.manual_seed(2)
    theta = torch.randn(4, 3)
    _q, scale, groups = nu.gwt_binary(theta, 6)
    assert groups == 2 and scale[0] == scale[1] == theta[:2].abs().mean()
    with pytest.raises(ValueError, match="multiple of the 3 weights per output channel"):
        nu.gwt_weight(theta, 1.0, 4)
    with pytest.raises(ValueError, match="group="):
        Scheme.parse("gwt:group=abc")


def test_tau_anneals_and_the_gap_vanishes():
    torch.manual_seed(3)
    net = bc.prepare(
        nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)), "gwt:first_last=quantize,tau_end=1000"
    )
    gwt.set_tau_schedule(net, 10)
    data = torch.utils.data.TensorDataset(torch.randn(64, 8), torch.randint(0, 3, (64,)))
    start = gwt.binarization_gap(net, data)
    assert start["tau"] == 1.0 and set(start) >= {"gap", "train_mode_accuracy", "binarized_accuracy"}
    for _ in range(10):
        gwt.step(net)
    end = gwt.binarization_gap(net, data)
    assert end["tau"] == pytest.approx(1000.0)
    assert end["weight_distance"] < 0.05 < start["weight_distance"]
    assert abs(end["gap"]) <= 2 / 64


def test_compiled_gwt_model_is_the_binarized_network():
    torch.manual_seed(4)
    net = bc.prepare(nn.Sequential(nn.Linear(20, 12), nn.ReLU(), nn.Linear(12, 4)), "gwt:first_last=quantize")
    x = torch.randn(5, 20)
    cm = bc.compile(net, (x,))
    with gwt.binarized(net):
        want = net(x)
    assert_close(cm(x), cm.reference(x))
    assert_close(cm.reference(x), want)
    assert cm.report().layers[0].scheme.startswith("gwt")


def test_tau_is_held_then_grows_geometrically():
    q = gwt.from_scheme(Scheme.parse("gwt:tau_start=1,tau_end=100,tau_steps=10,tau_hold=0.6"))
    seen = []
    for _ in range(12):
        q.step()
        seen.append(float(q.tau))
    # held at τ0 through step 6 of 10, then τ0·(τ1/τ0)^((t/T − 0.6)/0.4): 10^0.5, 10, 10^1.5, 100, then stays
    assert seen[:6] == [1.0] * 6
    assert seen[6:] == pytest.approx([10**0.5, 10.0, 10**1.5, 100.0, 100.0, 100.0])
    with pytest.raises(ValueError, match="tau_hold"):
        Scheme.parse("gwt:tau_hold=1")
