"""LaneReduction: row reductions (LayerNorm, softmax) with vector partial sums, within the float bar."""

import numpy as np
import pytest
import torch
import tvm
from tvm import relax, tirx

import bitcompiler as bc
from bitcompiler.backends.reduction import LaneReduction

TARGET = tvm.target.Target({"kind": "llvm"})


def _legalized(make, shape):
    """The PrimFunc Relax legalizes ``make(x, w, b)`` into, ``x`` of ``(M, *shape)`` float32 (M
    symbolic), ``w`` and ``b`` vectors of the last axis (arguments only where ``make`` reads them)."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((tirx.Var("m", "int64"), *shape), "float32"))
    w, b = (relax.Var(n, relax.TensorType((shape[-1],), "float32")) for n in "wb")
    with bb.function("main", [x, w, b]):
        with bb.dataflow():
            out = bb.emit_output(bb.emit(make(x, w, b)))
        bb.emit_func_output(out)
    mod = relax.transform.LegalizeOps()(bb.get())
    return next(f for gv, f in mod.functions.items() if isinstance(f, tirx.PrimFunc))


def _run(func, *args):
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=TARGET)
    y = tvm.runtime.tensor(np.zeros_like(args[0]))
    lib["main"](*(tvm.runtime.tensor(a) for a in args), y)
    return y.numpy()


def _layer_norm(x, w, b):
    return relax.op.nn.layer_norm(x, w, b, axes=[-1], epsilon=1e-5)


@pytest.mark.parametrize(
    ("make", "reference"),
    [
        (_layer_norm, lambda t, w, b: torch.nn.functional.layer_norm(t, (t.shape[-1],), w, b)),
        (lambda x, *_: relax.op.nn.softmax(x, axis=-1), lambda t, *_: torch.softmax(t, -1)),
    ],
    ids=["layer_norm", "softmax"],
)
def test_row_reductions_get_vector_partial_sums_and_match_torch(make, reference):
    func = _legalized(make, (6, 64))
    sch = LaneReduction().apply(func, TARGET, False)
    assert sch is not None
    text = sch.mod["main"].script()
    assert "_rf_update" in text and "T.vectorized(" in text and "T.parallel(" in text, text
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(3, 6, 64)) * 4 + 1).astype("float32")
    wb = [rng.normal(size=64).astype("float32") for _ in range(2)]
    want = reference(*(torch.from_numpy(a) for a in (x, *wb))).numpy()
    n_args = len(sch.mod["main"].params) - 1
    got = _run(sch.mod["main"], x, *wb[: n_args - 1])
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


def test_reductions_over_a_strided_axis_or_a_short_row_are_left_to_the_next_rule():
    across = _legalized(lambda x, *_: relax.op.mean(x, axis=[1]), (64, 32))  # tokens: stride 32
    assert LaneReduction().apply(across, TARGET, False) is None
    short = _legalized(_layer_norm, (6, 6))  # 6 elements: no whole vector of partial sums
    assert LaneReduction().apply(short, TARGET, False) is None


class _Block(torch.nn.Module):
    """An MLP-Mixer-style block: LayerNorm, a binary channel MLP with GELU, a residual, softmax."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = torch.nn.LayerNorm(128)
        self.up, self.down = torch.nn.Linear(128, 256), torch.nn.Linear(256, 128)

    def forward(self, x):
        x = x + self.down(torch.nn.functional.gelu(self.up(self.norm(x))))
        return torch.softmax(x, -1)


def test_compiled_layer_norm_and_softmax_are_scheduled_and_match_the_reference(tmp_path, monkeypatch):
    monkeypatch.setenv("BITC_DUMP", str(tmp_path))
    monkeypatch.setenv("BITC_CACHE", "off")
    torch.manual_seed(0)
    cm = bc.compile(_Block().eval(), (torch.randn(1, 16, 128),), scheme="binary:act=binary")
    x = torch.randn(3, 16, 128) * 3
    want = cm.reference(x)
    assert ((cm(x) - want).abs().max() <= 1e-5 * want.abs().max()).item()
    tir = {p.stem: p.read_text() for p in (tmp_path / "tir").iterdir()}
    norm = next(text for name, text in tir.items() if "layer_norm" in name)
    soft = next(text for name, text in tir.items() if "softmax" in name)
    assert "_rf_update" in norm and "_rf_update" in soft, sorted(tir)
