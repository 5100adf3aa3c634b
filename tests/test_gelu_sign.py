"""A GELU that only layers with binary activations read (an MLP block's hidden layer) is compiled as
its sign rule (``bitc::exact_unary(x, "gelu_sign")``, ``numerics.gelu_sign32``): two comparisons
instead of an erf per element, equal to ``sign(F.gelu(x))`` as PyTorch computes it outside a narrow
band where PyTorch's own rounding of erf decides, and bit-identical in the reference and the code."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bitcompiler as bc
from bitcompiler.quant import numerics

# PyTorch's float32 GELU rounds to -0.0 for some inputs in here and not for others
BAND = (-5.5426, -5.4858)


def _sweep() -> torch.Tensor:
    """Every 97th float32 in [-16, 16] (both signs), zeros, the rule's threshold, large values."""
    pos = np.arange(0, 0x41800000, 97, dtype=np.int64).astype(np.int32).view(np.float32)
    edges = np.float32([0.0, -0.0, numerics.GELU_ZERO_BELOW, -5.5426, -5.4858, 1e30, -1e30, 100, -100])
    return torch.from_numpy(np.concatenate([pos, -pos, edges]))


def test_rule_is_the_sign_of_torch_gelu_outside_the_band():
    x = _sweep()
    want = numerics.sign(F.gelu(x))
    got = numerics.exact_unary(x, "gelu_sign")
    outside = (x < BAND[0]) | (x > BAND[1])
    assert torch.equal(got[outside], want[outside])
    assert set(got.unique().tolist()) == {-1.0, 1.0}
    # where PyTorch's GELU is -0.0 (far below zero) the binary activation reads +1, and so does the rule
    assert got[x < -6].eq(1).all() and got[(x < 0) & (x > BAND[1])].eq(-1).all()


def test_cpu_kernel_equals_reference_bit_for_bit():
    import tvm
    from tvm import te

    from bitcompiler.backends.exact_float import TirFloat32

    x = _sweep()
    X = te.placeholder((x.numel(),), "float32", "X")
    Y = te.compute(X.shape, lambda i: numerics.gelu_sign32(X[i], TirFloat32()), name="Y")
    func = te.create_prim_func([X, Y]).with_attr("global_symbol", "main")
    lib = tvm.compile(tvm.IRModule({"main": func}), target=bc.Target("cpu").tvm_target())
    out = tvm.runtime.tensor(torch.zeros_like(x).numpy())
    lib["main"](tvm.runtime.tensor(x.numpy()), out)
    assert torch.equal(torch.from_numpy(out.numpy()), numerics.exact_unary(x, "gelu_sign"))


class GeluMLP(nn.Module):
    """8-bit first and last layers, two binary hidden layers behind a GELU module and function."""

    def __init__(self, spread: float = 1.0) -> None:
        super().__init__()
        self.inp, self.mid, self.mid2, self.out = (
            nn.Linear(16, 128),
            nn.Linear(128, 128),
            nn.Linear(128, 64),
            nn.Linear(64, 10),
        )
        self.act = nn.GELU()
        with torch.no_grad():
            self.inp.weight.mul_(spread)

    def forward(self, x):
        return self.out(self.mid2(F.gelu(self.mid(self.act(self.inp(x))))))


class Kept(GeluMLP):
    """GELUs whose values matter: one also read by an add, a tanh-approximate one, one read by the
    8-bit last layer."""

    def forward(self, x):
        g = F.gelu(self.inp(x))
        h = self.mid(g) + g
        return self.out(F.gelu(self.mid2(F.gelu(h, approximate="tanh"))))


def _targets(cm) -> list[str]:
    return [str(n.target) for n in cm.graph.graph.nodes]


def test_only_gelus_whose_signs_alone_are_read_are_rewritten():
    torch.manual_seed(0)
    cm = bc.compile(GeluMLP().eval(), (torch.randn(1, 16),), scheme="binary:act=binary")
    assert sum("exact_unary" in t for t in _targets(cm)) == 2
    assert not any("gelu" in t for t in _targets(cm))
    assert cm.report().float_ops["gelu_sign"] == 2
    kept = bc.compile(Kept().eval(), (torch.randn(1, 16),), scheme="binary:act=binary")
    assert not any("exact_unary" in t for t in _targets(kept))
    # float activations: the binary layers read values, not signs
    plain = bc.compile(GeluMLP().eval(), (torch.randn(1, 16),), scheme="binary")
    assert not any("exact_unary" in t for t in _targets(plain))


