"""tile_weights: Before/Expected structure and numbers; the pipeline without it still works."""

import pytest
import torch
from torch import nn

from bitcompiler.methods.tiled import TiledBitConv2d, TiledBitLinear
from bitcompiler.passes import (
    PassError,
    Pipeline,
    fold_scales,
    insert_quantizers,
    lower_bit_ops,
    pack_weights,
    tile_weights,
)
from bitcompiler.quant import numerics as nu
from tests.passes.conftest import ctx, structure, trace

SCHEME = "tiled:p=4,min_weights=1,first_last=quantize"


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(40, 16), nn.ReLU(), nn.Linear(16, 10), nn.ReLU(), nn.Linear(10, 3))


def folded(scheme=SCHEME, x=None):
    c = ctx(scheme, x)
    return fold_scales.run(insert_quantizers.run(trace(model()), c)), c


def test_before_expected():
    x = torch.randn(2, 40)
    before, c = folded(x=x)
    want = before(x)
    codes = before.get_submodule("0").codes.clone()
    assert [k for op, k in structure(before) if op == "call_module"] == [
        "BitLinear",
        "ReLU",
        "BitLinear",
        "ReLU",
        "BitLinear",
    ]
    after = tile_weights.run(before, c)
    # Expected: 40x16 (R=4 rows) and 16x10 (unaligned, q=40) become tiled layers; 10x3 (30 weights) stays
    assert [k for op, k in structure(after) if op == "call_module"] == [
        "TiledBitLinear",
        "ReLU",
        "TiledBitLinear",
        "ReLU",
        "BitLinear",
    ]
    fc1, fc2 = after.get_submodule("0"), after.get_submodule("2")
    assert fc1.row_aligned and fc1.tile.shape == (1, 4, 2) and fc1.scale.shape == (4,)
    assert torch.equal(nu.expand_tile(nu.unpack_tile(fc1.tile, 16, 40, 4), (16, 40)), codes.long())
    assert not fc2.row_aligned and fc2.tile.shape == (2,) and fc2.tile_bits == 40
    assert torch.equal(after(x), want)  # storing the tile changes no number
    assert ("4", "p=4 does not divide its 30 weights: plain binary") in c.notes
    lowered = lower_bit_ops.run(pack_weights.run(after))
    calls = [k for op, k in structure(lowered) if op == "call_function"]
    assert calls.count("tiled_linear.default") == 2 and calls.count("bit_linear.default") == 1
    assert torch.equal(lowered(x), want)


def test_pipeline_without_tile_weights_compiles_tiled_layers_as_binary():
    x = torch.randn(2, 40)
    pipe = Pipeline.default()
    assert pipe.names().index("tile_weights") == pipe.names().index("fold_scales") + 1
    with_tiles = pipe.run(trace(model()), ctx(SCHEME, x))
    without = pipe.without("tile_weights").run(trace(model()), ctx(SCHEME, x))
    assert not any(isinstance(m, TiledBitLinear) for m in without.modules())
    assert torch.equal(with_tiles(x), without(x))


def test_strict_names_the_layer_p_does_not_divide():
    before, c = folded("tiled:p=4,min_weights=1,first_last=quantize")
    c = ctx("tiled:p=4,min_weights=1,first_last=quantize", strict=True)
    with pytest.raises(PassError, match="layer '4': p=4 does not divide its 30 weights"):
        tile_weights.run(before, c)


def test_scale_after_a_merged_affine_stays_per_channel():
    torch.manual_seed(1)
    m = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Linear(16, 2)).eval()
    m[2].running_var.uniform_(0.5, 2)
    x = torch.randn(3, 8)
    c = ctx(SCHEME, x)
    gm = fold_scales.run(insert_quantizers.run(trace(m), c))
    want = gm(x)
    gm = tile_weights.run(gm, c)
    layer = gm.get_submodule("1")
    assert isinstance(layer, TiledBitLinear) and layer.scale.shape == (16,) and layer.n_floats == 16
    assert torch.equal(gm(x), want)


class TiledConvs(nn.Module):
    """conv1 (8 -> 16 filters, p=4: 4 filters stored), conv2 (groups 2: stays expanded), fc."""

    def __init__(self):
        super().__init__()
        self.c0 = nn.Conv2d(1, 8, 3, padding=1)
        self.c1, self.b1 = nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.c2 = nn.Conv2d(16, 16, 3, padding=1, groups=2)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(self.c0(x))))
        return self.fc(self.c2(x).mean((2, 3)))


@pytest.mark.parametrize("target", ["cpu", "cortex-m4"])
def test_row_aligned_conv_becomes_a_tiled_conv(target):
    torch.manual_seed(1)
    m = TiledConvs().eval()
    x = torch.randn(2, 1, 6, 6)
    c = ctx("tiled:p=4,min_weights=1,first_last=keep", x)
    c = type(c)(scheme=c.scheme, strict=c.strict, target=target, example_inputs=c.example_inputs)
    before = fold_scales.run(insert_quantizers.run(trace(m), c))
    want = before(x)
    codes = before.get_submodule("c1").codes.clone()
    after = tile_weights.run(before, c)
    notes = dict(c.notes)
    assert type(after.get_submodule("c2")).__name__ == "BitConv2d"
    assert "groups=2" in notes["c2"] or target != "cpu"
    if target == "cpu":
        c1 = after.get_submodule("c1")
        assert isinstance(c1, TiledBitConv2d) and notes["c1"] == "tiled p=4 (row-aligned)"
        assert c1.tile.shape == (1, 4, 3, 3, 1) and c1.scale.shape[0] in (4, 16)
        assert torch.equal(nu.conv_planes_to_codes(c1.tile, 8, "pm1").repeat(4, 1, 1, 1), codes.long())
        lowered = lower_bit_ops.run(pack_weights.run(after))
        ops = [str(n.target) for n in lowered.graph.nodes if n.op == "call_function"]
        assert "bitc.tiled_conv2d.default" in ops
        torch.testing.assert_close(lowered(x), want, rtol=1e-5, atol=1e-5)
    else:
        assert type(after.get_submodule("c1")).__name__ == "BitConv2d"
        assert "no tiled conv kernel for cortex-m4" in notes["c1"]
    # the same numbers up to float rounding (float-activation convs accumulate in double)
    torch.testing.assert_close(after(x), want, rtol=1e-5, atol=1e-6)
