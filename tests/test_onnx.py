"""ONNX in (``bc.from_onnx``, ``bc.compile("m.onnx", ...)``) and out (``cm.export_onnx``).

The ONNX files are exported by torch into ``tmp_path`` at test time; scheme ``none`` is compared
with onnxruntime on the same file, quantized schemes compiled against ``cm.reference``, and the
QDQ and QONNX exports (onnxruntime, the ``qonnx`` package's executor) against ``cm.reference``.
"""

from __future__ import annotations

import importlib.util
import sys
import types
import warnings

import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper
from torch import nn

import bitcompiler as bc
from bitcompiler import errors
from tests.conftest import assert_close, randomize_bn

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxslim")
if importlib.util.find_spec("onnx2torch") is None:  # it imports torchvision: bc.from_onnx imports it
    pytest.skip("onnx2torch is not installed (pip install --no-deps onnx2torch)", allow_module_level=True)


# --------------------------------------------------------------------------- models
class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.c2, self.b2 = nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = F.relu(self.b1(self.c1(x)))
        x = x + F.relu(self.b2(self.c2(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class Depthwise(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.dw, self.bn = nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16)
        self.pw = nn.Conv2d(16, 32, 1)
        self.fc = nn.Linear(32 * 4 * 4, 10)

    def forward(self, x):
        x = F.relu6(self.bn(self.dw(F.relu6(self.stem(x)))))
        return self.fc(F.avg_pool2d(F.relu6(self.pw(x)), 1).flatten(1))


class Concat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 8, 1)
        self.mix = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = torch.cat([F.relu(self.a(x)), F.relu(self.b(x))], dim=1)
        return self.fc(F.max_pool2d(F.relu(self.mix(x)), 8).flatten(1))


class NormGelu(nn.Module):
    """Tokens (batch, 8, 32): LayerNorm + GELU MLP with a residual."""

    def __init__(self) -> None:
        super().__init__()
        self.norm, self.up, self.down = nn.LayerNorm(32), nn.Linear(32, 64), nn.Linear(64, 32)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        x = x + self.down(F.gelu(self.up(self.norm(x))))
        return self.head(x.mean(1))


class Mixer(nn.Module):
    """One MLP-Mixer block: token mixing across the 8 patches, channel mixing across 32 features."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, 32, 4, stride=4)
        self.n1, self.t1, self.t2 = nn.LayerNorm(32), nn.Linear(4, 16), nn.Linear(16, 4)
        self.n2, self.c1, self.c2 = nn.LayerNorm(32), nn.Linear(32, 64), nn.Linear(64, 32)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)  # (batch, 4 patches, 32)
        x = x + self.t2(F.gelu(self.t1(self.n1(x).transpose(1, 2)))).transpose(1, 2)
        x = x + self.c2(F.gelu(self.c1(self.n2(x))))
        return self.head(x.mean(1))


class ComputedWeights(nn.Module):
    """Weights computed in forward (a reshape and transpose of parameters, a constant bias)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(16 * 3 * 9) * 0.2)
        self.v = nn.Parameter(torch.randn(10, 16) * 0.3)

    def forward(self, x):
        w = self.w.reshape(16, 3, 3, 3)
        bias = torch.full((16,), 0.05) * torch.arange(16.0)
        x = F.relu(F.conv2d(x, w, bias, padding=1))
        return F.linear(F.adaptive_avg_pool2d(x, 1).flatten(1), self.v.t().t())


IMAGE, TOKENS = (3, 8, 8), (8, 32)
MODELS = {
    "residual": (Residual, IMAGE, 17),
    "depthwise": (Depthwise, IMAGE, 17),
    "concat": (Concat, IMAGE, 17),
    "layernorm-gelu": (NormGelu, TOKENS, 17),
    "mlp-mixer": (Mixer, IMAGE, 17),
    "opset9": (Residual, IMAGE, 9),
    "computed-weights": (ComputedWeights, IMAGE, 17),
}


def export(name: str, tmp_path) -> tuple[str, torch.Tensor]:
    """``name``'s model exported by torch to ``tmp_path`` (batch dynamic), and an example input."""
    cls, shape, opset = MODELS[name]
    torch.manual_seed(0)
    model = randomize_bn(cls().eval())
    x = torch.randn(1, *shape)
    path = str(tmp_path / f"{name}.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), path, dynamo=False, opset_version=opset, input_names=["x"],
                          dynamic_axes={"x": {0: "batch"}}, do_constant_folding=name != "computed-weights")  # fmt: skip
    return path, x


def run_ort(path, x: torch.Tensor) -> torch.Tensor:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])


