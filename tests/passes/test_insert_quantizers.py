import pytest
import torch
from torch import nn

from bitcompiler.passes import PassError, insert_quantizers
from bitcompiler.quant.modules import AffineWeight, BinaryWeight, QuantConv2d
from tests.passes.conftest import ctx, structure, trace


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))


def test_linear_layers_become_quantized_with_first_last_kept_at_8_bits():
    model, x = mlp(), torch.randn(4, 8)
    gm = insert_quantizers.run(trace(model), ctx("binary:act=binary", x))
    assert [k for op, k in structure(gm) if op == "call_module"] == ["QuantLinear", "ReLU"] * 2 + [
        "QuantLinear"
    ]
    first, mid, last = gm.get_submodule("0"), gm.get_submodule("2"), gm.get_submodule("4")
    assert isinstance(first.wq, AffineWeight) and first.wq.bits == 8 and first.act == "int8"
    assert isinstance(mid.wq, BinaryWeight) and mid.act == "binary"
    assert isinstance(last.wq, AffineWeight) and last.act == "int8"
    # numerics: the middle layer's weights are ±α per output channel
    w = mid.wq(mid.weight)
    assert torch.equal(w.abs(), mid.weight.abs().mean(1, keepdim=True).expand_as(w))
    assert not torch.equal(gm(x), model(x))


def test_first_last_quantize_binarizes_every_layer():
    gm = insert_quantizers.run(trace(mlp()), ctx("binary:first_last=quantize"))
    assert all(isinstance(gm.get_submodule(n).wq, BinaryWeight) for n in ("0", "2", "4"))


def test_scheme_none_changes_nothing():
    model = mlp()
    gm = insert_quantizers.run(trace(model), ctx("none"))
    assert structure(gm) == structure(trace(model))


def test_layer_without_bit_lowering_stays_float_or_fails_in_strict_mode():
    model = nn.Sequential(nn.Conv1d(2, 4, 3), nn.Flatten(), nn.Linear(8, 4), nn.Linear(4, 2))
    c = ctx("binary")
    gm = insert_quantizers.run(trace(model), c)
    assert isinstance(gm.get_submodule("0"), nn.Conv1d)
    assert c.notes and c.notes[0][0] == "0" and "Conv1d" in c.notes[0][1]
    with pytest.raises(PassError, match=r"layer '0' \(Conv1d\)"):
        insert_quantizers.run(trace(model), ctx("binary", strict=True))


def test_conv_gets_quantized_conv():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Conv2d(4, 4, 3, groups=2), nn.Conv2d(4, 2, 1))
    gm = insert_quantizers.run(trace(model), ctx("uniform:bits=2"))
    mid = gm.get_submodule("1")
    assert isinstance(mid, QuantConv2d) and mid.groups == 2 and mid.wq.bits == 2
    assert isinstance(gm.get_submodule("0"), QuantConv2d) and gm.get_submodule("0").wq.bits == 8
