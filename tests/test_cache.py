import time

import pytest
import torch

import bitcompiler as bc
from bitcompiler import cache
from tests.conftest import make_model


def test_recompiling_an_unchanged_model_hits_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BITC_CACHE", str(tmp_path))
    model, (x,) = make_model("rescnn")
    t0 = time.perf_counter()
    first = bc.compile(model, (x,), scheme="binary:act=binary")
    cold = time.perf_counter() - t0
    assert not getattr(first._runner, "cache_hit", False)
    entries = list((tmp_path / "compiled").iterdir())
    assert len(entries) == 1 and (entries[0] / "model.so").exists()
    t0 = time.perf_counter()
    second = bc.compile(model, (x,), scheme="binary:act=binary")
    warm = time.perf_counter() - t0
    assert second._runner.cache_hit and warm < cold
    xb = torch.randn(5, *x.shape[1:])
    assert torch.equal(second(xb), first(xb))
    # another scheme is another entry
    bc.compile(model, (x,), scheme="binary")
    assert len(list((tmp_path / "compiled").iterdir())) == 2


def test_changed_weights_change_the_key(tmp_path, monkeypatch):
    monkeypatch.setenv("BITC_CACHE", str(tmp_path))
    model, (x,) = make_model("mlp")
    a = bc.compile(model, (x,))
    with torch.no_grad():
        model.fc2.weight.neg_()
    b = bc.compile(model, (x,))
    assert not getattr(b._runner, "cache_hit", False)
    assert not torch.equal(a(x), b(x))


def test_corrupt_entry_is_ignored_with_a_warning(tmp_path, monkeypatch):
    monkeypatch.setenv("BITC_CACHE", str(tmp_path))
    model, (x,) = make_model("mlp")
    bc.compile(model, (x,))
    (entry,) = (tmp_path / "compiled").iterdir()
    (entry / "model.so").write_bytes(b"not a library")
    with pytest.warns(UserWarning, match="ignoring unreadable compile cache entry"):
        cm = bc.compile(model, (x,))
    torch.testing.assert_close(cm(x), cm.reference(x), rtol=1e-5, atol=1e-5)


def test_cache_off(monkeypatch):
    monkeypatch.setenv("BITC_CACHE", "off")
    assert cache.root() is None


def test_a_model_loaded_from_the_cache_exports_and_loads(tmp_path, monkeypatch):
    monkeypatch.setenv("BITC_CACHE", str(tmp_path / "cache"))
    model, (x,) = make_model("mlp")
    bc.compile(model, (x,))
    hit = bc.compile(model, (x,))
    assert hit._runner.cache_hit
    hit.export(tmp_path / "out")
    assert torch.equal(bc.load(tmp_path / "out")(x), hit(x))
