"""Exactness (docs/guide.md): with int8 or binary activations the compiled model reproduces the
reference bit for bit at any depth, so its outputs are *equal*, not close."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bitcompiler as bc
from bitcompiler.backends.cortex_m.qemu import missing_tools
from tests.conftest import randomize_bn


class Block(nn.Module):
    """A residual block; ``pre=True`` is the pre-activation form (a BatchNorm after the add)."""

    def __init__(self, cin: int, cout: int, stride: int, pre: bool) -> None:
        super().__init__()
        self.pre = pre
        self.bn0 = nn.BatchNorm2d(cin) if pre else nn.Identity()
        self.c1, self.b1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.c2, self.b2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.down = nn.Conv2d(cin, cout, 1, stride, bias=False) if stride != 1 or cin != cout else None

    def forward(self, x):
        y = F.relu(self.bn0(x)) if self.pre else x
        skip = self.down(y) if self.down is not None else x
        y = self.b2(self.c2(F.relu(self.b1(self.c1(y)))))
        return y + skip if self.pre else F.relu(y + skip)


class DeepNet(nn.Module):
    """Stem, ``3 * blocks`` residual blocks, an average pool mid-way, a global mean, a classifier:
    ``6 * blocks + 4`` quantized layers."""

    def __init__(self, blocks: int = 3, width: int = 8, pre: bool = False) -> None:
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)
        layers, cin = [], width
        for stage, cout in enumerate((width, 2 * width, 4 * width)):
            for b in range(blocks):
                layers.append(Block(cin, cout, 2 if stage and not b else 1, pre))
                cin = cout
        self.early, self.late = nn.Sequential(*layers[:blocks]), nn.Sequential(*layers[blocks:])
        self.fc = nn.Linear(cin, 10)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        x = F.avg_pool2d(self.early(x), 3, 1, 1)  # padded windows of 9 taps
        x = self.late(x)
        return self.fc(x.mean((2, 3)))


def _net(pre: bool = False, blocks: int = 3, width: int = 8) -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn(DeepNet(blocks, width, pre))


def _mismatches(cm: bc.CompiledModel, x: torch.Tensor, chunk: int = 250) -> int:
    """Output elements where the compiled model and the reference differ (any bit)."""
    return sum(int((cm(c) != cm.reference(c)).sum()) for c in x.split(chunk))


def _inputs(shape: tuple, n: int = 1000) -> torch.Tensor:
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(7))


def test_no_fused_multiply_add_in_cpu_code():
    """TVM's LLVM target contracts a*b+c into one FMA; the pass keeps the two roundings."""
    import tvm
    from tvm import te

    from bitcompiler.backends.cpu import relax_pipeline  # noqa: F401 (the pipeline adds the pass)
    from bitcompiler.backends.exact_float import fence_products

    a, b, c = (te.placeholder((64,), "float32", n) for n in "abc")
    d = te.compute((64,), lambda i: a[i] * b[i] + c[i], name="d")
    func = fence_products(te.create_prim_func([a, b, c, d]).with_attr("global_symbol", "main"))
    lib = tvm.compile(tvm.IRModule({"main": func}), target=bc.Target("cpu").tvm_target())
    assert "fmadd" not in lib.mod.inspect_source("s")
    x, y, z = (torch.randn(64) for _ in range(3))
    out = tvm.runtime.tensor(torch.zeros(64).numpy())
    lib["main"](*(tvm.runtime.tensor(t.numpy()) for t in (x, y, z)), out)
    assert torch.equal(torch.from_numpy(out.numpy()), x * y + z)


def test_window_mean_is_average_pooling():
    from bitcompiler.quant import numerics

    x = torch.randn(2, 3, 9, 9)
    for k, s, p, inc in (((9, 9), (1, 1), (0, 0), True), ((3, 3), (2, 2), (1, 1), False)):
        ref = F.avg_pool2d(x, k, s, p, count_include_pad=inc)
        torch.testing.assert_close(numerics.window_mean(x, k, s, p, inc), ref, rtol=1e-6, atol=1e-6)


