"""The bad-input matrix of docs/errors.md: one test per row (ids are the row numbers); rows 1 to 49
(the model, schemes, calls) here, 50 to 71 (files, environment) in test_error_matrix_files.py.

Every bad input ends in a clear bitcompiler error naming what to fix, or in a documented
behaviour; never a crash, a hang, or a message from TVM's or torch's internals.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bitcompiler as bc
from bitcompiler import errors
from tests.test_capture import DataDependent

INTERNALS = ("tvm.", "Traceback", "TVMError", "InternalError", "torch._", 'File "')
X = torch.randn(1, 8)


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))


def raises(kind: type[BaseException], needle: str, fn, *args, **kwargs) -> BaseException:
    """``fn`` raises ``kind`` (a BitcError), its message contains ``needle`` and no internals."""
    with pytest.raises(kind) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert isinstance(info.value, errors.BitcError), type(info.value)
    assert needle in msg, msg
    assert not any(s in msg for s in INTERNALS), msg
    return info.value


@pytest.fixture(scope="module")
def cm():
    return bc.compile(mlp(), (X,))


# ----------------------------------------------------------------------------- the model
def test_01_untraceable_control_flow():
    raises(bc.CaptureError, "if x.sum() > 0", bc.compile, DataDependent(), (torch.randn(1, 4),))


def test_02_03_op_without_lowering_lenient_and_strict():
    model = nn.Sequential(nn.ConvTranspose1d(2, 2, 3), nn.Flatten(), nn.Linear(12, 4), nn.Linear(4, 2))
    x = torch.randn(1, 2, 4)
    rows = {r.name: r for r in bc.compile(model, (x,)).report().layers}
    assert rows["0"].scheme == "float" and "ConvTranspose1d has no bit lowering" in rows["0"].note
    raises(bc.PassError, "layer '0' (ConvTranspose1d)", bc.compile, model, (x,), strict=True)


@pytest.mark.parametrize("model", [nn.Sequential(), nn.Identity()], ids=["04-empty", "05-identity"])
def test_04_05_empty_model_is_the_identity(model):
    compiled = bc.compile(model, (X,))
    x = torch.randn(3, 8)
    assert torch.equal(compiled(x), x) and compiled.report().layers == []


def test_06_parameters_on_the_meta_device():
    raises(bc.ModelError, "parameter '0.weight' is on the meta device", bc.compile, mlp().to("meta"), (X,))


def test_07_half_precision_parameters_are_converted_with_a_warning():
    with pytest.warns(UserWarning, match="float16 weights: compiling a float32 copy"):
        compiled = bc.compile(mlp().half(), (X,))
    x = torch.randn(2, 8)
    torch.testing.assert_close(compiled(x), compiled.reference(x))


class InPlace(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x):
        y = self.a(x)
        y.add_(1)
        return self.b(torch.relu_(y))


@pytest.mark.parametrize(
    "model",
    [InPlace(), nn.Sequential(nn.Linear(8, 8), nn.ReLU(inplace=True), nn.Linear(8, 4))],
    ids=["08-add_", "09-relu-inplace"],
)
def test_08_09_in_place_ops_compile(model):
    compiled = bc.compile(model, (X,))
    x = torch.randn(2, 8)
    torch.testing.assert_close(compiled(x), compiled.reference(x))


class Structured(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind, self.a = kind, nn.Linear(8, 8)

    def forward(self, x):
        y = self.a(x)
        if self.kind == "dict":
            return {"logits": y, "aux": y * 2}
        if self.kind == "nested":
            return y, (y + 1, [y * 2])
        return y, 3  # a Python number among the outputs


@pytest.mark.parametrize("kind", ["dict", "nested"], ids=["10-dict", "11-nested-tuple"])
def test_10_11_dict_and_nested_outputs_keep_their_structure(kind, tmp_path):
    compiled = bc.compile(Structured(kind), (X,))
    x = torch.randn(2, 8)
    got, ref = compiled(x), compiled.reference(x)
    torch.testing.assert_close(got, ref)  # same structure, same values
    loaded = bc.load(compiled.export(tmp_path / "m"))
    torch.testing.assert_close(loaded(x), ref)


def test_12_non_tensor_output():
    raises(bc.ModelError, "returns int besides tensors", bc.compile, Structured("number"), (X,))


class FixedBatch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(x.view(1, -1))


def test_13_forward_fixes_the_batch():
    with pytest.warns(UserWarning, match="compiled with a fixed batch of 1"):
        compiled = bc.compile(FixedBatch(), (X,))
    assert compiled.report().extra["batch"].startswith("fixed at 1")
    raises(bc.InputError, "fixed batch of 1", compiled, torch.randn(2, 8))


@pytest.mark.parametrize("shape", [(1, 0), (0, 8)], ids=["14-zero-feature", "15-zero-batch-example"])
def test_14_15_zero_size_example(shape):
    raises(bc.InputError, "0-size dimension", bc.compile, mlp(), (torch.randn(shape),))


def test_16_integer_inputs_embedding():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 8), nn.Flatten(), nn.Linear(24, 4))
    compiled = bc.compile(model, (torch.randint(0, 10, (1, 3)),))
    ids = torch.randint(0, 10, (5, 3))
    torch.testing.assert_close(compiled(ids), compiled.reference(ids))
    raises(bc.InputError, "convert with .to(torch.int64)", compiled, ids.float())


@pytest.mark.parametrize(
    "model, inputs, kind, needle",
    [
        (42, (X,), errors.ModelTypeError, "must be a torch.nn.Module, got int"),
        ("model.onnx", (X,), bc.ModelError, "model.onnx: no such ONNX file"),
        (None, ([1.0, 2.0],), errors.InputTypeError, "example_inputs[0] is a list"),
        (None, (), errors.InputTypeError, "example_inputs must be a tuple of tensors"),
        (None, (torch.tensor(1.0),), bc.InputError, "is a scalar"),
    ],
    ids=["17-not-a-module", "18-missing-onnx-path", "19-list-example", "20-no-example", "21-scalar-example"],
)
def test_17_21_what_compile_is_given(model, inputs, kind, needle):
    model = mlp() if model is None else model
    raises(kind, needle, bc.compile, model, inputs)


def test_22_unknown_target():
    raises(bc.TargetError, "unknown target 'tpu'; valid targets: cpu", bc.compile, mlp(), (X,), target="tpu")


# ----------------------------------------------------------------------------- schemes
@pytest.mark.parametrize(
    "scheme, needle",
    [
        ("ternary", "unknown scheme 'ternary'; valid names: none, binary"),
        ("binary:foo=1", "scheme 'binary' has no key 'foo'"),
        ("uniform:bits=0", "bits='0' is not valid; use an integer 1..8"),
        ("uniform:bits=9", "bits='9' is not valid; use an integer 1..8"),
        ("binary:act=8,act=binary", "gives act=8, binary: give each key once"),
        ("bitnet:min_bits=6,max_bits=4", "min_bits <= init_bits <= max_bits"),
        ("binary:act", "malformed scheme option 'act'"),
        ("", "a scheme is a string like"),
        ("tiled:p=0", "p='0' is not valid; use a positive integer"),
    ],
    ids=[
        f"{i}-{s}"
        for i, s in enumerate(
            [
                "unknown-name",
                "unknown-key",
                "bits0",
                "bits9",
                "repeated-key",
                "conflicting",
                "malformed",
                "empty",
                "p0",
            ],
            23,
        )
    ],
)
def test_23_31_bad_schemes(scheme, needle):
    raises(bc.SchemeError, needle, bc.compile, mlp(), (X,), scheme=scheme)


TILED = "tiled:p={},min_weights=1,first_last=quantize"


def test_32_p_not_a_power_of_two_tiles_when_it_divides():
    compiled = bc.compile(mlp(), (X,), scheme=TILED.format(3) + ",act=binary")
    notes = [r.note for r in compiled.report().layers]
    assert any("tiled p=3" in n for n in notes) or any("does not divide" in n for n in notes), notes
    x = torch.randn(2, 8)
    torch.testing.assert_close(compiled(x), compiled.reference(x))


@pytest.mark.parametrize("p", [5, 4096], ids=["33-p-not-dividing", "34-p-larger-than-layer"])
def test_33_34_untileable_layer_reported_or_strict_error(p):
    compiled = bc.compile(mlp(), (X,), scheme=TILED.format(p))
    assert any(f"p={p} does not divide" in r.note for r in compiled.report().layers)
    raises(
        bc.PassError, f"p={p} does not divide", bc.compile, mlp(), (X,), scheme=TILED.format(p), strict=True
    )


# ----------------------------------------------------------------------------- call time
@pytest.mark.parametrize(
    "inputs, kind, needle",
    [
        ((torch.randn(1, 8), torch.randn(1, 8)), bc.InputError, "expected 1 input(s)"),
        ((), bc.InputError, "expected 1 input(s)"),
        ((torch.randn(8),), bc.InputError, "got float32 tensor of shape (8,)"),
        ((torch.randn(2, 9),), bc.InputError, "expected float32 tensor of shape (batch, 8)"),
        ((torch.randn(2, 8, dtype=torch.float64),), bc.InputError, "convert with .to(torch.float32)"),
        (([[1.0] * 8],), errors.InputTypeError, "expected a torch.Tensor"),
        ((torch.randn(2, 8, device="meta"),), bc.InputError, "on the meta device"),
    ],
    ids=["35-count", "36-no-input", "37-rank", "38-shape", "39-dtype", "40-not-a-tensor", "41-meta-device"],
)
@pytest.mark.parametrize("how", ["cpu", "reference"])
def test_35_41_bad_calls_same_on_cpu_and_reference(cm, inputs, kind, needle, how):
    raises(kind, needle, cm if how == "cpu" else cm.reference, *inputs)


def test_42_non_contiguous_input(cm):
    x = torch.randn(8, 3).t()
    assert not x.is_contiguous()
    assert torch.equal(cm(x), cm(x.contiguous()))


def test_43_channels_last_input():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.Flatten(), nn.Linear(8 * 4 * 4, 4)
    )
    compiled = bc.compile(model, (torch.randn(1, 3, 8, 8),))
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(compiled(x.to(memory_format=torch.channels_last)), compiled(x))


def test_44_batch_zero(cm):
    assert cm(torch.randn(0, 8)).shape == (0, 4) == cm.reference(torch.randn(0, 8)).shape


def test_45_batch_of_ten_thousand(cm):
    x = torch.randn(10_000, 8)
    torch.testing.assert_close(cm(x), cm.reference(x))


@pytest.mark.parametrize(
    "bad", [float("nan"), float("inf"), -float("inf")], ids=["46-nan", "47-inf", "48-neg-inf"]
)
@pytest.mark.parametrize("how", ["cpu", "reference"])
@pytest.mark.parametrize("batch", [3, 5000], ids=["small", "large"])  # large: checked through numpy
def test_46_48_non_finite_inputs(cm, bad, how, batch):
    x = torch.randn(batch, 8)
    x[1, 2] = bad
    raises(bc.InputError, "holds NaN or Inf (first in sample 1)", cm if how == "cpu" else cm.reference, x)


@pytest.mark.parametrize("batch", [3, 5000], ids=["small", "large"])
def test_46_48_finite_inputs_whose_sum_overflows(cm, batch):
    """Finite values whose sum is Inf are accepted (the quick check then looks at each value)."""
    x = torch.full((batch, 8), 3e38)
    assert cm(x).shape == cm.reference(x).shape == (batch, 4)


def test_49_input_requiring_grad(cm):
    x = torch.randn(2, 8, requires_grad=True)
    torch.testing.assert_close(cm(x), cm.reference(x.detach()))


def test_the_output_structure_comes_from_fake_tensors(monkeypatch):
    """The compile learns the output's structure on fake tensors (no arithmetic), and runs the
    graph for real only where fake tensors cannot run it (a value read in Python)."""
    from torch._subclasses.fake_tensor import FakeTensor

    from bitcompiler import api

    outs = []
    fake_output = api._fake_output
    monkeypatch.setattr(api, "_fake_output", lambda gm, xs: outs.append(fake_output(gm, xs)) or outs[-1])
    compiled = bc.compile(Structured("dict"), (X,))
    assert isinstance(outs[0]["logits"], FakeTensor) and outs[0]["aux"].shape == (1, 8)
    torch.testing.assert_close(compiled(X), compiled.reference(X))

    def reads_a_value(x):
        return x * 2 if float(x.sum()) > 0 else x

    assert fake_output(reads_a_value, (X,)) is None  # the caller then runs it for real
