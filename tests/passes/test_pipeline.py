import pytest
import torch
from torch import nn

import bitcompiler as bc
from bitcompiler.capture import symbolic_trace
from bitcompiler.passes import Pass, PassContext, PassError, Pipeline, PipelineError, graph_pass
from bitcompiler.quant.schemes import Scheme

DEFAULT = [
    "canonicalize",
    "fold_batchnorm",
    "insert_quantizers",
    "fold_scales",
    "tile_weights",
    "pack_weights",
    "lower_bit_ops",
]


def test_default_pipeline_names_and_customization():
    pipe = Pipeline.default("cpu")
    assert pipe.names() == DEFAULT
    assert pipe.without("fold_scales").names() == [n for n in DEFAULT if n != "fold_scales"]

    @graph_pass(requires={"packed"})
    def count(gm):
        return gm

    assert isinstance(count, Pass) and count.name == "count"
    assert pipe.insert_after("pack_weights", count).names()[6] == "count"
    assert pipe.insert_before("pack_weights", graph_pass(name="early")(lambda gm: gm)).names()[5] == "early"
    with pytest.raises(KeyError, match="no pass named 'fold'"):
        pipe.without("fold")


def test_order_is_checked_from_requires_and_ensures():
    pipe = Pipeline.default("cpu")
    canon, bn, insert, _fold, _tile, pack, lower = pipe.passes
    with pytest.raises(PipelineError) as e:
        Pipeline([canon, bn, pack, insert, lower])
    assert "'pack_weights' requires ['quantized'] but runs before ['insert_quantizers']" in str(e.value)
    assert "a valid order: ['canonicalize', 'fold_batchnorm', 'insert_quantizers', 'pack_weights'" in str(
        e.value
    )
    with pytest.raises(PipelineError, match="which no earlier pass ensures"):
        pipe.without("insert_quantizers")
    late = graph_pass(requires={"packed"})(lambda gm: gm)
    with pytest.raises(PipelineError, match="a valid order"):
        pipe.insert_before("canonicalize", late)


def test_pipeline_without_fold_scales_still_compiles_the_same_layers():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, 2))
    x = torch.randn(3, 8)
    ctx = PassContext(scheme=Scheme.parse("binary"), example_inputs=(x,))
    full = Pipeline.default().run(symbolic_trace(model), ctx)
    short = Pipeline.default().without("fold_scales").run(symbolic_trace(model), ctx)
    assert "fold_scales" not in Pipeline.default().without("fold_scales").names()
    assert torch.equal(full(x), short(x))  # no BN or affine to merge here: identical numbers


def test_user_pass_runs_and_failures_name_pass_node_and_dump(tmp_path, monkeypatch):
    seen = []

    @graph_pass(name="spy", requires={"bitc_ops"})
    def spy(gm, ctx):
        seen.append((len(gm.graph.nodes), str(ctx.scheme)))
        return gm

    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    x = torch.randn(1, 4)
    Pipeline.default().insert_after("lower_bit_ops", spy).run(
        symbolic_trace(model), PassContext(example_inputs=(x,))
    )
    assert seen and seen[0][1] == "binary"

    class Boom(RuntimeError):
        node = "linear_1"

    @graph_pass(name="breaks", requires={"packed"})
    def breaks(gm):
        raise Boom("bad rewrite")

    monkeypatch.setenv("BITC_DUMP", str(tmp_path))
    with pytest.raises(PassError) as e:
        Pipeline.default().insert_after("pack_weights", breaks).run(symbolic_trace(model), PassContext())
    msg = str(e.value)
    assert "pass 'breaks' failed at node 'linear_1'" in msg and "bad rewrite" in msg
    assert str(tmp_path / "007_breaks.txt") in msg
    dumps = sorted(p.name for p in tmp_path.iterdir())
    assert dumps[:3] == ["000_captured.txt", "001_canonicalize.txt", "002_fold_batchnorm.txt"]
    assert "bit_linear" not in (tmp_path / "006_pack_weights.txt").read_text().split("# modules")[0]


def test_verify_catches_a_pass_that_breaks_the_graph():
    @graph_pass(name="nan", requires={"packed"})
    def make_nan(gm):
        gm.get_submodule("0").scale.fill_(float("nan"))
        return gm

    x = torch.randn(2, 4)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    with pytest.raises(PassError, match="pass 'nan' failed: graph produces non-finite values"):
        Pipeline.default().insert_after("pack_weights", make_nan).run(
            symbolic_trace(model), PassContext(example_inputs=(x,))
        )


def test_public_names():
    assert bc.Pipeline is Pipeline and bc.graph_pass is graph_pass
