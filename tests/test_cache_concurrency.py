"""Two processes compiling into one ``BITC_CACHE`` lose no entries and corrupt nothing; a compile
killed while writing its entry leaves nothing a later compile would load."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from torch import nn

import bitcompiler as bc

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from torch import nn
    import bitcompiler as bc
    if sys.argv[1] == "die":  # killed half-way through writing the cache entry
        import os
        from bitcompiler.backends.cpu import build
        def write_library(built, d):
            (d / "model.so").write_bytes(b"half")
            os._exit(9)
        build.write_library = write_library
    for seed in sys.argv[2:]:
        torch.manual_seed(int(seed))
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.Linear(16, 4))
        bc.compile(model, (torch.randn(1, 8),))
    """
)


def model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.Linear(16, 4))


def spawn(cache: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "BITC_CACHE": str(cache), "PYTHONPATH": str(ROOT), "TVM_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", SCRIPT, *args], env=env, cwd=ROOT, stderr=subprocess.PIPE)


def test_two_processes_share_one_cache(tmp_path):
    procs = [spawn(tmp_path, "ok", "0", "1"), spawn(tmp_path, "ok", "1", "2")]  # both race on seed 1
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()[-2000:]
    entries = sorted((tmp_path / "compiled").iterdir())
    assert len(entries) == 3 and not any(e.name.startswith(".") for e in entries), entries
    from bitcompiler.backends.cpu import CPUBackend

    x = torch.randn(3, 8)
    for entry in entries:  # every entry is complete: it loads and runs
        (out,) = CPUBackend().load(entry, bc.Target("cpu"))([x])
        assert out.shape == (3, 4) and torch.isfinite(out).all()


def test_a_killed_compile_leaves_no_entry(tmp_path, monkeypatch):
    p = spawn(tmp_path, "die", "3")
    p.communicate(timeout=300)
    assert p.returncode == 9
    assert not [e for e in (tmp_path / "compiled").iterdir() if not e.name.startswith(".")]
    monkeypatch.setenv("BITC_CACHE", str(tmp_path))
    cm = bc.compile(model(3), (torch.randn(1, 8),))
    assert not getattr(cm._runner, "cache_hit", False)
    x = torch.randn(2, 8)
    torch.testing.assert_close(cm(x), cm.reference(x))
    assert len([e for e in (tmp_path / "compiled").iterdir() if not e.name.startswith(".")]) == 1
