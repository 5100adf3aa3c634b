import torch
import torch.nn.functional as F
from torch import nn

from bitcompiler.passes import canonicalize
from tests.passes.conftest import structure, trace


class Before(nn.Module):
    def __init__(self):
        super().__init__()
        self.w, self.b = nn.Parameter(torch.randn(6, 4)), nn.Parameter(torch.randn(6))
        self.cw = nn.Parameter(torch.randn(4, 2, 3, 3))
        self.drop, self.ident = nn.Dropout(0.5), nn.Identity()

    def forward(self, x):
        x = F.conv2d(x, self.cw, padding=1)
        x = self.ident(F.dropout(x, 0.1, training=False)).mean((2, 3))
        return F.linear(self.drop(x), self.w, self.b)


class Expected(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.linear = nn.Conv2d(2, 4, 3, padding=1, bias=False), nn.Linear(4, 6)

    def forward(self, x):
        return self.linear(self.conv(x).mean((2, 3)))


def test_functional_calls_become_modules_and_dropout_disappears():
    model = Before().eval()
    x = torch.randn(2, 2, 5, 5)
    gm = canonicalize.run(trace(model))
    assert structure(gm) == structure(trace(Expected()))
    assert torch.equal(gm(x), model(x))
    conv = gm.get_submodule("conv")
    assert conv.padding == (1, 1) and conv.bias is None


def test_exported_aten_graph_is_canonicalized():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 4 * 4, 2)).eval()
    x = torch.randn(1, 3, 6, 6)
    gm = torch.export.export(model, (x,)).module()
    gm = canonicalize.run(gm)
    kinds = [k for op, k in structure(gm) if op == "call_module"]
    assert {"Conv2d", "BatchNorm2d", "Linear"} <= set(kinds)
    assert not any("aten.conv2d" in str(n.target) or "aten.linear" in str(n.target) for n in gm.graph.nodes)
    torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-6)


