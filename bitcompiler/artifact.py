"""Bundles on disk: writing them atomically, validating them, loading the reference without pickle.

A bundle is a directory: the target's files (``model.so``, or the Cortex-M C sources and ELF), the
reference graph (``reference.json``: torch.export's JSON graph; ``reference_weights.pt``: its
tensors, read back with ``torch.load(weights_only=True)``) and ``meta.json``, which records the
format version, the file list and the sha256 of every file. Nothing in a bundle is unpickled;
loading one does run its native library, like any compiled model: load bundles you trust.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bitcompiler.errors import BundleFileMissing, ExportError, LoadError

FORMAT_VERSION = 2
REFERENCE = "reference.json"
REFERENCE_WEIGHTS = "reference_weights.pt"
REQUIRED_KEYS = ("format", "target", "inputs", "dynamic_batch", "files", "sha256", "report")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_reference(exported: Any, directory: Path) -> list[str]:
    """The reference program as JSON plus its tensors (no pickled objects)."""
    from torch._export.serde import serialize

    artifact = serialize.serialize(exported)
    (directory / REFERENCE).write_bytes(artifact.exported_program)
    tensors = {
        # parameters stay parameters (without gradients): reading the program back checks that
        # every parameter entry is one (a float model's weights, say)
        "state_dict": {k: _without_grad(v) for k, v in exported.state_dict.items()},
        "constants": dict(exported.constants),
        "example_inputs": exported.example_inputs,
    }
    torch.save(tensors, directory / REFERENCE_WEIGHTS)
    return [REFERENCE, REFERENCE_WEIGHTS]


def _without_grad(t: torch.Tensor) -> torch.Tensor:
    if isinstance(t, torch.nn.Parameter):
        return torch.nn.Parameter(t.detach(), requires_grad=False)
    return t.detach()


def load_reference(directory: Path) -> Any:
    """What :func:`save_reference` wrote, as an ``ExportedProgram``; tensors only, never pickle."""
    from torch._export.serde import serialize

    try:
        tensors = torch.load(directory / REFERENCE_WEIGHTS, weights_only=True)
        artifact = serialize.SerializedArtifact(
            (directory / REFERENCE).read_bytes(),
            tensors["state_dict"],
            tensors["constants"],
            tensors["example_inputs"],
        )
        return serialize.deserialize(artifact)
    except Exception as e:
        raise LoadError(
            f"{directory / REFERENCE}: the reference graph cannot be read ({type(e).__name__}); "
            "export the model again"
        ) from e


def write_atomic(directory: Path, write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp)`` in a temporary directory beside ``directory``, then move it into place.

    A failed write (an unwritable parent, a full disk) leaves nothing behind; an existing
    ``directory`` is replaced whole once the new bundle is complete.
    """
    directory = Path(directory)
    parent = directory.absolute().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=parent))
    except OSError as e:
        raise ExportError(
            f"cannot export to {directory}: {parent} is not writable ({e.strerror or e}); "
            "choose a directory you can write to"
        ) from e
    old: Path | None = None
    try:
        write(tmp)
        if directory.exists():
            if not directory.is_dir():
                raise ExportError(f"cannot export to {directory}: it is a file; choose a directory")
            old = Path(tempfile.mkdtemp(prefix=f".{directory.name}-old-", dir=parent))
            os.rename(directory, old / "previous")
        os.rename(tmp, directory)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and (old / "previous").exists() and not directory.exists():
            os.rename(old / "previous", directory)  # put the previous bundle back
        if isinstance(e, OSError) and not isinstance(e, ExportError):
            raise ExportError(f"cannot export to {directory}: {e}") from e
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return directory


def read_meta(directory: Path) -> dict:
    """``meta.json`` of a bundle, checked: the format version, the keys, every listed file present
    with the sha256 recorded at export. Raises :class:`LoadError` (or
    :class:`BundleFileMissing`) naming the file."""
    if not directory.is_dir():
        raise BundleFileMissing(
            f"{directory} is not a directory; pass the directory CompiledModel.export wrote"
        )
    meta_path = directory / "meta.json"
    if not meta_path.exists():
        raise BundleFileMissing(
            f"{meta_path} not found: {directory} is not a directory written by CompiledModel.export"
        )
    try:
        meta = json.loads(meta_path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise LoadError(f"{meta_path} is not valid JSON ({e}); export the model again") from e
    if not isinstance(meta, dict):
        raise LoadError(f"{meta_path} is not a bundle's metadata (a JSON object); export the model again")
    if meta.get("format") != FORMAT_VERSION:
        raise LoadError(
            f"{meta_path}: bundle format {meta.get('format')!r} is not supported by this version "
            f"(it reads format {FORMAT_VERSION}); export the model again with this version"
        )
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if missing:
        raise LoadError(f"{meta_path} lacks {', '.join(missing)}; export the model again")
    hashes = meta["sha256"]
    if not isinstance(meta["files"], list) or not isinstance(hashes, dict):
        raise LoadError(f"{meta_path}: 'files' must be a list and 'sha256' an object; export again")
    for name in meta["files"]:
        path = directory / str(name)
        if Path(str(name)).is_absolute() or ".." in Path(str(name)).parts:
            raise LoadError(f"{meta_path} lists {name!r}, outside the bundle; export the model again")
        if not path.is_file():
            raise BundleFileMissing(f"{path} is missing from the bundle; export the model again")
        if name not in hashes:
            raise LoadError(f"{meta_path} records no sha256 for {name}; export the model again")
        if sha256(path) != hashes[name]:
            raise LoadError(
                f"{path} does not match the sha256 recorded in meta.json at export: the file was "
                "changed or damaged; export the model again"
            )
    return meta