# --------------------------------------------------------------------------- ONNX in
@pytest.mark.parametrize("name", list(MODELS))
def test_none_matches_onnxruntime(name, tmp_path):
    path, x = export(name, tmp_path)
    cm = bc.compile(path, (x,), scheme="none")
    xs = torch.randn(3, *x.shape[1:])
    assert_close(cm(xs), run_ort(path, xs), rtol=1e-4)


@pytest.mark.parametrize(
    "name, scheme",
    [("residual", "binary:act=binary"), ("depthwise", "uniform:bits=2,act=8"), ("mlp-mixer", "binary")],
)
def test_quantized_matches_reference(name, scheme, tmp_path):
    path, x = export(name, tmp_path)
    cm = bc.compile(path, (x,), scheme=scheme)
    assert cm.report().bits_per_weight < 32
    xs = torch.randn(3, *x.shape[1:])
    assert_close(cm(xs), cm.reference(xs))


def test_constant_subgraph_weights_are_folded(tmp_path):
    path, x = export("computed-weights", tmp_path)
    ops = {n.op_type for n in onnx.load(path).graph.node}
    assert {"Reshape", "Transpose"} & ops, ops  # the file computes its weights
    cm = bc.compile(path, (x,), scheme="binary")
    convs = [r for r in cm.report().layers if r.op == "conv2d"]
    assert convs and convs[0].bits_per_weight <= 9, cm.report()  # quantized: its weight became an initializer
    xs = torch.randn(2, *x.shape[1:])
    assert_close(cm(xs), cm.reference(xs))


def test_from_onnx_gives_an_eval_module(tmp_path):
    path, x = export("residual", tmp_path)
    net = bc.from_onnx(path)
    assert isinstance(net, nn.Module) and not net.training
    assert_close(net(x).detach(), run_ort(path, x), rtol=1e-4)


def _model_with(node: onnx.NodeProto, tmp_path) -> str:
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("my.ops", 1)]
    )
    path = str(tmp_path / "m.onnx")
    onnx.save(model, path)
    return path


def test_unsupported_op_names_op_and_node(tmp_path):
    path = _model_with(
        helper.make_node("Frobnicate", ["x"], ["y"], name="head/frob", domain="my.ops"), tmp_path
    )
    with pytest.raises(
        errors.UnsupportedOnnxOp, match=r"node 'head/frob' is a Frobnicate \(domain 'my.ops'\)"
    ):
        bc.compile(path, (torch.randn(1, 4),))


def test_refused_attributes_name_the_node(tmp_path):
    node = helper.make_node("Reshape", ["x", "shape"], ["y"], name="body/reshape", allowzero=1)
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [helper.make_tensor("shape", TensorProto.INT64, [2], [2, 2])],
    )
    path = str(tmp_path / "r.onnx")
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    with pytest.raises(errors.UnsupportedOnnxOp, match=r"node 'body/reshape' is a Reshape .*allowzero=1"):
        bc.from_onnx(path)


def test_nms_is_refused_without_torchvision(tmp_path):
    node = helper.make_node("NonMaxSuppression", ["x", "x"], ["y"], name="post/nms")
    path = _model_with(node, tmp_path)
    with pytest.raises(errors.UnsupportedOnnxOp, match="node 'post/nms' is a NonMaxSuppression"):
        bc.from_onnx(path)


def test_torchvision_standin_does_not_leak(tmp_path):
    from bitcompiler.onnx.standin import onnx2torch, torchvision_loads

    onnx2torch()
    if not torchvision_loads():
        assert "torchvision" not in sys.modules and "torchvision.ops" not in sys.modules


def test_another_torchvision_standin_is_not_taken_for_torchvision(monkeypatch):
    from bitcompiler.onnx.standin import torchvision_loads

    monkeypatch.setitem(sys.modules, "torchvision", types.ModuleType("torchvision"))  # as bench/corpus.py
    assert not torchvision_loads()


