"""Reproduce BitNet (docs/methods.md §1) on Fashion-MNIST and MNIST-5k with an MLP or a small CNN.

For each dataset: a float baseline at the best of 3 Adam learning rates (3 seeds each), and BitNet
at the float's best LR with the paper's settings (λ1 = 1e-3, μ = 1e-3 halved every 200 steps, batch
200, B0 = 8, all layers learn B) for each bit-cost weight λ2 in ``--lambda2`` (the paper's 1e-6,
and our 1e-5 and 3e-5: here 1e-6 balances λ1·ΔQ against λ2·2^B at 7–8 bits; about every ×8 in λ2
moves the balance down one bit, since ΔQ ∝ 4^−B). Reports test error (mean ± spread over seeds), average bits per layer,
the iterations BitNet needs to reach the float model's final accuracy, and a bits-per-layer plot.
``--mode`` picks the paper's training mode(s): ``quantized`` (CE on the quantized net, straight-through
gradient; the scheme's default) and/or ``float`` (CE on the real weights, quantized at eval).

    PYTHONPATH=. .venv/bin/python examples/reproduce_bitnet.py            # ≈ 9 min on one core
    PYTHONPATH=. .venv/bin/python examples/reproduce_bitnet.py --datasets fashion-mnist
    PYTHONPATH=. .venv/bin/python examples/reproduce_bitnet.py --model cnn --lambda2 1e-5 --epochs 2
    PYTHONPATH=. .venv/bin/python examples/reproduce_bitnet.py --mode quantized,float --lambda2 1e-5
    PYTHONPATH=. .venv/bin/python examples/reproduce_bitnet.py --quick    # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
from torch import nn

import bitcompiler as bc
from bitcompiler import datasets
from bitcompiler.train import fit

sys.path.insert(0, os.path.dirname(__file__))
from reproduce_bitwise import cnn  # the small CNN: conv 1→8, conv 8→16 (3×3, pad 1, max-pool 2), fc 784→64→10

SEEDS = (0, 1, 2)
LRS = (3e-4, 1e-3, 3e-3)
SCHEME = "bitnet:first_last=quantize,lambda2={},mode={}"  # the paper quantizes every layer
BATCH = 200


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10)
    )


MODELS = {"mlp": mlp, "cnn": cnn}


def spread(xs: list[float]) -> str:
    return f"{100 * statistics.mean(xs):.2f} ± {100 * (max(xs) - min(xs)) / 2:.2f}"


def run(
    name: str,
    epochs: int,
    limit: int | None,
    lambda2s: list[float],
    model: str,
    modes: list[str],
    lrs: tuple[float, ...] = LRS,
) -> dict:
    make = MODELS[model]
    train, test = datasets.load(name, "train"), datasets.load(name, "test")
    if limit:
        train = torch.utils.data.Subset(train, range(limit))
    out: dict = {"dataset": name, "model": model, "epochs": epochs, "limit": limit, "float": {}, "bitnet": []}
    for lr in lrs:
        runs = []
        for seed in SEEDS:
            torch.manual_seed(seed)
            h = fit(make(), train, epochs, lr=lr, val_data=test, progress=False, batch_size=BATCH, seed=seed)
            runs.append({"acc": h.val_accuracy[-1], "curve": h.val_accuracy, "seconds": h.seconds})
        out["float"][lr] = runs
        print(
            f"{name} {model} float lr={lr:g}: test acc {spread([r['acc'] for r in runs])} "
            f"({sum(r['seconds'] for r in runs):.0f} s)",
            flush=True,
        )
    best_lr = max(lrs, key=lambda lr: statistics.mean(r["acc"] for r in out["float"][lr]))
    out["best_lr"] = best_lr
    for mode in modes:
        for lambda2 in lambda2s:
            runs = []
            for seed in SEEDS:
                torch.manual_seed(seed)
                net = bc.prepare(make(), SCHEME.format(lambda2, mode))
                h = fit(
                    net, train, epochs, lr=best_lr, val_data=test, progress=False, batch_size=BATCH, seed=seed
                )
                twin = out["float"][best_lr][SEEDS.index(seed)]
                float_final = twin["acc"]
                reach = next((s for s, a in zip(h.val_steps, h.val_accuracy) if a >= float_final), None)
                float_reach = next(s for s, a in zip(h.val_steps, twin["curve"]) if a >= float_final)
                final_bits = {k: v[-1] for k, v in h.bits.items()}
                runs.append(
                    {
                        "acc": h.val_accuracy[-1],
                        "bits": final_bits,
                        "trajectory": h.bits,
                        "steps_to_float": reach,
                        "float_steps": float_reach,
                        "seconds": h.seconds,
                    }
                )
                print(
                    f"{name} {model} bitnet mode={mode} λ2={lambda2:g} seed={seed}: acc {100 * h.val_accuracy[-1]:.2f} "
                    f"bits {final_bits} steps to float's {100 * float_final:.2f}: {reach} (float: {float_reach}) "
                    f"({h.seconds:.0f} s)",
                    flush=True,
                )
            out["bitnet"].append({"mode": mode, "lambda2": lambda2, "runs": runs})
    return out


def plot(results: list[dict], path: str, window: int = 50) -> None:
    """One panel per dataset × BitNet setting (seed 0): every layer's B after each step (thin; B often
    flips ±1 every step) and its ``window``-step running mean (bold)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(r, b) for r in results for b in r["bitnet"]]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.4), squeeze=False, sharey=True)
    for ax, (r, b) in zip(axes[0], panels):
        for i, (layer, traj) in enumerate(b["runs"][0]["trajectory"].items()):
            t = torch.tensor(traj, dtype=torch.float)
            smooth = t.unfold(0, window, 1).mean(1) if len(t) >= window else t
            ax.plot(t, color=f"C{i}", lw=0.4, alpha=0.35)
            ax.plot(
                range(len(t) - len(smooth), len(t)), smooth, color=f"C{i}", lw=1.8, label=f"layer {layer}"
            )
        ax.set(
            title=f"{r['dataset']} {r['model']}, mode={b['mode']}, λ2={b['lambda2']:g}",
            xlabel="optimizer step",
            ylabel="B (bold: running mean)",
        )
        ax.title.set_fontsize("medium")
        ax.legend(fontsize="small")
    fig.suptitle("BitNet bits per layer (seed 0)", fontsize="medium")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def table(results: list[dict]) -> str:
    header = (
        "| dataset | model | epochs | float (best LR) test error % | mode | λ2 | BitNet test error % | Δ vs float (pt) "
        "| BitNet avg bits/layer (per seed) | steps to float's final acc: BitNet / float |"
    )
    rows = [header, "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        f = [1 - x["acc"] for x in r["float"][r["best_lr"]]]
        for bn in r["bitnet"]:
            runs = bn["runs"]
            b = [1 - x["acc"] for x in runs]
            avg = [statistics.mean(x["bits"].values()) for x in runs]
            steps = " ".join(f"{x['steps_to_float'] or 'never'}/{x['float_steps']}" for x in runs)
            delta = 100 * (statistics.mean(b) - statistics.mean(f))
            rows.append(
                f"| {r['dataset']} | {r['model']} | {r['epochs']} | {spread(f)} (lr {r['best_lr']:g}) | {bn['mode']} "
                f"| {bn['lambda2']:g} | {spread(b)} | {delta:+.2f} | {statistics.mean(avg):.2f} "
                f"({', '.join(str(x['bits']) for x in runs)}) | {steps} |"
            )
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default="/tmp/bitnet_results.json")
    p.add_argument("--lambda2", default="1e-6,1e-5,3e-5", help="comma-separated bit-cost weights λ2 to run")
    p.add_argument(
        "--plot",
        default="/tmp/bitnet_bits.png",
        help="where the bits-per-layer plot goes (the committed one: docs/img/)",
    )
    p.add_argument("--datasets", default="fashion-mnist,mnist-5k", help="comma-separated subset to run")
    p.add_argument(
        "--model", default="mlp", choices=sorted(MODELS), help="MLP 784-256-128-10 or the small CNN"
    )
    p.add_argument(
        "--mode",
        default="quantized",
        help="comma-separated BitNet training modes: quantized (default), float",
    )
    p.add_argument(
        "--epochs", type=int, default=None, help="override the epochs of every dataset (budget cuts)"
    )
    p.add_argument("--limit", type=int, default=None, help="train on the first N training images only")
    p.add_argument(
        "--lrs",
        default=",".join(f"{lr:g}" for lr in LRS),
        help="float baseline's Adam learning rates (the best one is BitNet's); one LR re-runs a known best",
    )
    args = p.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    plan = (
        [("fashion-mnist", 1, 2000), ("mnist-5k", 2, None)]
        if args.quick
        else [("fashion-mnist", 6, None), ("mnist-5k", 30, None)]
    )
    plan = [(name, args.epochs or epochs, args.limit or limit) for name, epochs, limit in plan]
    lambda2s = [float(x) for x in args.lambda2.split(",")]
    modes = args.mode.split(",")
    lrs = tuple(float(x) for x in args.lrs.split(","))
    wanted = args.datasets.split(",")
    results = [
        run(name, epochs, limit, lambda2s, args.model, modes, lrs)
        for name, epochs, limit in plan
        if name in wanted
    ]
    plot(results, args.plot)
    print(table(results))
    print(f"wall time {time.perf_counter() - start:.0f} s")
    with open(args.out, "w") as f:
        json.dump(results, f, default=str)


if __name__ == "__main__":
    main()
