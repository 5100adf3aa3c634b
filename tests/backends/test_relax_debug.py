"""BITC_DUMP writes the Relax module after each Relax pass and each kernel's TIR; BITC_DEBUG checks
that every Relax pass leaves a well-formed module."""

import pytest
import torch
from tvm import relax

import bitcompiler as bc
from bitcompiler.backends.cpu.pipeline import checkpoint


def test_dump_writes_relax_after_each_pass_and_the_kernels_tir(tmp_path, monkeypatch):
    monkeypatch.setenv("BITC_DUMP", str(tmp_path))
    monkeypatch.setenv("BITC_CACHE", "off")
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3), torch.nn.Flatten(), torch.nn.Linear(16 * 6 * 6, 10)
    )
    bc.compile(model.eval(), (torch.randn(1, 3, 8, 8),), scheme="binary:act=binary")
    relax_files = sorted(p.name for p in (tmp_path / "relax").iterdir())
    assert len(relax_files) >= 5 and relax_files[0].startswith("001_"), relax_files
    assert "LegalizeOps" in " ".join(relax_files)
    kernels = [p.name for p in (tmp_path / "tir").iterdir()]
    assert any(k.startswith("bitc_conv2d") for k in kernels) and any(
        k.startswith("bitc_dense") for k in kernels
    ), kernels
    assert "T.prim_func" in (tmp_path / "tir" / next(k for k in kernels if k.startswith("bitc_"))).read_text()


def test_an_ill_formed_module_is_caught_after_the_pass_that_made_it():
    ty = relax.TensorType((2,), "float32")
    x, free = relax.Var("x", ty), relax.Var("free", ty)  # `free` is bound nowhere
    # raised inside the TVM pass, it reaches Python through TVM as a RuntimeError
    with pytest.raises(RuntimeError, match="not well formed after pass .SomePass.: Var free is not defined"):
        checkpoint("007_SomePass", check=True, dump=None)(_module(x, free))
    assert checkpoint("007_SomePass", check=True, dump=None)(_module(x, x)) is not None


def _module(x, other):
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        y = bb.emit(relax.op.add(x, other))
        bb.emit_func_output(y)
    return bb.get()
