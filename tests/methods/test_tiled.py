"""tiled scheme: tile construction, straight-through gradient, fallbacks, accounting, compile()."""

import pytest
import torch
from torch import nn

import bitcompiler as bc
from bitcompiler.capture import capture
from bitcompiler.methods.tiled import TiledBitConv2d, TiledBitLinear, TiledWeight, weight_storage
from bitcompiler.passes import PassContext, Pipeline
from bitcompiler.quant import numerics as nu
from bitcompiler.quant.schemes import Scheme
from bitcompiler.report import build_report
from tests.backends.test_lower import kernels_called
from tests.conftest import assert_close


def test_row_aligned_tile_by_hand():
    w = torch.tensor([[1.0, 2.0], [-3.0, 1.0], [0.5, -4.0], [2.0, 2.0]])
    q, tile, alpha = nu.tile_weight(w, 2)
    # chunks [1, 2, -3, 1] and [0.5, -4, 2, 2] sum to [1.5, -2, -1, 3]
    assert tile.tolist() == [1, -1, -1, 1]
    assert q.tolist() == [[1, -1], [-1, 1], [1, -1], [-1, 1]]
    assert alpha.tolist() == [1.75, 2.125]  # mean |W| of each chunk (= its 2 rows)
    assert nu.row_aligned(4, 2) and nu.pack_tile(tile, 4, 2, 2).shape == (1, 2, 1)


def test_unaligned_tile_by_hand():
    w = torch.tensor([[1.0, -2.0], [3.0, -1.0], [2.0, 1.0]])  # N=3, K=2, p=2: q=3
    _q, tile, alpha = nu.tile_weight(w, 2)
    assert tile.tolist() == [1, 1, 1]  # chunks [1, -2, 3] + [-1, 2, 1] = [0, 0, 4]; sign(0) = +1
    assert nu.chunk_of_channel(3, 2).tolist() == [0, 0, 1]  # a channel keeps its first element's chunk
    assert alpha.tolist() == [1.75, 1.5]
    words = nu.pack_tile(tile, 3, 2, 2)
    assert words.shape == (1,) and torch.equal(nu.unpack_tile(words, 3, 2, 2), tile)


def test_straight_through_gradient_reaches_every_summed_weight():
    torch.manual_seed(0)
    wq = TiledWeight(p=2, min_weights=1)
    w = torch.randn(4, 3, requires_grad=True)
    g = torch.randn(4, 3)
    (wq(w) * g).sum().backward()
    alpha = nu.tile_alpha(w, 2)
    per_pos = alpha[0] * g[:2].reshape(-1) + alpha[1] * g[2:].reshape(-1)  # dL/dtile, through sign
    assert torch.allclose(w.grad, per_pos.repeat(2).reshape(4, 3))


def test_learned_alpha_starts_at_chunk_means_and_trains():
    torch.manual_seed(1)
    wq = TiledWeight(p=4, min_weights=1, alpha="learned")
    w = torch.randn(8, 5)
    wq(w).sum().backward()
    assert torch.allclose(wq.alpha.detach(), nu.tile_alpha(w, 4))
    # dL/dα_k = Σ of the tile over chunk k's channels, scaled by 1/√q (q = 40/4) so SGD stays stable
    rows = nu.expand_tile(nu.sign(nu.tile_sum(w, 4)), w.shape).sum(1)
    want = torch.zeros(4).index_add_(0, nu.chunk_of_channel(8, 4), rows) / 10**0.5
    assert torch.allclose(wq.alpha.grad, want)


def test_small_or_indivisible_layers_stay_binary():
    wq = TiledWeight(p=4, min_weights=100)
    assert wq.tiles_for(torch.randn(8, 10)) == 1  # 80 < min_weights
    assert wq.tiles_for(torch.randn(7, 15)) == 1  # 105 weights: 4 does not divide
    assert wq.tiles_for(torch.randn(8, 16)) == 4
    assert wq.codes(torch.randn(7, 15)).tiles == 1


def test_mnist_mlp_accounting():
    net = bc.prepare(
        nn.Sequential(nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 10)), "tiled:p=4,first_last=quantize"
    )
    rows = {n: b for n, _, b in weight_storage(net)}
    assert rows["0"] == 784 * 128 // 4 + 4 * 32  # one tile + 4 α
    assert rows["2"] == 128 * 10 + 10 * 32  # too small: binary + per-channel α
    assert 3.3e3 < sum(rows.values()) / 8 < 3.4e3  # paper: ≈ 3.3 KB
    x = torch.randn(1, 784)
    ctx = PassContext(scheme=Scheme("none"), example_inputs=(x,))
    gm = Pipeline.default().run(capture(net, (x,)), ctx)
    fc1 = build_report(gm, "cpu", "tiled", ctx.notes).layers[0]
    assert "tile 25088 bits (row-aligned R=32) + 4 scales" in fc1.note
    assert fc1.weight_bytes == 4 * 32 * 25 + 4 * 4  # 32 distinct rows of 25 words, 4 α


