"""The bad-input matrix of docs/errors.md, rows 50 to 71: bundle files and the environment (rows
1 to 49, the model, schemes and calls, are in test_error_matrix.py; the helpers are shared).
"""

from __future__ import annotations

import json
import os
import shutil
import warnings

import pytest
import torch
from torch import nn

import bitcompiler as bc
from bitcompiler import errors
from tests.test_error_matrix import X, mlp, raises


@pytest.fixture(scope="module")
def cm():
    return bc.compile(mlp(), (X,))


# ----------------------------------------------------------------------------- files
@pytest.fixture(scope="module")
def bundle(cm, tmp_path_factory):
    return cm.export(tmp_path_factory.mktemp("b") / "bundle")


def copy_of(bundle, tmp_path):
    import shutil

    return shutil.copytree(bundle, tmp_path / "copy")


def test_50_load_missing_directory(tmp_path):
    raises(errors.BundleFileMissing, "is not a directory", bc.load, tmp_path / "nope")


def test_51_load_directory_without_meta(tmp_path):
    e = raises(errors.BundleFileMissing, "not a directory written by CompiledModel.export", bc.load, tmp_path)
    assert isinstance(e, FileNotFoundError)


@pytest.mark.parametrize("name", ["model.so", "reference_weights.pt"], ids=["52-no-library", "53-no-weights"])
def test_52_53_bundle_with_a_file_missing(bundle, tmp_path, name):
    d = copy_of(bundle, tmp_path)
    (d / name).unlink()
    raises(errors.BundleFileMissing, f"{name} is missing from the bundle", bc.load, d)


@pytest.mark.parametrize(
    "edit, needle",
    [
        (lambda m: "{not json", "is not valid JSON"),
        (lambda m: json.dumps([1, 2]), "is not a bundle's metadata"),
        (lambda m: json.dumps({**m, "format": 1}), "bundle format 1 is not supported"),
        (lambda m: json.dumps({k: v for k, v in m.items() if k != "files"}), "lacks files"),
        (lambda m: json.dumps({**m, "files": ["../escape"]}), "outside the bundle"),
        (lambda m: json.dumps({**m, "inputs": [{"shape": 3}]}), "has invalid fields"),
    ],
    ids=[
        "54-invalid-json",
        "55-not-an-object",
        "56-other-format",
        "57-missing-key",
        "58-path-outside",
        "59-bad-field",
    ],
)
def test_54_59_tampered_meta(bundle, tmp_path, edit, needle):
    d = copy_of(bundle, tmp_path)
    meta = json.loads((d / "meta.json").read_text())
    (d / "meta.json").write_text(edit(meta))
    raises(bc.LoadError, needle, bc.load, d)


@pytest.mark.parametrize(
    "name",
    ["model.so", "reference_weights.pt", "reference.json"],
    ids=["60-library", "61-weights", "62-graph"],
)
def test_60_62_tampered_files_fail_their_hash(bundle, tmp_path, name):
    d = copy_of(bundle, tmp_path)
    with open(d / name, "ab") as f:
        f.write(b"\0tampered")
    raises(bc.LoadError, f"{name} does not match the sha256 recorded in meta.json", bc.load, d)


def test_63_export_to_an_unwritable_place(cm, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    raises(bc.ExportError, "is not writable", cm.export, blocker / "bundle")
    failing = tmp_path / "out"

    class Broken:
        def export(self, d):
            (d / "partial").write_text("x")
            raise OSError(28, "No space left on device")

    runner, cm._runner = cm._runner, Broken()
    try:
        raises(bc.ExportError, "No space left on device", cm.export, failing)
    finally:
        cm._runner = runner
    assert list(tmp_path.iterdir()) == [blocker]  # nothing half-written beside it


def test_64_export_replaces_an_old_bundle_whole(cm, bundle, tmp_path):
    d = copy_of(bundle, tmp_path)
    (d / "stale.txt").write_text("old")
    cm.export(d)
    assert not (d / "stale.txt").exists()
    x = torch.randn(2, 8)
    assert torch.equal(bc.load(d)(x), cm(x))


# ----------------------------------------------------------------------------- environment
def test_65_missing_toolchain(monkeypatch):
    monkeypatch.setenv("PATH", "")
    raises(errors.ToolchainMissing, "arm-none-eabi-gcc", bc.compile, mlp(), (X,), target="cortex-m4")
    with pytest.raises(errors.ToolchainMissing, match="apt-get install gcc-arm-none-eabi"):
        bc.compile(mlp(), (X,), target="cortex-m4")


@pytest.mark.skipif(
    not all(map(__import__("shutil").which, ["arm-none-eabi-gcc", "qemu-system-arm"])),
    reason="no Arm toolchain",
)
@pytest.mark.parametrize(
    "opts, needle",
    [({"flash_kb": 1}, "B of flash but"), ({"ram_kb": 1}, "B of RAM")],
    ids=["66-flash", "67-ram"],
)
def test_66_67_model_too_large_for_the_board(opts, needle):
    model = nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 4))
    e = raises(
        bc.ModelTooLarge,
        needle,
        bc.compile,
        model,
        (torch.randn(1, 64),),
        target=bc.Target("cortex-m4", **opts),
    )
    assert "mps2-an386" in str(e)