class ComputedWeights(nn.Module):
    """Weights computed from parameters: a pruning mask (X-DenseNet style) and weight normalization."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(16, 8, 3, 3))
        self.register_buffer("mask", (torch.rand(16, 8, 3, 3) > 0.5).float())
        self.fc = nn.utils.parametrizations.weight_norm(nn.Linear(16, 10))

    def forward(self, x):
        y = F.relu(F.conv2d(x, self.weight * self.mask, padding=1))
        return self.fc(y.mean((2, 3)))


class InputDependentWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.gen = nn.Linear(8, 8 * 8 * 9)

    def forward(self, x):
        return F.conv2d(x, self.gen(x.mean((0, 2, 3))).view(8, 8, 3, 3), padding=1)


def test_weights_computed_from_parameters_are_folded_and_quantized():
    import bitcompiler as bc

    model, x = ComputedWeights().eval(), torch.randn(1, 8, 6, 6)
    gm = canonicalize.run(trace(model))
    kinds = [k for op, k in structure(gm) if op == "call_module"]
    # the masked weight became a buffer; the weight-normalized Linear is an nn.Linear module already
    assert kinds.count("Conv2d") == 1 and kinds.count("ParametrizedLinear") == 1
    assert not any(n.op == "call_function" and "mul" in str(n.target) for n in gm.graph.nodes)
    torch.testing.assert_close(gm(x), model(x))
    cm = bc.compile(model, (x,), scheme="binary")
    rows = {r.op: r for r in cm.report().layers}
    assert rows["conv2d"].scheme != "float" and rows["linear"].scheme != "float"
    assert cm.report().weight_bytes < cm.report().float_weight_bytes
    xb = torch.randn(3, 8, 6, 6)
    ref = cm.reference(xb)
    assert (ref - model(xb)).abs().max() > 1e-3  # quantized, not float
    torch.testing.assert_close(cm(xb), ref, rtol=1e-5, atol=1e-5)


def test_a_weight_that_depends_on_the_input_stays_float_with_the_reason():
    import pytest

    import bitcompiler as bc
    from bitcompiler.passes.pipeline import PassError

    model, x = InputDependentWeight().eval(), torch.randn(1, 8, 6, 6)
    cm = bc.compile(model, (x,), scheme="binary")
    assert "depends on the input" in cm.report().extra["notes"]
    assert cm.report().float_ops.get("conv2d") == 1
    xb = torch.randn(2, 8, 6, 6)
    torch.testing.assert_close(cm(xb), cm.reference(xb), rtol=1e-5, atol=1e-5)
    with pytest.raises(PassError, match="depends on the input"):
        bc.compile(model, (x,), scheme="binary", strict=True)


class Conv1ds(nn.Module):
    """1-d convs of every kind canonicalize takes (module and functional; stride, dilation, groups,
    "same" and "valid" padding) and one it leaves (circular padding)."""

    def __init__(self):
        super().__init__()
        self.point = nn.Conv1d(4, 8, 1)
        self.strided = nn.Conv1d(8, 8, 3, stride=2, padding=2, dilation=2, groups=2, bias=False)
        self.circular = nn.Conv1d(8, 8, 3, padding=1, padding_mode="circular")
        self.w, self.b = nn.Parameter(torch.randn(8, 8, 3)), nn.Parameter(torch.randn(8))

    def forward(self, x):
        x = self.strided(torch.relu(self.point(x)))
        x = F.conv1d(x, self.w, self.b, padding="same")
        return self.circular(F.conv1d(x, self.w, padding="valid"))


def test_conv1d_becomes_conv2d_over_a_map_of_height_one():
    model = Conv1ds().eval()
    x = torch.randn(3, 4, 20)
    gm = canonicalize.run(trace(model))
    kinds = [k for op, k in structure(gm) if op == "call_module"]
    assert kinds == ["Conv2d"] * 4 + ["Conv1d"], kinds
    assert not any(op == "call_function" and k == "conv1d" for op, k in structure(gm))
    strided = gm.get_submodule("strided")  # a module keeps its name
    assert (strided.kernel_size, strided.stride, strided.padding, strided.dilation, strided.groups) == (
        (1, 3),
        (1, 2),
        (0, 2),
        (1, 2),
        2,
    )
    assert torch.allclose(gm(x), model(x), rtol=1e-5, atol=1e-5)


def test_compiled_conv1d_layers_are_quantized_and_exact():
    import bitcompiler as bc

    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv1d(8, 32, 3, padding=1),
        nn.ReLU(),
        nn.Conv1d(32, 64, 1),
        nn.Hardtanh(),
        nn.Conv1d(64, 64, 3, padding=1, stride=2),
        nn.Hardtanh(),
        nn.Flatten(),
        nn.Linear(64 * 8, 10),
    ).eval()
    x = torch.randn(6, 8, 16)
    cm = bc.compile(net, (x[:1],), scheme="binary:act=binary")
    rows = cm.report().layers
    assert [r.op for r in rows] == ["conv2d"] * 3 + ["linear"]
    assert [r.scheme for r in rows][1:3] == ["binary:act=binary"] * 2
    assert torch.equal(cm(x), cm.reference(x))


def test_string_padding_of_conv2d_becomes_integers():
    """``padding="same"`` at stride 1 (odd kernels, any dilation) and ``"valid"`` are written as the
    integers they mean, module or functional; ``"same"`` with an even kernel pads one side more and
    stays a string (the layer then stays float, with a note)."""

    class Padded(nn.Module):
        def __init__(self):
            super().__init__()
            self.same = nn.Conv2d(4, 4, 5, padding="same", groups=4)
            self.dilated = nn.Conv2d(4, 4, 3, padding="same", dilation=2)
            self.valid = nn.Conv2d(4, 4, 3, padding="valid")
            self.even = nn.Conv2d(4, 4, (3, 4), padding="same")
            self.w = nn.Parameter(torch.randn(4, 4, 3, 3))

        def forward(self, x):
            x = self.valid(self.dilated(self.same(x)))
            return self.even(F.conv2d(x, self.w, padding="same"))

    model = Padded().eval()
    x = torch.randn(2, 4, 11, 11)
    gm = canonicalize.run(trace(model))
    paddings = {n: m.padding for n, m in gm.named_modules() if isinstance(m, nn.Conv2d)}
    assert paddings == {"same": (2, 2), "dilated": (2, 2), "valid": (0, 0), "even": "same", "conv": (1, 1)}
    assert torch.allclose(gm(x), model(x), rtol=1e-5, atol=1e-5)


class _NormAct(nn.BatchNorm2d):
    """timm's ``BatchNormAct2d`` in small: a rank assertion, then ``F.batch_norm`` called with the
    module's statistics, then an activation."""

    def forward(self, x):
        torch._assert(x.ndim == 4, "expected 4D input")
        x = F.batch_norm(
            x,
            self.running_mean,
            self.running_var,
            weight=self.weight,
            bias=self.bias,
            training=False,
            momentum=0.1,
            eps=self.eps,
        )
        return F.hardtanh(x)


def test_functional_batch_norm_after_a_conv_folds_and_shape_asserts_go():
    import bitcompiler as bc

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        _NormAct(16),
        nn.Conv2d(16, 16, 3, padding=1),
        _NormAct(16),
        nn.Flatten(),
        nn.Linear(16 * 8 * 8, 10),
    ).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2)
    gm = canonicalize.run(trace(model))
    kinds = structure(gm)
    assert ("call_module", "BatchNorm2d") in kinds
    assert not any(k in ("batch_norm", "_assert", "eq") for _, k in kinds), kinds
    x = torch.randn(4, 3, 8, 8)
    assert torch.allclose(gm(x), model(x), rtol=1e-5, atol=1e-5)
    cm = bc.compile(model, (x[:1],), scheme="binary:act=binary")
    assert set(cm.report().float_ops) <= {"flatten", "hardtanh", "Flatten"}, cm.report().float_ops
    assert torch.equal(cm(x), cm.reference(x))
