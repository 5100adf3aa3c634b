import pytest
import torch
from torch import nn

from bitcompiler import CaptureError
from bitcompiler.capture import capture


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:
            return self.fc(x)
        return -x


class ShapeDependent(nn.Module):
    """fx cannot branch on a shape proxy; torch.export specializes it."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if x.shape[1] == 4:
            return self.fc(x)
        return x


def test_fx_traceable_model_is_captured_with_modules():
    gm = capture(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), (torch.randn(1, 4),))
    assert [n.op for n in gm.graph.nodes] == ["placeholder", "call_module", "call_module", "output"]


def test_export_fallback_captures_shape_dependent_control_flow():
    model = ShapeDependent().eval()
    x = torch.randn(2, 4)
    gm = capture(model, (x,))
    assert any("linear" in str(n.target) for n in gm.graph.nodes)
    torch.testing.assert_close(gm(x), model(x))


def test_untraceable_control_flow_names_the_line_and_a_fix():
    with pytest.raises(CaptureError) as e:
        capture(DataDependent(), (torch.randn(1, 4),))
    msg = str(e.value)
    assert "cannot capture DataDependent" in msg
    assert "test_capture.py" in msg and "if x.sum() > 0:" in msg
    assert "torch.where" in msg


def test_capture_does_not_modify_the_users_model():
    model = nn.Sequential(nn.Linear(4, 4)).train()
    capture(model, (torch.randn(1, 4),))
    assert model.training


class SplitBranches(nn.Module):
    """MixNet-style: torch.split + a list comprehension over branches; torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 5, padding=2)])

    def forward(self, x):
        xs = torch.split(x, 4, dim=1)
        return torch.cat([c(xi) for c, xi in zip(self.convs, xs)], 1)


class FixedBatch(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        if x.shape[1] == 16:  # shape branch: only torch.export captures it
            return self.fc(x.view(1, -1))
        return x


def test_export_fallback_keeps_the_batch_dynamic():
    import bitcompiler as bc

    model, x = SplitBranches().eval(), torch.randn(1, 8, 6, 6)
    with pytest.raises(Exception):  # noqa: B017 - whatever fx raises: the fallback is what is tested
        torch.fx.symbolic_trace(model)
    gm = capture(model, (x,))
    assert "bitc_fixed_batch" not in gm.meta
    assert not any("guard" in str(n.target).lower() for n in gm.graph.nodes)
    cm = bc.compile(model, (x,), scheme="binary")
    assert cm.dynamic_batch and "batch" not in cm.report().extra
    assert not any("guard" in op.lower() for op in cm.report().float_ops)
    xb = torch.randn(5, 8, 6, 6)
    torch.testing.assert_close(cm(xb), cm.reference(xb), rtol=1e-5, atol=1e-5)


def test_a_fixed_batch_warns_and_is_reported():
    import bitcompiler as bc

    model, x = FixedBatch().eval(), torch.randn(1, 16)
    with pytest.warns(UserWarning, match="fixed batch of 1"):
        cm = bc.compile(model, (x,), scheme="none")
    assert not cm.dynamic_batch
    assert "fixed at 1" in cm.report().extra["batch"] and "view" in cm.report().extra["batch"]
    torch.testing.assert_close(cm(x), model(x))
    with pytest.raises(ValueError, match="fixed batch of 1"):
        cm(torch.randn(2, 16))