def test_68_corrupt_tuning_database(tmp_path):
    db = tmp_path / "db"
    db.mkdir()
    (db / "database_workload.json").write_text('{"truncated')
    (db / "database_tuning_record.json").write_text("[1, 2")
    with pytest.warns(UserWarning, match="ignoring unreadable tuning database"):
        compiled = bc.compile(mlp(), (X,), db=db)
    assert compiled(X).shape == (1, 4)


def test_69_corrupt_compile_cache_entry(monkeypatch, tmp_path):
    monkeypatch.setenv("BITC_CACHE", str(tmp_path / "first"))
    bc.compile(mlp(), (X,))
    # corrupted in a copy of the cache: this process runs the library the first compile cached,
    # and a loaded library's file rewritten in place takes the process down (SIGBUS)
    (entry,) = (tmp_path / "first" / "compiled").iterdir()
    copy = tmp_path / "second" / "compiled" / entry.name
    shutil.copytree(entry, copy)
    monkeypatch.setenv("BITC_CACHE", str(tmp_path / "second"))
    (copy / "model.so").write_bytes(b"not a library")
    with pytest.warns(UserWarning, match="ignoring unreadable compile cache entry"):
        compiled = bc.compile(mlp(), (X,))
    torch.testing.assert_close(compiled(X), compiled.reference(X))


def test_70_unwritable_cache(monkeypatch, tmp_path):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv(
        "BITC_CACHE", str(tmp_path / "file" / "cache")
    )  # under a file: unwritable, even as root
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = bc.compile(mlp(), (X,))
    assert any("could not write the compile cache" in str(w.message) for w in caught)
    torch.testing.assert_close(compiled(X), compiled.reference(X))


def test_every_error_is_a_bitc_error_with_its_builtin_base():
    assert issubclass(bc.SchemeError, ValueError) and issubclass(bc.LoadError, ValueError)
    assert issubclass(errors.BundleFileMissing, FileNotFoundError)
    assert issubclass(bc.CaptureError, RuntimeError) and issubclass(bc.PassError, RuntimeError)
    for name in errors.__all__:
        assert issubclass(getattr(errors, name), bc.BitcError), name
    from bitcompiler.backends import lower
    from bitcompiler.backends.cortex_m import ModelTooLarge, qemu
    from bitcompiler.datasets import DatasetUnavailable

    assert lower.LoweringError is bc.LoweringError and ModelTooLarge is bc.ModelTooLarge
    assert (
        qemu.ToolchainMissing is errors.ToolchainMissing and DatasetUnavailable is errors.DatasetUnavailable
    )
    assert os.path.basename(errors.__file__) == "errors.py"


def test_71_a_pickle_in_the_bundle_is_never_run(bundle, tmp_path):
    import hashlib
    import pickle

    d = copy_of(bundle, tmp_path)
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (d / "reference_weights.pt").write_bytes(pickle.dumps(Payload()))
    meta = json.loads((d / "meta.json").read_text())  # an attacker can rewrite the hashes too
    meta["sha256"]["reference_weights.pt"] = hashlib.sha256(
        (d / "reference_weights.pt").read_bytes()
    ).hexdigest()
    (d / "meta.json").write_text(json.dumps(meta))
    raises(bc.LoadError, "the reference graph cannot be read", bc.load, d)
    assert not marker.exists()
