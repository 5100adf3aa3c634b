"""Bit-wise training (docs/methods.md §2): formulas, per-bit STE, frozen bits, payload, compile."""

import math

import pytest
import torch
from torch import nn

import bitcompiler as bc
from bitcompiler import Scheme, payload
from bitcompiler.methods import bitwise
from bitcompiler.methods.bitwise import BitwiseWeight
from bitcompiler.quant import numerics
from bitcompiler.quant.schemes import bitwise_trained
from bitcompiler.train import fit
from tests.conftest import assert_close


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 8, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 8 * 8, 16),
        nn.ReLU(),
        nn.Linear(16, 4),
    )


def _bound(n: int, train: str, shape=(3, 4)) -> BitwiseWeight:
    q = BitwiseWeight(n, train)
    q.bind(nn.Parameter(torch.zeros(shape)))
    return q


def test_train_spec():
    assert bitwise_trained("all", 3) == (frozenset({0, 1, 2}), True)
    assert bitwise_trained("sign", 3) == (frozenset(), True)
    assert bitwise_trained("top2", 6) == (frozenset({4, 5}), True)
    assert bitwise_trained("5.4.sign", 6) == (frozenset({4, 5}), True)
    assert bitwise_trained("0", 6) == (frozenset({0}), False)
    for bad, needle in [
        ("bitwise:train=top7", "top1..top6"),
        ("bitwise:train=6.sign", "list like"),
        ("bitwise:bits=8", "1..7"),
        ("bitnet:mode=int", "mode=quantized"),
        ("bitnet:min_bits=5,init_bits=4", "min_bits <= init_bits"),
        ("bitnet:mu=-1", ">= 0"),
    ]:
        with pytest.raises(ValueError, match=needle.replace(".", r"\.")):
            Scheme.parse(bad)


def test_alpha_matches_he_std_and_hand_computed_weight():
    # n = 1: Q ∈ {0, 1}, E[Q²] = 1/2 -> α = sqrt(2/fan_in)·sqrt(2)
    assert numerics.bitwise_alpha(8, 1) == pytest.approx(math.sqrt(2 / 8) * math.sqrt(2))
    q = _bound(6, "all", (256, 400))
    assert float(q(torch.zeros(1)).detach().std()) == pytest.approx(math.sqrt(2 / 400), rel=0.02)
    bits = [torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0]), torch.tensor([0.0, 1.0])]
    w = numerics.bitwise_weight(bits, torch.tensor([0.0, 1.0]), 0.5)
    assert torch.equal(w, torch.tensor([0.5 * 3, -0.5 * 6]))


def test_per_bit_straight_through_gradients():
    q = _bound(3, "all", (2, 2))
    w = q(torch.zeros(1))
    g = torch.randn_like(w)
    (w * g).sum().backward()
    sgn = 1 - 2 * (q.sign.detach() > 0).float()
    for i in range(3):  # ∂w/∂m_i = α·sign·2^i
        assert torch.allclose(getattr(q, f"m{i}").grad, g * q.alpha * sgn * 2**i)
    mag = q.magnitude().float()
    assert torch.allclose(q.sign.grad, g * q.alpha * mag * -2)  # w = α(1 − 2s)·mag


def test_frozen_bits_are_buffers_and_adam_with_weight_decay_does_not_move_them():
    net = bc.prepare(_cnn(), "bitwise:bits=4,train=top1")
    q = bitwise.quantizers(net)[0]
    assert [n for n, _ in q.named_parameters()] == ["m3", "sign"]
    frozen = {n: getattr(q, n).clone() for n in q.frozen_names()}
    trained = q.m3.detach().clone()
    opt = torch.optim.AdamW(net.parameters(), lr=0.05, weight_decay=0.5)
    for _ in range(5):
        loss = net(torch.randn(4, 1, 8, 8)).pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(torch.equal(getattr(q, n), v) for n, v in frozen.items())
    assert not torch.equal(q.m3, trained)


def test_codes_are_exact_offset_binary():
    q = _bound(3, "all", (5, 7))
    w = q(torch.zeros(1)).detach()
    c = q.codes(torch.zeros(1))
    assert (c.code, c.bits) == ("uint", 4) and int(c.q.min()) >= 0 and int(c.q.max()) <= 14
    assert torch.allclose(numerics.dequantize(c.q, c.scale, c.offset), w, atol=1e-6)
    assert torch.equal(c.q - 7, torch.round(w / q.alpha).long())
    assert q.sparsity == pytest.approx(float((w == 0).float().mean()))


