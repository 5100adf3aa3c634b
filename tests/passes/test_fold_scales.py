import torch
import torch.nn.functional as F
from torch import nn

from bitcompiler.passes import fold_scales, insert_quantizers
from bitcompiler.quant import numerics
from bitcompiler.quant.bitlayers import BitConv2d, BitLinear
from tests.conftest import randomize_bn
from tests.passes.conftest import ctx, structure, trace


def quantized(model, scheme, x):
    return insert_quantizers.run(trace(model), ctx(scheme, x))


def test_quantized_linear_becomes_integer_codes_with_alpha_and_delta_pulled_out():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 4))
    x = torch.randn(5, 20)
    gm = quantized(model, "uniform:bits=3", x)
    want = gm(x)
    gm = fold_scales.run(gm)
    kinds = [k for op, k in structure(gm) if op == "call_module"]
    assert kinds == ["BitLinear", "ReLU", "BitLinear", "ReLU", "BitLinear"]
    mid = gm.get_submodule("2")
    q, alpha, delta = numerics.affine_weight(model[2].weight, 3)
    assert torch.equal(mid.codes.long(), q)  # integer part exact
    assert torch.allclose(mid.scale, delta.expand(12)) and torch.allclose(mid.offset, alpha.expand(12))
    # y = δ·(Q x) + α·Σx reproduces the fake-quantized float layer
    torch.testing.assert_close(gm(x), want, rtol=1e-5, atol=1e-5)


class ConvBnChain(nn.Module):
    def __init__(self):
        super().__init__()
        self.c0 = nn.Conv2d(1, 8, 3, padding=1)
        self.c1, self.b1 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = self.c0(x)
        x = self.b1(self.c1(x)) * 0.5 + 0.25  # BN and scalar affines after a bit layer merge
        x = F.max_pool2d(x, 2)  # sign-preserving: c1 output only feeds sign() of c2
        x = self.b2(self.c2(x))
        return self.fc(F.relu(x).mean((2, 3)))


def test_affine_chain_merges_and_bn_then_sign_becomes_integer_threshold():
    torch.manual_seed(0)
    model = randomize_bn(ConvBnChain())
    x = torch.randn(3, 1, 8, 8)
    gm = quantized(model, "binary:act=binary", x)  # prepared-style: BN stays after quantized conv
    want = gm(x)
    gm = fold_scales.run(gm)
    kinds = [k for op, k in structure(gm) if op == "call_module"]
    assert "BatchNorm2d" not in kinds and ("call_function", "mul") not in structure(gm)
    c1, c2 = gm.get_submodule("c1"), gm.get_submodule("c2")
    assert isinstance(c1, BitConv2d) and c1.threshold  # feeds sign() of c2 through max_pool2d
    assert not c2.threshold  # feeds relu
    assert not gm.get_submodule("c0").threshold  # 8-bit first layer (int8 act) keeps a float epilogue
    # thresholds give exactly the signs the float epilogue would: same network output
    torch.testing.assert_close(gm(x), want, rtol=1e-5, atol=1e-5)


def test_threshold_matches_numerics_rule():
    torch.manual_seed(4)
    model = randomize_bn(ConvBnChain())
    gm = fold_scales.run(quantized(model, "binary:act=binary", torch.randn(1, 1, 8, 8)))
    c1 = gm.get_submodule("c1")
    thr_sign, thr = numerics.integer_thresholds(c1.scale, c1.bias)
    assert torch.equal(c1.thr_sign, thr_sign) and torch.equal(c1.thr, thr)


def test_linear_codes_are_pm1_for_binary():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2))
    gm = fold_scales.run(quantized(model, "binary", torch.randn(1, 4)))
    mid = gm.get_submodule("1")
    assert isinstance(mid, BitLinear) and mid.code == "pm1"
    assert set(mid.codes.unique().tolist()) <= {-1, 1}


class ThresholdThenHardtanh(nn.Module):
    """c1 gets thresholds (it feeds only sign() of c2/c3); the hardtanhs after it are identities on
    +-1 except the narrow one, which must stay."""

    def __init__(self):
        super().__init__()
        self.c0 = nn.Conv2d(1, 8, 3, padding=1)
        self.c1, self.b1 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.act = nn.Hardtanh()
        self.c2, self.c3 = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        y = self.b1(self.c1(self.c0(x)))
        a = self.c2(self.act(y))
        b = self.c3(F.hardtanh(F.hardtanh(y, -2.0, 2.0), min_val=-0.5, max_val=0.5))
        return self.fc(torch.cat([a.mean((2, 3)), b.mean((2, 3))], 1))


def test_hardtanh_after_a_threshold_layer_is_dropped():
    torch.manual_seed(1)
    model = randomize_bn(ThresholdThenHardtanh())
    x = torch.randn(2, 1, 8, 8)
    gm = quantized(model, "binary:act=binary", x)
    want = gm(x)
    gm = fold_scales.run(gm)
    assert gm.get_submodule("c1").threshold
    kinds = structure(gm)
    assert ("call_module", "Hardtanh") not in kinds  # the module form went
    hardtanhs = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is F.hardtanh]
    assert len(hardtanhs) == 1
    assert (hardtanhs[0].kwargs["min_val"], hardtanhs[0].kwargs["max_val"]) == (-0.5, 0.5)
    gm.graph.lint()
    torch.testing.assert_close(gm(x), want, rtol=1e-5, atol=1e-5)
