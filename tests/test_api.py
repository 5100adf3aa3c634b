"""compile() end to end on the four model families and four schemes."""

import pytest
import torch

import bitcompiler as bc
from bitcompiler.quant import numerics
from tests.conftest import MODELS, assert_close, make_model

SCHEMES = ["none", "binary", "binary:act=binary", "uniform:bits=2"]


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("name", sorted(MODELS))
def test_compiled_matches_reference_and_batch_is_dynamic(name, scheme):
    model, (x,) = make_model(name)
    cm = bc.compile(model, (x,), target="cpu", scheme=scheme)
    big = torch.randn(33, *x.shape[1:])
    got, ref = cm(big), cm.reference(big)
    assert_close(got, ref)
    with torch.no_grad():
        float_out = model(big)
    if scheme == "none":
        assert_close(ref, float_out)
        assert cm.report().bits_per_weight == 32.0
    else:
        # the quantized reference really differs from the float model
        assert (ref - float_out).abs().max() > 1e-3
        # bit-planes are packed over input channels, so a depthwise layer (one channel) pads each tap
        # to a word; every other model stores fewer bits than float
        if name != "depthwise":
            assert cm.report().bits_per_weight < 32.0
    assert any("bitc" in str(n.target) for n in cm.graph.graph.nodes) == (scheme != "none")


def test_w1a1_integer_parts_are_bit_exact():
    """The popcount sums behind the compiled output equal the reference's integer sums exactly."""
    torch.manual_seed(0)
    cm = bc.compile(
        torch.nn.Linear(100, 64), (torch.randn(1, 100),), scheme="binary:act=binary,first_last=quantize"
    )
    ((_name, layer),) = [(n, m) for n, m in cm.graph.named_modules() if type(m).__name__ == "BitLinear"]
    x = torch.randn(512, 100)
    got = cm(x)
    acc_ref = numerics.sign(x).double() @ numerics.planes_to_code(layer.planes, 100, "pm1").double().t()
    acc_got = torch.round((got.double() - layer.bias.double()) / layer.scale.double())
    assert torch.equal(acc_got, acc_ref)
    assert_close(got, cm.reference(x))


def test_integer_thresholds_survive_compilation():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(100, 64),
        torch.nn.Linear(64, 64),
        torch.nn.BatchNorm1d(64),
        torch.nn.Linear(64, 64),
        torch.nn.Linear(64, 3),
    ).eval()
    model[2].running_mean.uniform_(-1, 1)
    cm = bc.compile(model, (torch.randn(1, 100),), scheme="binary:act=binary")
    assert cm.graph.get_submodule("1").threshold  # binary layer feeding sign() of a binary layer
    x = torch.randn(512, 100)
    assert_close(cm(x), cm.reference(x))


def test_report_rows_and_totals():
    model, (x,) = make_model("rescnn")
    cm = bc.compile(model, (x,), scheme="binary")
    rep = cm.report()
    names = [r.name for r in rep.layers]
    assert names == ["c1", "c2", "c3", "fc"]
    rows = {r.name: r for r in rep.layers}
    assert rows["c1"].scheme.startswith("uniform:bits=8") and rows["c2"].scheme == "binary"
    # c2: 16x16x3x3 binary weights; 16 input channels would fill half a 32-bit word per tap, so
    # the CPU stores the 2,304 bits as one compact stream (72 words), plus 16 float α
    assert rows["c2"].weight_bytes == 4 * (16 * 16 * 3 * 3 // 32) + 4 * 16
    assert rep.weight_bytes == sum(r.weight_bytes for r in rep.layers)
    assert rep.float_weight_bytes == 4 * sum(p.numel() for n, p in model.named_parameters() if p.dim() > 1)
    table = str(rep)
    assert "c2" in table and "binary" in table and "total" in table
    d = rep.to_dict()
    assert d["weight_bytes"] == rep.weight_bytes and len(d["layers"]) == 4
    assert bc.Report.from_dict(d).to_dict() == d


def test_prepared_model_compiles_with_its_own_quantizers():
    model, (x,) = make_model("mlp")
    prepared = bc.prepare(model, "uniform:bits=3")
    assert type(prepared.fc2).__name__ == "QuantLinear" and prepared.fc2.wq.bits == 3
    assert prepared.fc1.wq.bits == 8  # first layer kept at 8 bits
    cm = bc.compile(prepared, (x,))
    assert [r.scheme for r in cm.report().layers][1] == "uniform:bits=3"
    with torch.no_grad():
        assert_close(cm.reference(x), prepared(x), rtol=1e-4)
    assert_close(cm(x), cm.reference(x))


def test_export_load_round_trip(tmp_path):
    model, (x,) = make_model("depthwise")
    cm = bc.compile(model, (x,), scheme="binary:act=binary")
    cm.export(tmp_path / "m")
    del model
    loaded = bc.load(tmp_path / "m")
    xs = torch.randn(7, *x.shape[1:])
    assert torch.equal(loaded(xs), cm(xs))
    assert_close(loaded.reference(xs), cm.reference(xs))
    assert loaded.report().to_dict() == cm.report().to_dict()
    assert {p.name for p in (tmp_path / "m").iterdir()} >= {
        "model.so",
        "reference.json",
        "reference_weights.pt",
        "meta.json",
    }


@pytest.mark.parametrize("scheme", ["none", "binary:act=binary,first_last=quantize"])
@pytest.mark.parametrize("root", ["linear", "sequential"])
def test_export_load_keeps_float_parameters(tmp_path, scheme, root):
    """A float model's weights stay parameters in the reference bundle (loading checks that:
    ``none`` and a bare ``nn.Linear`` failed to load back before)."""
    layer = torch.nn.Linear(64, 8)
    model = (layer if root == "linear" else torch.nn.Sequential(layer)).eval()
    x = torch.randn(3, 64)
    cm = bc.compile(model, (x[:1],), scheme=scheme)
    loaded = bc.load(cm.export(tmp_path / "m"))
    assert torch.equal(loaded(x), cm(x))
    assert torch.equal(loaded.reference(x), cm.reference(x))


def test_custom_pipeline_is_used():
    calls = []

    @bc.graph_pass(requires={"packed"})
    def record(gm):
        calls.append(sum(1 for _ in gm.graph.nodes))
        return gm

    model, (x,) = make_model("mlp")
    pipe = bc.Pipeline.default("cpu").without("fold_scales").insert_after("pack_weights", record)
    cm = bc.compile(model, (x,), pipeline=pipe)
    assert calls
    assert_close(cm(x), cm.reference(x))


def test_inputs_that_are_slices_or_non_contiguous_work():
    model, (x,) = make_model("mlp")
    cm = bc.compile(model, (x,))
    big = torch.randn(10, *x.shape[1:])
    for view in (big[3:7], big.transpose(2, 3)):
        assert_close(cm(view), cm.reference(view.contiguous()))


def test_w1a1_calls_return_fresh_tensors_at_any_batch():
    """The fast call path: grad-tracking input, odd K (200 bits), batches 1/5/64, results never reused."""
    torch.manual_seed(1)
    cm = bc.compile(
        torch.nn.Linear(200, 24), (torch.randn(1, 200),), scheme="binary:act=binary,first_last=quantize"
    )
    for batch in (1, 5, 64):
        x = torch.randn(batch, 200, requires_grad=True)
        first = cm(x)
        second = cm(-x.detach())  # a second call must not overwrite the first result
        assert isinstance(first, torch.Tensor) and first.shape == (batch, 24)
        assert_close(first, cm.reference(x.detach()))
        assert_close(second, cm.reference(-x.detach()))