def test_compile_tiled_layers_matches_reference_and_counts_the_tile():
    torch.manual_seed(2)
    # fc1: 100x16 at p=4 is row-aligned (R=4); fc2: 16x10 at p=4 is unaligned (q=40)
    model = nn.Sequential(nn.Linear(100, 16), nn.Hardtanh(), nn.Linear(16, 10))
    x = torch.randn(3, 100)
    x[0, :4] = 0.0
    cm = bc.compile(model, (x,), scheme="tiled:p=4,min_weights=1,act=binary,first_last=quantize")
    assert sum(isinstance(m, TiledBitLinear) for m in cm.graph.modules()) == 2  # they hold the tiles
    calls = [n for n in cm.graph.graph.nodes if "tiled_linear" in str(n.target)]
    assert len(calls) == 2
    assert_close(cm(x), cm.reference(x))
    rows = cm.report().layers
    assert rows[0].weight_bytes == nu.packed_weight_bytes(4 * 4, 4)  # 4 rows of 4 words + 4 α
    assert rows[1].weight_bytes == nu.packed_weight_bytes(2, 4)  # 40 bits -> 2 words + 4 α
    assert "row-aligned R=4" in rows[0].note and "unaligned" in rows[1].note


def test_compile_fuses_the_two_stages_of_a_binary_row_aligned_layer():
    torch.manual_seed(3)
    # fc1: 512x32 at p=4, binary activations, rows of 512 bits: one fused kernel (threshold: it
    # feeds fc2's sign); fc2: 32x16 at p=4 has short rows and keeps the two stages
    model = nn.Sequential(nn.Linear(512, 32), nn.BatchNorm1d(32), nn.Hardtanh(), nn.Linear(32, 16))
    model[1].running_mean.uniform_(-1, 1)
    model.eval()
    x = torch.randn(3, 512)
    cm = bc.compile(model, (x,), scheme="tiled:p=4,min_weights=1,act=binary,first_last=quantize")
    calls = kernels_called(cm, "bitc_tiled")
    assert calls == [
        "bitc_tiled_binary_512x32_p4_thr",
        "bitc_tiled_binary_32x16_p4_rows",
        "bitc_tiled_binary_32x16_p4_expand",
    ]
    assert_close(cm(x), cm.reference(x))


@pytest.mark.parametrize("final_bn", [False, True])
def test_compile_tiled_rows_in_lanes(final_bn):
    """R = N/p a multiple of 32 and K of 128: the fused kernel is the rows-in-lanes one (threshold
    and affine epilogues, with and without a batch norm after the last layer)."""
    torch.manual_seed(5)
    layers = [nn.Linear(256, 256), nn.BatchNorm1d(256), nn.Hardtanh(), nn.Linear(256, 128)]
    model = nn.Sequential(*layers, *([nn.BatchNorm1d(128)] if final_bn else []))
    for bn in (m for m in model if isinstance(m, nn.BatchNorm1d)):
        bn.running_mean.uniform_(-1, 1)
        bn.weight.data.uniform_(0.5, 2)
    model.eval()
    x = torch.randn(1, 256)
    cm = bc.compile(model, (x,), scheme="tiled:p=4,min_weights=1,act=binary,first_last=quantize")
    calls = kernels_called(cm, "bitc_tiled")
    assert calls == ["bitc_tiled_binary_256x256_p4_thr_lanes", "bitc_tiled_binary_256x128_p4_lanes"]
    for batch in (1, 3):
        xb = torch.randn(batch, 256)
        assert_close(cm(xb), cm.reference(xb))


@pytest.mark.parametrize("act", ["binary", "float"])
def test_compile_tiled_convs(act):
    torch.manual_seed(4)
    # c1: 16 -> 32 filters at p=4 (8 stored, computed once); c2: 32 -> 32 at p=4 (8 stored)
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.Hardtanh(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.Hardtanh(),
        nn.Conv2d(32, 32, 3, padding=1, stride=2),
        nn.Flatten(),
        nn.Linear(32 * 16, 10),
    ).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 1, 8, 8)
    cm = bc.compile(model, (x,), scheme=f"tiled:p=4,min_weights=1,act={act},first_last=keep")
    assert sum(isinstance(m, TiledBitConv2d) for m in cm.graph.modules()) == 2
    calls = kernels_called(cm, "bitc_tiled_conv2d")
    assert [c.split("_p4")[0].split("_")[-2:] + [c.rsplit("_", 1)[-1]] for c in calls] == [
        ["16x32", "3x3", "rows"],
        ["16x32", "3x3", "expand"],
        ["32x32", "3x3", "rows"],
        ["32x32", "3x3", "expand"],
    ]
    assert_close(cm(x), cm.reference(x))
    row = {r.name: r for r in cm.report().layers}["3"]
    # 8 stored filters x 9 taps x one word of 16 channels, plus the p=4 scales: nothing else
    assert row.weight_bytes == nu.packed_weight_bytes(8 * 9, 4) and row.op == "conv2d"
    assert "row-aligned R=8" in row.note and row.bits_per_weight == 8 * row.weight_bytes / (32 * 16 * 9)
