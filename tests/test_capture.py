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
