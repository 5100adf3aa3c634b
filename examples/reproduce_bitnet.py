"""Reproduce BitNet (METHODS.md §1) on Fashion-MNIST and MNIST-5k with an MLP.

For each dataset: a float baseline at the best of 3 Adam learning rates (3 seeds each), and BitNet
at the float's best LR with the paper's settings (λ1 = 1e-3, λ2 = 1e-6, μ = 1e-3 halved every 200 steps, batch 200, B0 = 8,
all layers learn B). Reports test error (mean ± spread over seeds), average bits per layer, the
iterations BitNet needs to reach the float model's final accuracy, and a bits-per-layer plot.

    PYTHONPATH=. .venv/bin/python examples/reproduce_bitnet.py            # ≈ 8 min on one core
    PYTHONPATH=. .venv/bin/python examples/reproduce_bitnet.py --quick    # a smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch import nn

import bitcompiler as bc
from bitcompiler import datasets
from bitcompiler.train import fit

SEEDS = (0, 1, 2)
LRS = (3e-4, 1e-3, 3e-3)
SCHEME = "bitnet:first_last=quantize"  # the paper quantizes every layer
BATCH = 200


def mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(),
                         nn.Linear(128, 10))


def spread(xs: list[float]) -> str:
    return f"{100 * statistics.mean(xs):.2f} ± {100 * (max(xs) - min(xs)) / 2:.2f}"


def run(name: str, epochs: int, limit: int | None) -> dict:
    train, test = datasets.load(name, "train"), datasets.load(name, "test")
    if limit:
        train = torch.utils.data.Subset(train, range(limit))
    out: dict = {"dataset": name, "epochs": epochs, "float": {}, "bitnet": []}
    for lr in LRS:
        runs = []
        for seed in SEEDS:
            torch.manual_seed(seed)
            h = fit(mlp(), train, epochs, lr=lr, val_data=test, progress=False, batch_size=BATCH, seed=seed)
            runs.append({"acc": h.val_accuracy[-1], "curve": h.val_accuracy, "seconds": h.seconds})
        out["float"][lr] = runs
        print(f"{name} float lr={lr:g}: test acc {spread([r['acc'] for r in runs])}", flush=True)
    best_lr = max(LRS, key=lambda lr: statistics.mean(r["acc"] for r in out["float"][lr]))
    out["best_lr"] = best_lr
    for seed in SEEDS:
        torch.manual_seed(seed)
        net = bc.prepare(mlp(), SCHEME)
        h = fit(net, train, epochs, lr=best_lr, val_data=test, progress=False, batch_size=BATCH, seed=seed)
        float_final = out["float"][best_lr][SEEDS.index(seed)]["acc"]
        reach = next((s for s, a in zip(h.val_steps, h.val_accuracy) if a >= float_final), None)
        float_reach = next(s for s, a in zip(h.val_steps, out["float"][best_lr][SEEDS.index(seed)]["curve"])
                           if a >= float_final)
        final_bits = {k: v[-1] for k, v in h.bits.items()}
        out["bitnet"].append({"acc": h.val_accuracy[-1], "bits": final_bits, "trajectory": h.bits,
                              "steps_to_float": reach, "float_steps": float_reach, "seconds": h.seconds})
        print(f"{name} bitnet seed={seed}: acc {100 * h.val_accuracy[-1]:.2f} bits {final_bits} "
              f"steps to float's {100 * float_final:.2f}: {reach} (float: {float_reach})", flush=True)
    return out


def plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 3.2), squeeze=False)
    for ax, r in zip(axes[0], results):
        for layer, traj in r["bitnet"][0]["trajectory"].items():
            ax.plot(traj, label=f"layer {layer}", lw=1)
        ax.set(title=f"BitNet bits per layer, {r['dataset']} (seed 0)", xlabel="optimizer step", ylabel="B")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def table(results: list[dict]) -> str:
    header = ("| dataset | epochs | float (best LR) test error % | BitNet test error % | BitNet avg bits/layer "
              "| steps to float's final acc: BitNet / float |")
    rows = [header, "|---|---|---|---|---|---|"]
    for r in results:
        f = [1 - x["acc"] for x in r["float"][r["best_lr"]]]
        b = [1 - x["acc"] for x in r["bitnet"]]
        avg = [statistics.mean(x["bits"].values()) for x in r["bitnet"]]
        steps = " ".join(f"{x['steps_to_float'] or 'never'}/{x['float_steps']}" for x in r["bitnet"])
        rows.append(f"| {r['dataset']} | {r['epochs']} | {spread(f)} (lr {r['best_lr']:g}) | {spread(b)} | "
                    f"{statistics.mean(avg):.2f} ({', '.join(str(x['bits']) for x in r['bitnet'])}) | {steps} |")
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default="/tmp/bitnet_results.json")
    args = p.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    plan = [("fashion-mnist", 1, 2000), ("mnist-5k", 2, None)] if args.quick else \
           [("fashion-mnist", 6, None), ("mnist-5k", 30, None)]
    results = [run(name, epochs, limit) for name, epochs, limit in plan]
    plot(results, "docs/img/bitnet_bits.png")
    print(table(results))
    print(f"wall time {time.perf_counter() - start:.0f} s")
    with open(args.out, "w") as f:
        json.dump(results, f, default=str)


if __name__ == "__main__":
    main()
