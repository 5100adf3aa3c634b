"""A benchmark's data: a named dataset or a folder, and each scheme trained on it with ``train.fit``."""

from __future__ import annotations

import copy
import hashlib
import multiprocessing
import os
import pickle
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

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


def train_all(
    model: nn.Module,
    schemes: list[str],
    train: TensorDataset,
    epochs: int,
    workers: int,
    done: Callable[[str], None] = lambda scheme: None,
) -> dict[str, nn.Module]:
    """:func:`trained` for every scheme, in ``workers`` processes of one thread each when
    ``workers`` > 1. On a few cores that beats one process of several threads: training this small
    a network keeps threads waiting on each other, and on a busy host waiting threads spin.
    ``done(scheme)`` is called as each finishes."""
    if workers <= 1 or len(schemes) <= 1 or not _picklable(model):
        nets = {}
        for s in schemes:
            nets[s] = trained(model, s, train, epochs)
            done(s)
        return nets
    # fork: the workers share the training data with this process instead of each receiving a copy
    ctx = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(min(workers, len(schemes)), ctx, _worker_init, (train,)) as pool:
        futures = {pool.submit(_worker_train, model, s, epochs): s for s in schemes}
        nets = {}
        for f in as_completed(futures):
            nets[futures[f]] = f.result()
            done(futures[f])
    return {s: nets[s] for s in schemes}


_WORKER_DATA: TensorDataset | None = None


def _picklable(model: nn.Module) -> bool:
    """Whether ``model`` can be sent to a worker (a model holding a lambda cannot: it trains here)."""
    try:
        pickle.dumps(model)
    except Exception:  # noqa: BLE001 - pickling raises several types
        return False
    return True


def _worker_init(train: TensorDataset) -> None:
    global _WORKER_DATA
    torch.set_num_threads(1)
    _WORKER_DATA = train


def _worker_train(model: nn.Module, scheme: str, epochs: int) -> nn.Module:
    assert _WORKER_DATA is not None
    return trained(model, scheme, _WORKER_DATA, epochs)


def program_key(gm: torch.fx.GraphModule) -> str | None:
    """A fingerprint of a reference program: its code and every tensor it reads. Two programs with
    the same key compute the same function, so their test accuracy is measured once. None when
    the program calls a submodule or reads an attribute that is not a tensor (it is not shared)."""
    h = hashlib.sha256(gm.code.encode())
    for node in gm.graph.nodes:
        if node.op == "call_module":  # torch.nn's own modules are what their repr and tensors say
            sub = gm.get_submodule(str(node.target))
            if not type(sub).__module__.startswith("torch.nn.") or len(list(sub.children())):
                return None
            h.update(f"{node.target}:{sub!r}".encode())
            for name, t in sub.state_dict().items():
                _update(h, f"{node.target}.{name}", t)
            continue
        if node.op != "get_attr":
            continue
        value: Any = gm
        for part in str(node.target).split("."):
            value = getattr(value, part)
        if not isinstance(value, torch.Tensor):
            return None
        _update(h, str(node.target), value)
    return h.hexdigest()


def _update(h: Any, name: str, t: torch.Tensor) -> None:
    t = t.detach().cpu().contiguous()
    h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())


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
