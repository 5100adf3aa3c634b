"""The CPU build's kernels built on a thread pool (bitcompiler/backends/cpu/parallel_build.py): a
model split into chunks runs as its reference does, from the JIT and from the exported library."""

from __future__ import annotations

import pytest
import torch

import bitcompiler as bc
from bitcompiler.backends.cpu import parallel_build


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 32, 3, padding=1),
        torch.nn.BatchNorm2d(32),
        torch.nn.Hardtanh(),
        torch.nn.Conv2d(32, 32, 3, padding=1),
        torch.nn.BatchNorm2d(32),
        torch.nn.Hardtanh(),
        torch.nn.Flatten(),
        torch.nn.Linear(32 * 8 * 8, 10),
    ).eval()


def test_chunks_hold_two_functions_or_more():
    assert parallel_build.chunks(list(range(7)), 2) == [[0, 2, 4, 6], [1, 3, 5]]
    assert parallel_build.chunks(list(range(7)), 8) == [[0, 3, 6], [1, 4], [2, 5]]
    assert parallel_build.chunks(list(range(3)), 4) == [[0, 1, 2]]
    assert parallel_build.chunks([], 4) == [[]]
    assert 1 <= parallel_build.workers() <= parallel_build.MAX_WORKERS


@pytest.mark.parametrize("cache", ["off", "on"])
def test_a_model_built_in_chunks_equals_its_reference(monkeypatch, tmp_path, cache):
    """Three chunks: two LLVM modules beside the executable's own; the JIT (no cache) and the
    exported library (the cache: the chunks' objects linked by export_library's fcompile) both
    find every kernel."""
    monkeypatch.setenv("BITC_CACHE", "off" if cache == "off" else str(tmp_path / "cache"))
    monkeypatch.setattr(parallel_build, "workers", lambda: 3)
    built = []
    compile_relax = parallel_build.compile_relax

    def spy(*args):
        built.append(compile_relax(*args))
        return built[-1]

    monkeypatch.setattr(parallel_build, "compile_relax", spy)
    cm = bc.compile(_model(), (torch.randn(1, 3, 8, 8),), scheme="binary:act=binary")
    assert len(built) == 1 and len(built[0].modules) == 2
    assert (cm._runner.library is None) == (cache == "off")
    for batch in (1, 3):
        x = torch.randn(batch, 3, 8, 8)
        assert torch.equal(cm(x), cm.reference(x))
    # exported (export_library of the JIT's executable, or a copy of the library) and loaded again
    cm.export(tmp_path / "saved")
    loaded = bc.load(tmp_path / "saved")
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(loaded(x), cm.reference(x))


def test_one_chunk_builds_as_tvm_compile_does(monkeypatch):
    monkeypatch.setenv("BITC_CACHE", "off")
    monkeypatch.setattr(parallel_build, "workers", lambda: 1)
    cm = bc.compile(_model(), (torch.randn(1, 3, 8, 8),), scheme="binary:act=binary")
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(cm(x), cm.reference(x))
    assert [m.kind for m in cm._runner.executable.mod.imports] == ["llvm"]
