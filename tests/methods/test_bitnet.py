"""BitNet (docs/methods.md §1): formulas, bit-update direction, regularized training, compile."""

import pytest
import torch
from torch import nn

import bitcompiler as bc
from bitcompiler.methods import bitnet
from bitcompiler.methods.bitnet import BitNetWeight
from bitcompiler.quant import numerics
from bitcompiler.train import fit
from tests.conftest import assert_close


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 4))


def test_quantization_error_hand_computed():
    # W = [0, 0.3, 1] at 1 bit: α = 0, δ = 1, W_q = [0, 0, 1] -> ½·0.3² ; at 2 bits δ = 1/3: W_q = [0, 1/3, 1]
    w = torch.tensor([[0.0, 0.3, 1.0]])
    assert float(numerics.quantization_error(w, 1)) == pytest.approx(0.5 * 0.09)
    assert float(numerics.quantization_error(w, 2)) == pytest.approx(0.5 * (1 / 3 - 0.3) ** 2)


def test_bit_update_hand_computed():
    assert numerics.sign_eps(0.5e-9, 1e-9) == 0 and numerics.sign_eps(-2e-9, 1e-9) == -1
    assert numerics.halved(1e-3, 399, 200) == pytest.approx(0.5e-3)
    assert numerics.halved(1e-3, 400, 200) == pytest.approx(0.25e-3)
    # μλ1(Q(B) − Q(B−1)) + μλ2·2^B = 1·1·(1 − 3) + 1·0.01·8 = −1.92 < 0  -> B goes up
    assert numerics.bit_update(3.0, 1.0, 3, 1.0, 0.01, 1.0, 1e-9) == 1
    # bit cost dominates: 1·(−2) + 1·1·8 = 6 > 0 -> B goes down
    assert numerics.bit_update(3.0, 1.0, 3, 1.0, 1.0, 1.0, 1e-9) == -1
    # inside the dead zone: no move
    assert numerics.bit_update(3.0, 1.0, 3, 1e-12, 1e-12, 1.0, 1e-9) == 0


def _train_steps(scheme: str, steps: int = 5) -> nn.Module:
    net = bc.prepare(_mlp(), scheme)
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    x, y = torch.randn(64, 16), torch.randint(0, 4, (64,))
    for _ in range(steps):
        loss = nn.functional.cross_entropy(net(x), y) + bc.regularization_loss(net)
        opt.zero_grad()
        loss.backward()
        opt.step()
        bc.step(net)
    return net


def test_large_bit_cost_lowers_bits_and_large_error_weight_raises_them():
    low = _train_steps("bitnet:first_last=quantize,lambda1=0,lambda2=1", steps=3)
    assert [q.bits for q in bitnet.quantizers(low)] == [5, 5, 5]
    high = _train_steps("bitnet:first_last=quantize,init_bits=4,lambda1=1e3,lambda2=0", steps=3)
    assert [q.bits for q in bitnet.quantizers(high)] == [7, 7, 7]
    clamped = _train_steps("bitnet:first_last=quantize,min_bits=3,lambda1=0,lambda2=1", steps=20)
    assert [q.bits for q in bitnet.quantizers(clamped)] == [3, 3, 3]


def test_mu_halving_stops_the_updates():
    # μ_k·λ2·2^B = 1e-6·0.5^k·2^B: 2.56e-4, 6.4e-5, 1.6e-5 move B to 7, 6, 5; then 4e-6 < ε = 1e-5
    net = _train_steps(
        "bitnet:first_last=quantize,lambda1=0,lambda2=1e-3,mu_halve_every=1,eps=1e-5", steps=10
    )
    assert [q.bits for q in bitnet.quantizers(net)] == [5, 5, 5]


def test_forward_is_affine_quantization_with_straight_through_gradient():
    q = BitNetWeight(init_bits=3)
    w = torch.randn(4, 5, requires_grad=True)
    out = q(w)
    c, alpha, delta = numerics.affine_weight(w, 3)
    assert torch.allclose(out, alpha + delta * c.float())
    assert len(torch.unique(out.detach())) <= 8
    out.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))


def test_float_mode_trains_on_real_weights_and_evaluates_quantized():
    q = BitNetWeight(init_bits=2, mode="float")
    w = torch.randn(4, 5)
    assert torch.equal(q(w), w)
    q.eval()
    assert len(torch.unique(q(w))) <= 4


def test_regularization_formula_and_gradient():
    q = BitNetWeight(init_bits=2, lambda1=0.5, lambda2=0.25)
    w = torch.tensor([[0.0, 0.3, 1.0]], requires_grad=True)
    r = q.regularization(w)
    assert float(r.detach()) == pytest.approx(0.5 * 0.5 * (1 / 3 - 0.3) ** 2 + 0.25 * 4)
    r.backward()  # λ1 (W − W_q): pulls W towards its quantized value
    assert torch.allclose(w.grad, 0.5 * (w.detach() - torch.tensor([[0.0, 1 / 3, 1.0]])))


def test_fit_adds_regularization_steps_bits_and_lowers_loss():
    torch.manual_seed(0)
    x = torch.randn(256, 16)
    y = x[:, :4].argmax(1)
    data = torch.utils.data.TensorDataset(x, y)
    net = bc.prepare(_mlp(), "bitnet:first_last=quantize,lambda2=1e-4")
    h = fit(net, data, epochs=4, progress=False, batch_size=64)
    assert sum(h.loss[-4:]) < sum(h.loss[:4])
    assert set(h.bits) == {"0", "2", "4"} and all(len(v) == h.steps for v in h.bits.values())
    assert all(v[-1] < 8 for v in h.bits.values())  # the bit cost moved B


def test_compile_matches_reference_with_mixed_bits():
    net = bc.prepare(_mlp(), "bitnet:first_last=quantize")
    for q, b in zip(bitnet.quantizers(net), (3, 5, 8)):
        q.b.fill_(b)
    net.eval()
    cm = bc.compile(net, (torch.randn(2, 16),))
    bits = sorted(m.bits for m in cm.graph.modules() if hasattr(m, "planes") and m.planes is not None)
    assert bits == [3, 5, 8]
    x = torch.randn(8, 16)
    assert_close(cm(x), cm.reference(x))
    assert_close(cm.reference(x), net(x), rtol=1e-4)  # the reference is the trained network's numbers