def test_vpop_dense_kernels_apply_the_rule_in_their_sign_packing():
    """Where the CPU has AVX-512 vector popcounts, the binary dense kernel reads the GELU's input and
    packs it by the rule itself: no separate rule kernel is left (elsewhere the rule's kernel runs)."""
    from bitcompiler.kernels.dense_avx2 import popcnt512_target
    from bitcompiler.target import Target, backend_for

    torch.manual_seed(0)
    cm = bc.compile(GeluMLP().eval(), (torch.randn(1, 16),), scheme="binary:act=binary")
    names = set(cm.profile(torch.randn(3, 16), repeat=2).kernels)
    fused = [n for n in names if "_vpop_gelu" in n]
    if popcnt512_target(backend_for(Target("cpu")).tvm_target(Target("cpu"))):
        assert len(fused) == 2 and not any("gelu_sign" in n for n in names), sorted(names)
    else:
        assert not fused and sum("gelu_sign" in n for n in names) == 2, sorted(names)


def test_compiled_model_is_bit_exact_across_the_band():
    """Pre-activations spread over about +-20: hundreds fall in the band and below the threshold;
    every output equals the reference's, and the first GELU's readers see the rule's signs."""
    torch.manual_seed(0)
    model = GeluMLP(spread=12.0).eval()
    x = torch.randn(2000, 16)
    with torch.no_grad():
        pre = model.inp(x)
    assert ((pre > BAND[0]) & (pre < BAND[1])).sum() > 100 and (pre < -6).sum() > 1000
    cm = bc.compile(model, (x[:1],), scheme="binary:act=binary")
    assert torch.equal(cm(x), cm.reference(x))


def test_onnx_export_writes_the_rule(tmp_path):
    pytest.importorskip("onnxruntime")
    import onnx

    from tests.test_onnx import run_ort

    torch.manual_seed(0)
    cm = bc.compile(GeluMLP().eval(), (torch.randn(1, 16),), scheme="binary:act=binary")
    path = cm.export_onnx(tmp_path / "g.onnx", format="qdq")
    kinds = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert "Where" in kinds and "Erf" not in kinds and "Gelu" not in kinds
    x = torch.randn(8, 16)
    ref = cm.reference(x)
    assert float((run_ort(path, x) - ref).abs().max()) <= 1e-4 * float(ref.abs().max())


class ConvTokenMixer(nn.Module):
    """A Mixer block whose token MLP is two ``Conv1d(kernel_size=1)`` over the tokens as channels:
    the first GELU reaches its binary reader through the 1-d conv's ``unsqueeze``."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.out = nn.Linear(48, 32), nn.Linear(32, 10)
        self.norm = nn.LayerNorm(32)
        self.t1, self.t2 = nn.Conv1d(16, 64, 1), nn.Conv1d(64, 16, 1)
        self.c1, self.c2 = nn.Linear(32, 128), nn.Linear(128, 32)

    def forward(self, x):
        h = self.inp(x)
        h = h + self.t2(F.gelu(self.t1(self.norm(h))))
        h = h + self.c2(F.gelu(self.c1(self.norm(h))))
        return self.out(h.mean(1))


def test_gelu_read_through_a_conv1d_unsqueeze_is_rewritten():
    torch.manual_seed(0)
    cm = bc.compile(ConvTokenMixer().eval(), (torch.randn(1, 16, 48),), scheme="binary:act=binary")
    assert cm.report().float_ops.get("gelu_sign") == 2 and "gelu" not in cm.report().float_ops
    x = torch.randn(5, 16, 48)
    ref = cm.reference(x)
    assert float((cm(x) - ref).abs().max()) <= 1e-5 * float(ref.abs().max())


@pytest.mark.slow
def test_cortex_m_code_applies_the_rule_bit_exactly():
    """The Cortex-M C emitter of the rule (``exact_unary``'s, per element) on the same spread of
    pre-activations, run in QEMU (Cortex-M4): every output equals the reference's."""
    from bitcompiler.backends.cortex_m.qemu import missing_tools

    if missing_tools():
        pytest.skip("arm-none-eabi-gcc / qemu-system-arm missing")
    torch.manual_seed(0)
    model = GeluMLP(spread=12.0).eval()
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        pre = model.inp(x)
    assert ((pre > BAND[0]) & (pre < BAND[1])).sum() > 0 and (pre < -6).sum() > 0
    target = bc.Target("cortex-m4", count_instructions=False)
    cm = bc.compile(model, (x[:1],), target=target, scheme="binary:act=binary")
    assert sum("exact_unary" in t for t in _targets(cm)) == 2
    assert torch.equal(cm(x), cm.reference(x))
