"""Bad input gets a clear error naming what to fix; nothing crashes inside TVM."""

import pytest
import torch
from torch import nn

import bitcompiler as bc
from tests.test_capture import DataDependent


@pytest.fixture(scope="module")
def compiled():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3))
    return bc.compile(model, (torch.randn(1, 3, 4),))


def test_untraceable_model_raises_capture_error():
    with pytest.raises(bc.CaptureError, match="if x.sum\\(\\) > 0"):
        bc.compile(DataDependent(), (torch.randn(1, 4),))


def test_unknown_scheme_lists_valid_names():
    with pytest.raises(ValueError, match="valid names: none, binary, uniform"):
        bc.compile(nn.Linear(4, 4), (torch.randn(1, 4),), scheme="ternary")


def test_missing_onnx_path_is_named():
    with pytest.raises(ValueError, match="model.onnx: no such ONNX file"):
        bc.compile("model.onnx", (torch.randn(1, 4),))


def test_unknown_target():
    with pytest.raises(ValueError, match="unknown target 'tpu'; valid targets: cpu, aarch64, cortex-m3"):
        bc.compile(nn.Linear(4, 4), (torch.randn(1, 4),), target="tpu")


def test_example_inputs_must_be_tensors():
    with pytest.raises(TypeError, match="example_inputs\\[0\\] is a list"):
        bc.compile(nn.Linear(4, 4), ([1.0, 2.0],))


@pytest.mark.parametrize(
    "x, needle",
    [
        (
            torch.randn(3, 4),
            "expected float32 tensor of shape (batch, 3, 4), got float32 tensor of shape (3, 4)",
        ),
        (
            torch.randn(2, 3, 5),
            "expected float32 tensor of shape (batch, 3, 4), got float32 tensor of shape (2, 3, 5)",
        ),
        (torch.randn(2, 3, 4, dtype=torch.float64), "convert with .to(torch.float32)"),
    ],
)
def test_wrong_input_at_call_time_names_expected_and_got(compiled, x, needle):
    with pytest.raises(ValueError) as e:
        compiled(x)
    assert needle in str(e.value)


def test_wrong_number_of_inputs(compiled):
    with pytest.raises(ValueError, match="expected 1 input"):
        compiled(torch.randn(1, 3, 4), torch.randn(1, 3, 4))


class _SplitThenUpsample(nn.Module):
    """torch.fx cannot iterate a split's result: captured by torch.export, whose graph holds the
    transposed conv as a functional ``aten.conv_transpose1d`` call on its constant weight."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.ConvTranspose1d(4, 4, 3)
        self.mid, self.out = nn.Linear(24, 8), nn.Linear(8, 2)

    def forward(self, x):
        x = torch.cat([p * 2 for p in torch.split(x, 2, dim=1)], 1)
        return self.out(self.mid(self.up(x).flatten(1)))


def test_functional_weighted_op_without_bit_lowering_is_noted_or_strict_error():
    model, x = _SplitThenUpsample().eval(), torch.randn(1, 4, 4)
    cm = bc.compile(model, (x,), scheme="binary:act=binary")
    rows = {r.name: r for r in cm.report().layers}
    assert rows["up"].scheme == "float"
    assert "conv_transpose1d on a constant weight has no bit lowering" in rows["up"].note
    with pytest.raises(bc.PassError, match="layer 'up' \\(conv_transpose1d\\)"):
        bc.compile(model, (x,), scheme="binary:act=binary", strict=True)


def test_strict_mode_names_the_op_without_bit_lowering():
    model = nn.Sequential(nn.ConvTranspose1d(2, 2, 3), nn.Flatten(), nn.Linear(12, 4), nn.Linear(4, 2))
    x = torch.randn(1, 2, 4)
    cm = bc.compile(model, (x,))
    rows = {r.name: r for r in cm.report().layers}
    assert rows["0"].scheme == "float" and "ConvTranspose1d has no bit lowering" in rows["0"].note
    with pytest.raises(
        bc.PassError, match="layer '0' \\(ConvTranspose1d\\): ConvTranspose1d has no bit lowering"
    ):
        bc.compile(model, (x,), strict=True)


def test_load_of_a_wrong_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory written by CompiledModel.export"):
        bc.load(tmp_path)
