"""Group weight transforms (docs/methods.md §3): binary weights trained with exact gradients.

Each group of real parameters θ_g (default: one output channel) is mapped by a deterministic,
differentiable :class:`GroupTransform` to training weights; the default :class:`TanhTransform` is
``w = a_g · tanh(τ·z)`` with ``z`` the group's standardized θ. There is no straight-through
estimator: autograd differentiates the transform exactly. τ stays at ``tau_start`` for the first
``tau_hold`` fraction of ``tau_steps`` calls of :meth:`GWTWeight.step` (one per optimizer step), then
grows geometrically to ``tau_end``, so the training weights approach their binarized version
``a_g · sign(z)``, which is what compiles. The hold (default 0.5) matters: with τ rising from the
first step, tanh saturates early, most weights stop receiving gradient, and the binarized MLP of
REPRODUCTIONS.md lands ≈2 pt lower. At τ≈1 the transform also shrinks gradients (dw/dθ ≈ 0.3–0.4
on average), so it wants a few times the float learning rate ("large learning rates").

    >>> import torch, bitcompiler as bc
    >>> from bitcompiler.methods import gwt
    >>> net = bc.prepare(torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2)),
    ...                  scheme="gwt:first_last=quantize")
    >>> gwt.set_tau_schedule(net, total_steps=100)
    >>> with gwt.binarized(net):
    ...     y = net(torch.randn(4, 8))   # exactly the compiled (binary) weights
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Protocol

import torch
from torch import nn
from torch.utils.data import Dataset

from bitcompiler.quant import numerics
from bitcompiler.quant.modules import WeightCodes, register_weight_quantizer


class GroupTransform(Protocol):
    """Maps real parameters θ to weights: differentiable ``weight(θ, τ)`` and exact ``binary(θ)``."""

    def weight(self, theta: torch.Tensor, tau: float) -> torch.Tensor: ...

    def binary(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """``(pm1 codes shaped like θ, scale per output channel, number of stored scales)``."""
        ...


class TanhTransform:
    """The default transform (ours, see docs/methods.md §3): ``a_g · tanh(τ·z)`` -> ``a_g · sign(z)``."""

    def __init__(self, group: int | None = None) -> None:
        self.group = group

    def weight(self, theta: torch.Tensor, tau: float) -> torch.Tensor:
        return numerics.gwt_weight(theta, tau, self.group)

    def binary(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        return numerics.gwt_binary(theta, self.group)

    def __repr__(self) -> str:
        return f"TanhTransform(group={'channel' if self.group is None else self.group})"


class GWTWeight(nn.Module):
    """Weight quantizer of the ``gwt`` scheme: transform in training, exact binary codes for inference.

    ``binarize=True`` (see :func:`binarized`) makes the forward use the binary weights the
    compiler will see, to measure the gap between the training-mode and the binarized network.
    """

    bits = 1
    tau: torch.Tensor
    steps: torch.Tensor

    def __init__(
        self,
        transform: GroupTransform | None = None,
        tau_start: float = 1.0,
        tau_end: float = 100.0,
        tau_steps: int = 1000,
        tau_hold: float = 0.5,
    ) -> None:
        super().__init__()
        if not (0 < tau_start <= tau_end):
            raise ValueError(f"gwt needs 0 < tau_start <= tau_end, got {tau_start} and {tau_end}")
        if not (0 <= tau_hold < 1):
            raise ValueError(f"gwt needs 0 <= tau_hold < 1, got {tau_hold}")
        self.transform = transform or TanhTransform()
        self.tau_start, self.tau_end, self.tau_steps = float(tau_start), float(tau_end), int(tau_steps)
        self.tau_hold = float(tau_hold)
        self.register_buffer("tau", torch.tensor(float(tau_start)))
        self.register_buffer("steps", torch.tensor(0))
        self.binarize = False

    def step(self) -> None:
        """One optimizer step done: τ = τ0·(τ1/τ0)^f, f = clamp((t/T − hold)/(1 − hold), 0, 1)."""
        self.steps += 1
        frac = min(int(self.steps) / max(self.tau_steps, 1), 1.0)
        frac = max(frac - self.tau_hold, 0.0) / (1.0 - self.tau_hold)
        self.tau.fill_(self.tau_start * (self.tau_end / self.tau_start) ** frac)

    def set_schedule(self, total_steps: int) -> None:
        self.tau_steps = int(total_steps)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if self.binarize:
            c = self.codes(w)
            return numerics.dequantize(c.q, c.scale, c.offset).to(w.dtype)
        return self.transform.weight(w, float(self.tau))

    def codes(self, w: torch.Tensor) -> WeightCodes:
        q, scale, groups = self.transform.binary(w)
        return WeightCodes(q, "pm1", 1, scale, torch.zeros_like(scale), n_floats=groups)

    def extra_repr(self) -> str:
        return (
            f"{self.transform!r}, tau={float(self.tau):.3g} -> {self.tau_end:g} over {self.tau_steps} steps "
            f"(held for the first {self.tau_hold:.0%})"
        )


def quantizers(model: nn.Module) -> list[GWTWeight]:
    return [m for m in model.modules() if isinstance(m, GWTWeight)]


def set_tau_schedule(model: nn.Module, total_steps: int) -> None:
    """Anneal τ of every ``gwt`` layer over ``total_steps`` optimizer steps (e.g. epochs × batches)."""
    for q in quantizers(model):
        q.set_schedule(total_steps)


def step(model: nn.Module) -> None:
    """Call after each optimizer step (``bitcompiler.step(model)`` does this for every quantizer)."""
    for q in quantizers(model):
        q.step()


@contextlib.contextmanager
def binarized(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, every ``gwt`` layer uses its exact binary weights (what compiles)."""
    qs = quantizers(model)
    old = [q.binarize for q in qs]
    for q in qs:
        q.binarize = True
    try:
        yield model
    finally:
        for q, b in zip(qs, old):
            q.binarize = b


