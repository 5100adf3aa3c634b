import torch
import torch.nn.functional as F
from torch import nn

from bitcompiler.passes import fold_batchnorm
from bitcompiler.quant.modules import QuantConv2d, quantize_layer
from bitcompiler.quant.schemes import Scheme
from tests.conftest import randomize_bn
from tests.passes.conftest import structure, trace


class Before(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class Expected(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)

    def forward(self, x):
        return F.relu(self.conv(x))


def test_bn_folds_into_float_conv():
    model = randomize_bn(Before())
    x = torch.randn(2, 3, 6, 6)
    gm = fold_batchnorm.run(trace(model))
    assert structure(gm) == structure(trace(Expected()))
    torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-5)


def test_bn_after_quantized_conv_becomes_post_affine():
    model = randomize_bn(Before())
    model.conv = quantize_layer(model.conv, Scheme.parse("binary"), first_or_last=False)
    x = torch.randn(2, 3, 6, 6)
    want = model(x)
    gm = fold_batchnorm.run(trace(model))
    assert [k for op, k in structure(gm) if op == "call_module"] == ["QuantConv2d"]
    layer = gm.get_submodule("conv")
    assert isinstance(layer, QuantConv2d) and layer.post_scale is not None
    torch.testing.assert_close(gm(x), want, rtol=1e-5, atol=1e-5)


def test_bn_with_a_second_user_of_the_conv_is_left_alone():
    class TwoUsers(Before):
        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y

    gm = fold_batchnorm.run(trace(randomize_bn(TwoUsers())))
    assert ("call_module", "BatchNorm2d") in structure(gm)
