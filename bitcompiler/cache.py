"""Compile cache: built artifacts keyed by the exported graph, its constants and the target.

Recompiling an unchanged model loads the library instead of running TVM again.
Entries live under ``$BITC_CACHE/compiled`` (default ``~/.cache/bitcompiler``, also for
``BITC_CACHE=on``/``1``/``true``; ``BITC_CACHE=off``/``0`` disables caching). Writes are atomic: an entry is built in
a private temporary directory and renamed into place, so two processes
compiling the same model at once both end with a complete entry.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

FORMAT = "1"
DEFAULT_ROOT = "~/.cache/bitcompiler"


def root() -> Path | None:
    """The cache directory, or None when caching is off."""
    value = os.environ.get("BITC_CACHE", DEFAULT_ROOT)
    if value.lower() in ("off", "0", "false", "no", "none", ""):
        return None
    if value.lower() in ("on", "1", "true", "yes"):  # a switch, not a directory named "on"
        value = DEFAULT_ROOT
    return Path(value).expanduser()


@functools.lru_cache(maxsize=1)
def source_digest() -> str:
    """sha256 of bitcompiler's own Python sources: a changed kernel or pass never reuses an old build."""
    h = hashlib.sha256()
    package = Path(__file__).resolve().parent
    for path in sorted(package.rglob("*.py")):
        h.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def key(exported: torch.export.ExportedProgram, target: str) -> str:
    """sha256 of the graph code, the input shapes, every constant's bytes, the target, the tool
    versions and sources."""
    import tvm

    import bitcompiler

    h = hashlib.sha256()
    for part in (
        FORMAT,
        bitcompiler.__version__,
        source_digest(),
        tvm.__version__,
        torch.__version__,
        target,
    ):
        h.update(part.encode() + b"\0")
    h.update(exported.graph_module.code.encode())
    # the code names no shapes: the same model at another input size must not share an entry
    for node in exported.graph.nodes:
        val = node.meta.get("val")
        if node.op == "placeholder" and isinstance(val, torch.Tensor):
            h.update(f"{node.name}{tuple(str(d) for d in val.shape)}{val.dtype}".encode())
    tensors = {**exported.state_dict, **exported.constants}
    for name in sorted(tensors):
        t = tensors[name]
        if isinstance(t, torch.Tensor):
            h.update(name.encode() + str(tuple(t.shape)).encode() + str(t.dtype).encode())
            h.update(tensor_bytes(t))
    return h.hexdigest()[:32]


def tensor_bytes(t: torch.Tensor) -> bytes:
    """The values of any tensor as bytes: 0-dim, stride-0 (expanded), non-contiguous, integer and bool."""
    t = t.detach().cpu()
    if t.is_quantized:
        t = t.int_repr()
    if t.dtype == torch.bool:
        t = t.to(torch.uint8)
    # a fresh tensor: contiguous() keeps a size-1 dimension's stride (0 when expanded), which
    # view(torch.uint8) rejects
    flat = torch.empty(t.numel(), dtype=t.dtype).copy_(t.reshape(-1))
    return bytes(flat.view(torch.uint8).numpy().tobytes()) if flat.numel() else b""


def lookup(entry_key: str, load: Callable[[Path], object]) -> object | None:
    """The loaded entry, or None (a broken entry is removed with a warning, never an error)."""
    base = root()
    if base is None:
        return None
    path = base / "compiled" / entry_key
    if not path.is_dir():
        return None
    try:
        return load(path)
    except Exception as e:  # noqa: BLE001 - a corrupt cache must never break compile()
        warnings.warn(f"ignoring unreadable compile cache entry {path}: {e}", stacklevel=3)
        shutil.rmtree(path, ignore_errors=True)
        return None


def store(entry_key: str, write: Callable[[Path], object]) -> None:
    """Write an entry atomically; failures (read-only home, full disk) only warn."""
    base = root()
    if base is None:
        return
    final = base / "compiled" / entry_key
    tmp: Path | None = None
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{entry_key}-", dir=final.parent))
        write(tmp)
        try:
            os.rename(tmp, final)
        except OSError:  # another process won the race: its entry is complete too
            shutil.rmtree(tmp, ignore_errors=True)
    except Exception as e:  # noqa: BLE001 - read-only home, full disk, an unserializable build: only warn
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        warnings.warn(f"could not write the compile cache under {base}: {e}", stacklevel=3)