def test_deep_residual_net_int8_is_bit_exact():
    """22 quantized layers (int8 activations, 2-bit weights), 1,000 inputs: zero mismatches."""
    net = _net()
    cm = bc.compile(net, (torch.randn(1, 3, 16, 16),), scheme="uniform:bits=2,act=8")
    assert sum("bitc" in str(n.target) and "window" not in str(n.target) for n in cm.graph.graph.nodes) >= 22
    assert _mismatches(cm, _inputs((3, 16, 16))) == 0


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["binary", "binary:act=binary", "uniform:bits=4,act=8"])
@pytest.mark.parametrize("pre", [False, True])
def test_deep_residual_nets_are_bit_exact(scheme: str, pre: bool):
    cm = bc.compile(_net(pre), (torch.randn(1, 3, 16, 16),), scheme=scheme)
    _check(cm, scheme, _inputs((3, 16, 16)))


def _check(cm: bc.CompiledModel, scheme: str, x: torch.Tensor) -> None:
    """Integer activations: no mismatch. Plain ``binary`` keeps float activations between its
    layers (float accumulations, outside the contract): 1e-5 relative there."""
    if scheme == "binary":
        for c in x.split(250):  # chunks: a 1,000-image DenseNet batch in torch takes gigabytes
            got, ref = cm(c), cm.reference(c)
            assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()
    else:
        assert _mismatches(cm, x) == 0


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet20_cifar10", "preresnet20_cifar10", "densenet40_k12_cifar10"])
@pytest.mark.parametrize("scheme", ["uniform:bits=2,act=8", "binary"])
def test_third_party_nets_are_bit_exact(name: str, scheme: str):
    pytest.importorskip("pytorchcv")
    from bench.corpus import build

    model, x = build(name)
    cm = bc.compile(model, (x,), scheme=scheme)
    _check(cm, scheme, _inputs(tuple(x.shape[1:])))


@pytest.mark.slow
@pytest.mark.skipif(bool(missing_tools()), reason="arm-none-eabi-gcc / qemu-system-arm missing")
@pytest.mark.parametrize("scheme", ["uniform:bits=2,act=8", "binary:act=binary"])
def test_cortex_m_deep_net_is_bit_exact(scheme: str):
    """10 quantized layers on Cortex-M4 (QEMU), C bundle built with -ffp-contract=off."""
    net = _net(blocks=1, width=8)
    target = bc.Target("cortex-m4", count_instructions=False)
    cm = bc.compile(net, (torch.randn(1, 3, 8, 8),), target=target, scheme=scheme)
    x = _inputs((3, 8, 8), 16)
    assert torch.equal(cm(x), cm.reference(x))


def test_float_activation_classifier_sums_like_the_reference():
    """``binary`` keeps the last layer at 8 bits with float activations; fed non-negative features
    (after a ReLU) its uncentered ``scale·acc + offset·sumx`` cancelled, and float32 sums missed the
    reference by 1e-4 (CondenseNet; here 1.05e-5). With centered codes (``numerics.code_center``)
    float32 sums stay within what the hidden binary layer's float32 sums leave."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 16))
    cm = bc.compile(net.eval(), (torch.randn(1, 64),), scheme="binary")
    x = _inputs((64,), 200)
    got, ref = cm(x), cm.reference(x)
    assert float((got - ref).abs().max()) <= 4e-6 * float(ref.abs().max())


class TokenNorms(nn.Module):
    """LeViT's ``LinearNorm`` (a BatchNorm1d over the flattened tokens, then reshaped back) between
    Linears, a BatchNorm1d over a sequence's channels ``(N, C, L)`` and one on ``(N, C)``: none
    absorbed by a layer (each follows a float op or a reshape)."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.n1 = nn.Linear(16, 32), nn.BatchNorm1d(32)
        self.l2, self.n2 = nn.Linear(32, 32), nn.BatchNorm1d(8)
        self.l3, self.n3 = nn.Linear(32 * 8, 24), nn.BatchNorm1d(24)
        self.l4 = nn.Linear(24, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (N, 8 tokens, 16)
        y = self.l1(x)
        y = self.n1(y.flatten(0, 1)).reshape_as(y)  # (N, 8, 32), normalized per feature
        y = self.n2(torch.relu(self.l2(y)))  # (N, 8, 32) as (N, C=8, L=32)
        y = self.n3(torch.relu(self.l3(y.flatten(1))))  # (N, 24)
        return self.l4(torch.relu(y))


def _token_norms() -> nn.Module:
    torch.manual_seed(0)
    model = TokenNorms().eval()
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm1d):  # statistics far from the identity
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=g) - 0.5)
    return model


