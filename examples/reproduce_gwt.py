"""Reproduce exact backprop with group weight transforms (METHODS.md §3) on Fashion-MNIST.

MLP 784->128->10, all layers binary (first_last=quantize), float activations; the same float
recipe for every run: SGD momentum 0.9, lr 0.1, cosine, wd 1e-4. Compares float, straight-through
binary (``binary``) and ``gwt`` (τ annealed 1 -> 100 over the run). For gwt it reports the binarized
network's accuracy (exactly what compiles), the training-mode network's, and their gap per epoch.
Run: ``PYTHONPATH=. python examples/reproduce_gwt.py``.
"""

from __future__ import annotations

import os
import sys

import torch

torch.set_num_threads(1)

from torch import nn

import bitcompiler as bc
from bitcompiler import datasets
from bitcompiler.methods import gwt
from bitcompiler.train import accuracy

sys.path.insert(0, os.path.dirname(__file__))
from _recipe import mean_spread, train

SEEDS = [int(s) for s in os.environ.get("SEEDS", "0,1,2").split(",")]
EPOCHS = int(os.environ.get("GWT_EPOCHS", "4"))
BATCH = 128


def mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 10))


def main() -> None:
    tr, te = datasets.load("fashion-mnist", "train"), datasets.load("fashion-mnist", "test")
    steps = EPOCHS * -(-len(tr) // BATCH)
    results: dict[str, list[float]] = {
        "float": [],
        "binary (STE)": [],
        "gwt binarized": [],
        "gwt train-mode": [],
    }
    gaps: list[float] = []
    trace: list[tuple] = []
    for seed in SEEDS:
        for label, scheme in (("float", None), ("binary (STE)", "binary:first_last=quantize")):
            torch.manual_seed(seed)
            model = mlp() if scheme is None else bc.prepare(mlp(), scheme)
            train(model, tr, EPOCHS, seed=seed, batch_size=BATCH)
            results[label].append(accuracy(model, te))
        torch.manual_seed(seed)
        model = bc.prepare(mlp(), "gwt:first_last=quantize,tau_start=1,tau_end=100")
        gwt.set_tau_schedule(model, steps)

        def log(epoch: int, model=model, seed=seed) -> None:
            if seed == SEEDS[0]:
                g = gwt.binarization_gap(model, te)
                trace.append(
                    (
                        epoch + 1,
                        g["tau"],
                        g["weight_distance"],
                        g["train_mode_accuracy"],
                        g["binarized_accuracy"],
                        g["gap"],
                    )
                )
                print(f"[gwt] epoch {epoch + 1}: {g}", file=sys.stderr, flush=True)

        train(model, tr, EPOCHS, seed=seed, batch_size=BATCH, on_epoch=log)
        g = gwt.binarization_gap(model, te)
        results["gwt binarized"].append(g["binarized_accuracy"])
        results["gwt train-mode"].append(g["train_mode_accuracy"])
        gaps.append(g["gap"])
        print(f"[gwt] seed {seed}: { ({k: v[-1] for k, v in results.items()}) }", file=sys.stderr, flush=True)
    print(f"\n### MLP 784-128-10 on Fashion-MNIST ({EPOCHS} epochs, seeds {SEEDS})\n")
    print("| network | test accuracy % (mean ± half-range) |")
    print("|---|---|")
    for k, v in results.items():
        print(f"| {k} | {mean_spread(v)} |")
    print(f"| gap train-mode − binarized (points) | {mean_spread(gaps)} |")
    print(f"\n### gwt: gap per epoch (seed {SEEDS[0]}; τ grows geometrically)\n")
    print("| epoch | τ | ‖w − w_bin‖/‖w_bin‖ | train-mode acc % | binarized acc % | gap (points) |")
    print("|---|---|---|---|---|---|")
    for e, tau, d, a, b, gap in trace:
        print(f"| {e} | {tau:.1f} | {d:.4f} | {100 * a:.2f} | {100 * b:.2f} | {100 * gap:.2f} |")


if __name__ == "__main__":
    main()