def test_not_an_onnx_file(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00not protobuf\xff" * 3)
    with pytest.raises(errors.ModelError, match="bad.onnx: not a readable ONNX model"):
        bc.from_onnx(bad)


# --------------------------------------------------------------------------- ONNX out
class Net(nn.Module):
    """Conv + BatchNorm + hardtanh (integer thresholds under act=binary), avg pool, two dense layers."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32)
        self.c2, self.b2 = nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32)
        self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.fc1, self.fc2 = nn.Linear(32 * 4 * 4, 64), nn.Linear(64, 10)

    def forward(self, x):
        x = F.hardtanh(self.b1(self.c1(x)))
        x = F.hardtanh(self.b2(self.c2(x)))
        x = F.avg_pool2d(self.dw(x), 2).flatten(1)
        return self.fc2(F.relu(self.fc1(x)))


def run_qonnx(path, x: torch.Tensor) -> torch.Tensor:
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.core.onnx_exec import execute_onnx
    from qonnx.transformation.infer_shapes import InferShapes

    model = ModelWrapper(str(path)).transform(InferShapes())
    out = execute_onnx(model, {model.graph.input[0].name: x.numpy()})
    return torch.from_numpy(out[model.graph.output[0].name])


SCHEMES = {  # scheme: the quantizer nodes QONNX must hold
    "binary:act=binary": {"BipolarQuant"},
    "uniform:bits=2,act=8": {"Quant"},
    "bitnet": {"Quant"},
    "tiled:p=4,min_weights=1024": {"BipolarQuant"},  # c2 and fc1 tiled
}


@pytest.fixture(scope="module", params=list(SCHEMES))
def compiled(request):
    torch.manual_seed(0)
    model = randomize_bn(Net().eval())
    return request.param, bc.compile(model, (torch.randn(1, 3, 8, 8),), scheme=request.param)


def test_qdq_runs_in_onnxruntime(compiled, tmp_path):
    cm = compiled[1]
    path = cm.export_onnx(tmp_path / "m.onnx", format="qdq")
    kinds = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert "DequantizeLinear" in kinds and "bitc_export" not in str(onnx.load(str(path)).opset_import)
    if "tiled" in compiled[0]:
        assert {"tiled_conv2d", "tiled_linear"} <= {bc.ops.op_name(n) for n in cm.graph.graph.nodes}
    x = torch.randn(3, 3, 8, 8)  # the batch stays dynamic
    assert_close(run_ort(path, x), cm.reference(x), rtol=1e-4)


def test_qonnx_runs_in_qonnx_executor(compiled, tmp_path):
    pytest.importorskip("qonnx")
    scheme, cm = compiled
    path = cm.export_onnx(tmp_path / "m.onnx", format="qonnx")
    kinds = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert SCHEMES[scheme] <= kinds, kinds
    x = torch.randn(1, 3, 8, 8)
    assert_close(run_qonnx(path, x), cm.reference(x), rtol=1e-4)


def test_int8_tokens_export(tmp_path):
    """Per-token int8 activations of a dense layer on 3-D input, both formats."""
    pytest.importorskip("qonnx")
    torch.manual_seed(0)
    cm = bc.compile(NormGelu().eval(), (torch.randn(1, *TOKENS),), scheme="uniform:bits=3,act=8")
    x = torch.randn(1, *TOKENS)
    xs = torch.randn(2, *TOKENS)  # rows from two samples, 8 tokens each
    assert_close(run_ort(cm.export_onnx(tmp_path / "q.onnx"), xs), cm.reference(xs), rtol=1e-4)
    assert_close(
        run_qonnx(cm.export_onnx(tmp_path / "r.onnx", format="qonnx"), x), cm.reference(x), rtol=1e-4
    )


def test_unknown_format(compiled, tmp_path):
    with pytest.raises(
        errors.UnsupportedExport, match="format='tflite': ONNX export writes 'qdq' or 'qonnx'"
    ):
        compiled[1].export_onnx(tmp_path / "m.onnx", format="tflite")


def test_unwritable_path(compiled, tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(errors.ExportError, match="cannot write the ONNX file"):
        compiled[1].export_onnx(tmp_path / "file" / "m.onnx")
    assert not list(tmp_path.glob("**/*.partial"))


def test_imported_model_round_trips(tmp_path):
    """ONNX in, quantize, ONNX out: the QDQ file agrees with the reference."""
    path, x = export("concat", tmp_path)
    cm = bc.compile(path, (x,), scheme="uniform:bits=4,act=8")
    xs = torch.randn(2, *x.shape[1:])
    assert_close(run_ort(cm.export_onnx(tmp_path / "out.onnx"), xs), cm.reference(xs), rtol=1e-4)
    loaded = bc.load(cm.export(tmp_path / "bundle"))  # a loaded bundle exports the same
    assert_close(run_ort(loaded.export_onnx(tmp_path / "again.onnx"), xs), cm.reference(xs), rtol=1e-4)
