import shutil
import time
from pathlib import Path

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
    monkeypatch.setenv("BITC_CACHE", str(tmp_path / "first"))
    model, (x,) = make_model("mlp")
    bc.compile(model, (x,))
    # the entry, corrupted, in a cache this process has loaded nothing from (the first compile runs
    # the library it cached, and a loaded library's file is never rewritten in place)
    (entry,) = (tmp_path / "first" / "compiled").iterdir()
    shutil.copytree(entry, tmp_path / "second" / "compiled" / entry.name)
    monkeypatch.setenv("BITC_CACHE", str(tmp_path / "second"))
    (tmp_path / "second" / "compiled" / entry.name / "model.so").write_bytes(b"not a library")
    with pytest.warns(UserWarning, match="ignoring unreadable compile cache entry"):
        cm = bc.compile(model, (x,))
    torch.testing.assert_close(cm(x), cm.reference(x), rtol=1e-5, atol=1e-5)


def test_cache_off(monkeypatch):
    monkeypatch.setenv("BITC_CACHE", "off")
    assert cache.root() is None


@pytest.mark.parametrize("switch", ["on", "1", "true", "ON"])
def test_cache_on_is_the_default_directory_not_one_named_on(monkeypatch, switch):
    monkeypatch.setenv("BITC_CACHE", switch)
    assert cache.root() == Path("~/.cache/bitcompiler").expanduser()
    for off in ("0", "false", "no"):
        monkeypatch.setenv("BITC_CACHE", off)
        assert cache.root() is None


def test_a_model_loaded_from_the_cache_exports_and_loads(tmp_path, monkeypatch):
    monkeypatch.setenv("BITC_CACHE", str(tmp_path / "cache"))
    model, (x,) = make_model("mlp")
    bc.compile(model, (x,))
    hit = bc.compile(model, (x,))
    assert hit._runner.cache_hit
    hit.export(tmp_path / "out")
    assert torch.equal(bc.load(tmp_path / "out")(x), hit(x))


class _Buffers(torch.nn.Module):
    """Constants of every awkward kind: 0-dim, stride-0 (expanded), non-contiguous, bool, integer."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("zero_dim", torch.tensor(0.5))
        self.register_buffer("expanded", torch.tensor([1.5]).expand(8))
        self.register_buffer("transposed", torch.randn(8, 8).t())
        self.register_buffer("mask", torch.rand(8) > 0.5)
        self.register_buffer("count", torch.arange(8))
        self.fc = torch.nn.Linear(8, 8)

    def forward(self, x):
        y = self.fc(x) * self.zero_dim + self.expanded + x @ self.transposed
        return torch.where(self.mask, y, y * self.count)


@pytest.mark.parametrize("scheme", ["none", "binary"])
def test_any_constant_tensor_hashes_into_the_key(tmp_path, monkeypatch, scheme):
    # a BatchNorm that does not fold keeps its 0-dim num_batches_tracked buffer: this crashed the key
    monkeypatch.setenv("BITC_CACHE", str(tmp_path))
    bn = torch.nn.Sequential(torch.nn.BatchNorm2d(3)).eval()
    x = torch.randn(1, 3, 8, 8)
    cm = bc.compile(bn, (x,), scheme=scheme)
    assert torch.allclose(cm(x), bn(x), atol=1e-5)
    model, x = _Buffers().eval(), torch.randn(1, 8)
    first = bc.compile(model, (x,), scheme=scheme)
    with torch.no_grad():
        assert torch.allclose(first(x), model(x), atol=1e-5) or scheme != "none"
    assert bc.compile(model, (x,), scheme=scheme)._runner.cache_hit
    with torch.no_grad():
        model.zero_dim.fill_(0.25)  # a changed 0-dim constant is a new entry
    assert not getattr(bc.compile(model, (x,), scheme=scheme)._runner, "cache_hit", False)


def test_tensor_bytes_covers_every_layout():
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    assert cache.tensor_bytes(base.t()) == cache.tensor_bytes(base.t().contiguous())
    assert cache.tensor_bytes(torch.tensor(2.0)) == torch.tensor([2.0]).numpy().tobytes()
    assert cache.tensor_bytes(torch.tensor([True, False])) == b"\x01\x00"
    assert cache.tensor_bytes(torch.zeros(0)) == b""


def test_a_cache_that_fails_only_warns(tmp_path, monkeypatch):
    monkeypatch.setenv("BITC_CACHE", str(tmp_path))

    def broken(*args, **kwargs):
        raise RuntimeError("cannot hash")

    monkeypatch.setattr(cache, "key", broken)
    model, (x,) = make_model("mlp")
    with pytest.warns(UserWarning, match="compile cache skipped"):
        cm = bc.compile(model, (x,))
    assert torch.allclose(cm(x), cm.reference(x), atol=1e-5)
    assert not (tmp_path / "compiled").exists()