def test_payload_survives_training_and_capacity_error():
    net = bc.prepare(_cnn(), "bitwise:bits=6,train=top2")
    cap = payload.capacity(net)
    assert (
        cap == (1152 + 1152 + 8192) * 4 // 8
    )  # conv2, conv3, fc1: 4 frozen bits each (first/last are 8-bit)
    data = bytes(torch.randint(0, 256, (cap,), generator=torch.Generator().manual_seed(1)).tolist())
    payload.embed(net, data)
    x = torch.randn(64, 1, 8, 8)
    ds = torch.utils.data.TensorDataset(x, torch.randint(0, 4, (64,)))
    fit(net, ds, epochs=2, progress=False, batch_size=16, optimizer=torch.optim.Adam(net.parameters(), 1e-2))
    assert payload.extract(net, cap) == data
    with pytest.raises(ValueError, match=f"hold {cap} bytes"):
        payload.embed(net, data + b"x")


def test_loss_decreases_and_compile_matches_reference():
    torch.manual_seed(0)
    x = torch.rand(128, 1, 8, 8)
    y = (x.mean((1, 2, 3)) > 0.5).long() + 2 * (x[:, 0, :4].mean((1, 2)) > 0.5).long()
    net = bc.prepare(_cnn(), "bitwise:bits=5,train=all")
    h = fit(net, torch.utils.data.TensorDataset(x, y), epochs=5, progress=False, batch_size=32)
    assert sum(h.loss[-4:]) < sum(h.loss[:4])
    net.eval()
    cm = bc.compile(net, (x[:2],))
    xs = x[:8]
    assert_close(cm(xs), cm.reference(xs))
    assert_close(cm.reference(xs), net(xs), rtol=1e-4)


def test_compile_mixed_bits():
    # int8 activations: the integer accumulation is exact, so the offset-binary epilogue's cancellation
    # (offset·Σx against scale·acc) loses nothing; with float activations 7 bits can exceed 1e-5 in float32
    net = bc.prepare(_cnn(), "bitwise:bits=3,train=sign,act=8")
    net[4] = bc.prepare(_cnn(), "bitwise:bits=7,train=all,act=8")[
        4
    ]  # a second depth; first/last 8-bit affine
    net.eval()
    x = torch.rand(4, 1, 8, 8)
    cm = bc.compile(net, (x,))
    bits = sorted(m.bits for m in cm.graph.modules() if getattr(m, "planes", None) is not None)
    assert bits == [4, 4, 8, 8, 8]
    assert_close(cm(x), cm.reference(x))
    assert_close(cm.reference(x), net(x), rtol=1e-3)  # int8 rounding may differ at ties
    assert 0 <= bitwise.sparsity(net) <= 1
    # conv2 and fc1 freeze 3 of 4 bits, conv3 trains all 8
    assert bitwise.frozen_fraction(net) == pytest.approx((1152 + 8192) * 3 / ((1152 + 8192) * 4 + 1152 * 8))


def test_batchnorm_after_bitwise_layers_folds_and_compile_matches_reference():
    # the reproduction's CNN with BatchNorm before each ReLU: BN folds into the bit layers' epilogues
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 2 * 2, 16),
        nn.BatchNorm1d(16),
        nn.ReLU(),
        nn.Linear(16, 4),
    )
    x = torch.rand(128, 1, 8, 8)
    y = (x.mean((1, 2, 3)) > 0.5).long() + 2 * (x[:, 0, :4].mean((1, 2)) > 0.5).long()
    net = bc.prepare(net, "bitwise:bits=5,train=top2")
    fit(net, torch.utils.data.TensorDataset(x, y), epochs=3, progress=False, batch_size=32)
    bn = net[5]
    assert not torch.allclose(bn.running_var, torch.ones(16))  # trained statistics, not the identity
    net.eval()
    cm = bc.compile(net, (x[:2],))
    kinds = [type(m).__name__ for m in cm.graph.modules()]
    assert not any("BatchNorm" in k for k in kinds)
    assert kinds.count("BitConv2d") == 2 and kinds.count("BitLinear") == 2
    xs = x[:8]
    assert_close(cm(xs), cm.reference(xs))
    assert_close(cm.reference(xs), net(xs), rtol=1e-4)
