"""A benchmark's data: a named dataset or a folder, and each scheme trained on it with ``train.fit``."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from bitcompiler import datasets
from bitcompiler.errors import InputError
from bitcompiler.train import accuracy, fit

DIR_FORMAT = "train.npz and test.npz, each with arrays x (N, C, H, W float) and y (N int labels)"


def load(data: str | os.PathLike[str]) -> tuple[TensorDataset, TensorDataset]:
    """(train, test) of ``data``: a :func:`bitcompiler.datasets.names` name or a folder holding
    ``train.npz`` and ``test.npz`` (arrays ``x``: inputs, ``y``: integer labels)."""
    if str(data) in datasets.names():
        return datasets.load(str(data), "train"), datasets.load(str(data), "test")
    folder = Path(data)
    if not folder.is_dir():
        raise InputError(
            f"--data {data}: neither a dataset name ({', '.join(datasets.names())}) nor a folder; "
            f"a folder holds {DIR_FORMAT}"
        )
    return _npz(folder / "train.npz"), _npz(folder / "test.npz")


def _npz(path: Path) -> TensorDataset:
    if not path.is_file():
        raise InputError(f"{path} is missing: a --data folder holds {DIR_FORMAT}")
    with np.load(path) as f:
        if "x" not in f or "y" not in f:
            raise InputError(f"{path} has arrays {sorted(f)}; expected x (inputs) and y (labels)")
        x, y = np.asarray(f["x"], np.float32), np.asarray(f["y"], np.int64)
    if len(x) != len(y) or len(x) == 0:
        raise InputError(f"{path}: x has {len(x)} samples and y {len(y)}; they must match and be non-empty")
    return TensorDataset(torch.from_numpy(x), torch.from_numpy(y))


def trained(model: nn.Module, scheme: str, train: TensorDataset, epochs: int, seed: int = 0) -> nn.Module:
    """A copy of ``model`` prepared for ``scheme`` (a float copy for ``none``) and trained with
    ``train.fit``'s defaults: the scheme's recipe (:mod:`bitcompiler.recipes`)."""
    from bitcompiler.api import prepare
    from bitcompiler.quant.schemes import Scheme

    net = prepare(model, scheme) if Scheme.parse(scheme).quantizes else copy.deepcopy(model)
    fit(net, train, epochs=epochs, progress=False, seed=seed)
    return net.eval()


def test_accuracy(fn: object, test: TensorDataset, batch: int = 500) -> float:
    """Top-1 accuracy of ``fn`` (a module, or a callable taking a batch) on ``test``."""
    if isinstance(fn, nn.Module):
        return accuracy(fn, test, batch)
    x, y = test.tensors
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), batch):
            out = fn(x[i : i + batch].contiguous())  # type: ignore[operator]
            correct += int((torch.as_tensor(out).argmax(1) == y[i : i + batch]).sum())
    return correct / max(len(x), 1)