def binarization_gap(model: nn.Module, data: Dataset | None = None) -> dict[str, float]:
    """How far the training-mode network is from its binarized version.

    Always: ``weight_distance`` (‖w − w_bin‖/‖w_bin‖ over all gwt layers) and the current ``tau``.
    With ``data``: ``train_mode_accuracy``, ``binarized_accuracy`` and ``gap`` (their difference),
    both evaluated in eval mode. The gap vanishes as τ grows.
    """
    from bitcompiler.quant.modules import QUANT_LAYERS
    from bitcompiler.train import accuracy

    ws, wbs, taus = [], [], []
    for layer in model.modules():
        if isinstance(layer, QUANT_LAYERS) and isinstance(layer.wq, GWTWeight):
            with torch.no_grad():
                ws.append(layer.wq.transform.weight(layer.weight, float(layer.wq.tau)).reshape(-1))
                c = layer.wq.codes(layer.weight)
                wbs.append(numerics.dequantize(c.q, c.scale, c.offset).reshape(-1))
            taus.append(float(layer.wq.tau))
    out = {
        "weight_distance": numerics.relative_distance(torch.cat(ws), torch.cat(wbs)) if ws else 0.0,
        "tau": min(taus) if taus else float("nan"),
    }
    if data is not None:
        out["train_mode_accuracy"] = accuracy(model, data)
        with binarized(model):
            out["binarized_accuracy"] = accuracy(model, data)
        out["gap"] = out["train_mode_accuracy"] - out["binarized_accuracy"]
    return out


@register_weight_quantizer("gwt")
def from_scheme(scheme) -> GWTWeight:
    group = scheme.get("group")
    return GWTWeight(
        TanhTransform(None if group == "channel" else int(group)),
        float(scheme.get("tau_start")),
        float(scheme.get("tau_end")),
        int(scheme.get("tau_steps")),
        float(scheme.get("tau_hold")),
    )