def test_batchnorm1d_between_int8_layers_is_bit_exact():
    """A BatchNorm1d no layer absorbs becomes a multiply then an add, as a BatchNorm2d does (ATen's
    kernel rounded differently from TVM's: 88 of these 100 batches differed before)."""
    x = _inputs((8, 16), 400)
    with pytest.warns(UserWarning, match="fixed batch"):  # flatten(0, 1) fixes the batch
        cm = bc.compile(_token_norms(), (x[:4],), scheme="uniform:bits=2,act=8")
    ops = cm.report().float_ops
    assert not any("BatchNorm" in k for k in ops), ops
    assert ops.get("mul") == 3 and ops.get("add") == 3, ops
    for chunk in x.split(4):
        assert torch.equal(cm(chunk), cm.reference(chunk))


@pytest.mark.slow
@pytest.mark.skipif(bool(missing_tools()), reason="arm-none-eabi-gcc / qemu-system-arm missing")
def test_cortex_m_batchnorm1d_factors_are_bit_exact():
    """The same model on Cortex-M4: the multiply and add read their per-channel factors from flash,
    broadcast over the channel axis, and ``reshape_as`` is an alias (both raised before)."""
    x = _inputs((8, 16), 16)
    target = bc.Target("cortex-m4", count_instructions=False)
    with pytest.warns(UserWarning, match="fixed batch"):
        cm = bc.compile(_token_norms(), (x[:4],), target=target, scheme="uniform:bits=2,act=8")
    for chunk in x.split(4):
        assert torch.equal(cm(chunk), cm.reference(chunk))


class IdentityNorm(nn.Module):
    """RepVGG's block as timm writes it: a 3x3 and a 1x1 conv branch plus a BatchNorm of the input
    itself (the identity branch), called as ``F.batch_norm`` on the module's buffers (timm's
    ``BatchNormAct2d``), summed and ReLU'd, between int8 layers."""

    def __init__(self, c: int = 16) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.c3, self.c1 = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 1)
        self.bn = nn.BatchNorm2d(c)
        self.head = nn.Conv2d(c, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        b = self.bn
        ident = F.batch_norm(x, b.running_mean, b.running_var, b.weight, b.bias, False, 0.1, b.eps)
        return self.head(torch.relu(self.c3(x) + self.c1(x) + ident))


def test_functional_batchnorm_of_a_map_no_conv_made_is_bit_exact():
    """An eval ``F.batch_norm`` whose input no conv wrote (so nothing folds it) becomes a multiply
    then an add like a leftover BatchNorm module (timm's RepVGG: 8 of 8 batches differed)."""
    torch.manual_seed(0)
    model = randomize_bn(IdentityNorm()).eval()
    x = _inputs((3, 12, 12), 200)
    cm = bc.compile(model, (x[:1],), scheme="uniform:bits=2,act=8")
    ops = cm.report().float_ops
    assert "batch_norm" not in ops and ops.get("mul") == 1, ops
    assert _mismatches(cm, x) == 0
