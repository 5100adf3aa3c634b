"""A plain training loop for float and ``prepare``d models, with a progress bar.

>>> import torch, bitcompiler as bc
>>> from torch.utils.data import TensorDataset
>>> data = TensorDataset(torch.randn(64, 8), torch.randint(0, 2, (64,)))
>>> net = bc.prepare(torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2)))
>>> history = bc.train.fit(net, data, epochs=1, progress=False)
>>> len(history.loss) > 0
True
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

if TYPE_CHECKING:
    from bitcompiler.quant.modules import QuantConv2d, QuantLinear


@dataclass
class History:
    loss: list[float] = field(default_factory=list)  # the full training loss (CE + regularization)
    train_accuracy: list[float] = field(default_factory=list)
    val_accuracy: list[float] = field(default_factory=list)
    seconds: float = 0.0
    steps: int = 0
    bits: dict[str, list[int]] = field(
        default_factory=dict
    )  # weight bits per quantized layer, after each step
    val_steps: list[int] = field(default_factory=list)  # optimizer steps done at each val_accuracy entry
    lr: list[float] = field(default_factory=list)  # learning rate (first param group) of each step


def _quant_layers(model: nn.Module) -> list[tuple[str, QuantLinear | QuantConv2d]]:
    from bitcompiler.quant.modules import QUANT_LAYERS

    return [(name, m) for name, m in model.named_modules() if isinstance(m, QUANT_LAYERS)]


def regularization_loss(model: nn.Module) -> torch.Tensor:
    """Sum of the weight quantizers' ``regularization(weight)`` terms (0 if none has one).

    Add it to the task loss; :func:`fit` does. BitNet's is ``λ1·½‖W_q − W‖² + λ2·2^B``::

        >>> import torch, bitcompiler as bc
        >>> net = bc.prepare(torch.nn.Sequential(torch.nn.Linear(4, 2)), "bitnet:first_last=quantize")
        >>> float(bc.regularization_loss(net).detach()) > 0
        True
    """
    terms = [
        m.wq.regularization(m.weight) for _, m in _quant_layers(model) if hasattr(m.wq, "regularization")
    ]
    return torch.stack(terms).sum() if terms else torch.zeros(())


def step(model: nn.Module) -> None:
    """Call after each optimizer step: every weight quantizer with a ``step()`` (BitNet's bit update,
    gwt's τ schedule) takes it. :func:`fit` does."""
    for _, m in _quant_layers(model):
        if hasattr(m.wq, "step"):
            m.wq.step()


def layer_bits(model: nn.Module) -> dict[str, int]:
    """Weight bits of every quantized layer by name (BitNet's learned B, fixed depths otherwise)."""
    return {name: int(m.wq.bits) for name, m in _quant_layers(model) if hasattr(m.wq, "bits")}


@torch.no_grad()
def _loader(data: Dataset | DataLoader, batch_size: int, shuffle: bool) -> DataLoader:
    """A DataLoader over ``data``; a DataLoader is used as it is (its own batch size and order)."""
    if isinstance(data, DataLoader):
        return data
    if not hasattr(data, "__getitem__") or not hasattr(data, "__len__"):
        raise TypeError(
            f"expected a Dataset of (input, label) pairs or a DataLoader, got {type(data).__name__}"
        )
    return DataLoader(data, batch_size=batch_size, shuffle=shuffle)


def accuracy(model: nn.Module, data: Dataset | DataLoader, batch_size: int = 1000) -> float:
    """Top-1 accuracy of ``model`` (eval mode) on a dataset of (input, label) pairs or a DataLoader."""
    was_training = model.training
    model.eval()
    correct = total = 0
    for x, y in _loader(data, batch_size, shuffle=False):
        correct += (model(x).argmax(1) == y).sum().item()
        total += len(y)
    model.train(was_training)
    return correct / max(total, 1)


def _optimizer(
    model: nn.Module, optimizer: torch.optim.Optimizer | None, lr: float | None, schedule: str | None
) -> tuple[torch.optim.Optimizer, str]:
    """The optimizer and schedule ``fit`` uses: the scheme's recipe when neither is given."""
    from bitcompiler.recipes import recipe, scheme_of, warnings_for

    scheme = scheme_of(model)
    if scheme is not None:
        for problem in warnings_for(model, scheme):
            warnings.warn(problem, stacklevel=3)
    if optimizer is not None:
        return optimizer, schedule or "constant"
    if lr is None:
        r = recipe(scheme if scheme is not None else "none")
        return r.make_optimizer(model.parameters()), schedule or r.schedule
    return torch.optim.Adam(model.parameters(), lr=lr), schedule or "constant"


def fit(
    model: nn.Module,
    train_data: Dataset | DataLoader,
    epochs: int = 1,
    lr: float | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    val_data: Dataset | DataLoader | None = None,
    progress: bool = True,
    batch_size: int = 128,
    time_budget: float | None = None,
    seed: int = 0,
    schedule: str | None = None,
) -> History:
    """Train with cross-entropy plus the quantizers' :func:`regularization_loss`. Without an
    ``optimizer`` and ``lr``, the recipe of the scheme ``model`` was ``prepare``d with
    (:mod:`bitcompiler.recipes`: optimizer, lr and schedule; a float model: scheme ``none``'s) is
    used; Adam at ``lr`` when only ``lr`` is given. Warns about a model the scheme's method is known to fail on. ``train_data`` is a Dataset of (input, label) pairs (batched by
    ``batch_size``, shuffled) or a DataLoader (used as it is). After each optimizer step the quantizers :func:`step`.

    ``schedule``: ``"constant"`` (the default without a recipe) keeps the optimizer's lr; ``"cosine"`` decays it per
    step from its initial value to 0 at the end of the last epoch (half a cosine,
    ``lr·(1 + cos(π·t/T))/2`` before step t of T = ``epochs · len(loader)``). ``History.lr`` records
    the lr of every step. ``time_budget`` (seconds) stops training early, keeping runs bounded
    (the schedule still spans all ``epochs``).
    """
    opt, schedule = _optimizer(model, optimizer, lr, schedule)
    if schedule not in ("constant", "cosine"):
        raise ValueError(f"schedule must be 'constant' or 'cosine', got {schedule!r}")
    torch.manual_seed(seed)
    loader = _loader(train_data, batch_size, shuffle=True)
    sched = (
        torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * len(loader))
        if schedule == "cosine"
        else None
    )
    history = History()
    start = time.perf_counter()
    model.train()
    for epoch in range(epochs):
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{epochs}", disable=not progress, leave=False)
        correct = seen = 0
        for x, y in bar:
            logits = model(x)
            loss = F.cross_entropy(logits, y) + regularization_loss(model)
            opt.zero_grad()
            loss.backward()
            history.lr.append(float(opt.param_groups[0]["lr"]))
            opt.step()
            if sched is not None:
                sched.step()
            step(model)
            history.loss.append(loss.item())
            history.steps += 1
            bits = layer_bits(model)
            for name, b in bits.items():
                history.bits.setdefault(name, []).append(b)
            correct += (logits.argmax(1) == y).sum().item()
            seen += len(y)
            postfix = {"loss": f"{loss.item():.3f}", "acc": f"{correct / seen:.3f}"}
            if bits:
                postfix["bits"] = f"{sum(bits.values()) / len(bits):.2f}"
            bar.set_postfix(postfix)
            if time_budget is not None and time.perf_counter() - start > time_budget:
                break
        history.train_accuracy.append(correct / max(seen, 1))
        if val_data is not None:
            history.val_accuracy.append(accuracy(model, val_data))
            history.val_steps.append(history.steps)
        if time_budget is not None and time.perf_counter() - start > time_budget:
            break
    model.eval()
    history.seconds = time.perf_counter() - start
    return history
