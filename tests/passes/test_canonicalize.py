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
