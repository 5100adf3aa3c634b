"""Reproduce BitNet (METHODS.md §1) on Fashion-MNIST and MNIST-5k with an MLP.

For each dataset: a float baseline at the best of 3 Adam learning rates (3 seeds each), and BitNet
at the float's best LR with the paper's settings (λ1 = 1e-3, μ = 1e-3 halved every 200 steps, batch
200, B0 = 8, all layers learn B) for each bit-cost weight λ2 in ``--lambda2`` (the paper's 1e-6,
and our 1e-5 and 3e-5: here 1e-6 balances λ1·ΔQ against λ2·2^B at 7–8 bits; about every ×8 in λ2
moves the balance down one bit, since ΔQ ∝ 4^−B). Reports test error (mean ± spread over seeds), average bits per layer,
the iterations BitNet needs to reach the float model's final accuracy, and a bits-per-layer plot.

    PYTHONPATH=. .venv/bin/python examples/reproduce_bitnet.py            # ≈ 9 min on one core
    PYTHONPATH=. .venv/bin/python examples/reproduce_bitnet.py --datasets fashion-mnist
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
SCHEME = "bitnet:first_last=quantize,lambda2={}"  # the paper quantizes every layer
BATCH = 200


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10)
    )


def spread(xs: list[float]) -> str:
    return f"{100 * statistics.mean(xs):.2f} ± {100 * (max(xs) - min(xs)) / 2:.2f}"


def run(name: str, epochs: int, limit: int | None, lambda2s: list[float]) -> dict:
    train, test = datasets.load(name, "train"), datasets.load(name, "test")
    if limit:
        train = torch.utils.data.Subset(train, range(limit))
    out: dict = {"dataset": name, "epochs": epochs, "float": {}, "bitnet": {}}
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
    for lambda2, seed in ((l2, s) for l2 in lambda2s for s in SEEDS):
        torch.manual_seed(seed)
        net = bc.prepare(mlp(), SCHEME.format(lambda2))
        h = fit(net, train, epochs, lr=best_lr, val_data=test, progress=False, batch_size=BATCH, seed=seed)
        float_final = out["float"][best_lr][SEEDS.index(seed)]["acc"]
        reach = next((s for s, a in zip(h.val_steps, h.val_accuracy) if a >= float_final), None)
        float_reach = next(
            s
            for s, a in zip(h.val_steps, out["float"][best_lr][SEEDS.index(seed)]["curve"])
            if a >= float_final
        )
        final_bits = {k: v[-1] for k, v in h.bits.items()}
        out["bitnet"].setdefault(lambda2, []).append(
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
            f"{name} bitnet λ2={lambda2:g} seed={seed}: acc {100 * h.val_accuracy[-1]:.2f} bits {final_bits} "
            f"steps to float's {100 * float_final:.2f}: {reach} (float: {float_reach})",
            flush=True,
        )
    return out


def plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 3.2), squeeze=False)
    for ax, r in zip(axes[0], results):
        for (lambda2, runs), style in zip(r["bitnet"].items(), ("-", "--", ":", "-.")):
            for layer, traj in runs[0]["trajectory"].items():
                ax.plot(traj, style, label=f"layer {layer}, λ2={lambda2:g}", lw=1)
        ax.set(title=f"BitNet bits per layer, {r['dataset']} (seed 0)", xlabel="optimizer step", ylabel="B")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def table(results: list[dict]) -> str:
    header = (
        "| dataset | epochs | float (best LR) test error % | λ2 | BitNet test error % | Δ vs float (pt) "
        "| BitNet avg bits/layer (per seed) | steps to float's final acc: BitNet / float |"
    )
    rows = [header, "|---|---|---|---|---|---|---|---|"]
    for r in results:
        f = [1 - x["acc"] for x in r["float"][r["best_lr"]]]
        for lambda2, runs in r["bitnet"].items():
            b = [1 - x["acc"] for x in runs]
            avg = [statistics.mean(x["bits"].values()) for x in runs]
            steps = " ".join(f"{x['steps_to_float'] or 'never'}/{x['float_steps']}" for x in runs)
            delta = 100 * (statistics.mean(b) - statistics.mean(f))
            rows.append(
                f"| {r['dataset']} | {r['epochs']} | {spread(f)} (lr {r['best_lr']:g}) | {lambda2:g} | "
                f"{spread(b)} | {delta:+.2f} | {statistics.mean(avg):.2f} "
                f"({', '.join(str(x['bits']) for x in runs)}) | {steps} |"
            )
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default="/tmp/bitnet_results.json")
    p.add_argument("--lambda2", default="1e-6,1e-5,3e-5", help="comma-separated bit-cost weights λ2 to run")
    p.add_argument("--plot", default="docs/img/bitnet_bits.png", help="where the bits-per-layer plot goes")
    p.add_argument("--datasets", default="fashion-mnist,mnist-5k", help="comma-separated subset to run")
    args = p.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    plan = (
        [("fashion-mnist", 1, 2000), ("mnist-5k", 2, None)]
        if args.quick
        else [("fashion-mnist", 6, None), ("mnist-5k", 30, None)]
    )
    lambda2s = [float(x) for x in args.lambda2.split(",")]
    wanted = args.datasets.split(",")
    results = [run(name, epochs, limit, lambda2s) for name, epochs, limit in plan if name in wanted]
    plot(results, args.plot)
    print(table(results))
    print(f"wall time {time.perf_counter() - start:.0f} s")
    with open(args.out, "w") as f:
        json.dump(results, f, default=str)


if __name__ == "__main__":
    main()
