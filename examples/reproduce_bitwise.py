"""Reproduce bit-wise training (METHODS.md §2) on Fashion-MNIST with a small CNN.

Float vs sign-only vs top-2-of-6 vs all bits (6 magnitude bits + sign, Adam lr 1e-3), plus a run
whose frozen bits hold a random payload (bits=7, sign trained: 7 of 8 bits per weight frozen) that
must come back unchanged after training. First and last layers stay 8-bit affine (bitcompiler's
default). Reports test error (mean ± spread over 3 seeds), zero-weight fraction, frozen fraction.

    PYTHONPATH=. .venv/bin/python examples/reproduce_bitwise.py           # ≈ 10 min on one core (20k images, 2 epochs)
    PYTHONPATH=. .venv/bin/python examples/reproduce_bitwise.py --quick   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch import nn

import bitcompiler as bc
from bitcompiler import datasets, payload
from bitcompiler.methods import bitwise
from bitcompiler.train import fit

SEEDS = (0, 1, 2)
CONFIGS = {
    "float": None,
    "sign only": "bitwise:bits=6,train=sign",
    "top-2 of 6": "bitwise:bits=6,train=top2",
    "all bits": "bitwise:bits=6,train=all",
    "payload (7 bits, sign trained)": "bitwise:bits=7,train=sign",
}


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 7 * 7, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


def spread(xs: list[float], scale: float = 100) -> str:
    return f"{scale * statistics.mean(xs):.2f} ± {scale * (max(xs) - min(xs)) / 2:.2f}"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--train-limit", type=int, default=20000, help="first N training images (0: all 60,000)")
    p.add_argument("--out", default="/tmp/bitwise_results.json")
    args = p.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    train, test = datasets.load("fashion-mnist", "train"), datasets.load("fashion-mnist", "test")
    epochs = 1 if args.quick else args.epochs
    limit = 2000 if args.quick else args.train_limit
    if limit:
        train = torch.utils.data.Subset(train, range(limit))
    results: dict[str, list[dict]] = {}
    for label, scheme in CONFIGS.items():
        results[label] = []
        for seed in SEEDS:
            torch.manual_seed(seed)
            net = cnn() if scheme is None else bc.prepare(cnn(), scheme)
            data = b""
            if label.startswith("payload"):
                data = bytes(
                    torch.randint(
                        0, 256, (payload.capacity(net),), generator=torch.Generator().manual_seed(100 + seed)
                    ).tolist()
                )
                payload.embed(net, data)
            h = fit(net, train, epochs, lr=1e-3, val_data=test, progress=False, seed=seed)
            r = {"acc": h.val_accuracy[-1], "seconds": h.seconds}
            if scheme is not None:
                r.update(zeros=bitwise.sparsity(net), frozen=bitwise.frozen_fraction(net))
            if data:
                r.update(payload_bytes=len(data), payload_intact=payload.extract(net, len(data)) == data)
            results[label].append(r)
            print(f"{label} seed={seed}: {r}", flush=True)
    rows = [
        "| config | test error % | Δ vs float (pt) | zero weights % | frozen bits % |",
        "|---|---|---|---|---|",
    ]
    f_err = statistics.mean(1 - r["acc"] for r in results["float"])
    for label, runs in results.items():
        err = [1 - r["acc"] for r in runs]
        zeros = spread([r["zeros"] for r in runs]) if "zeros" in runs[0] else "-"
        frozen = f"{100 * runs[0]['frozen']:.1f}" if "frozen" in runs[0] else "-"
        extra = (
            f" (payload {runs[0]['payload_bytes']} B, intact: {all(r['payload_intact'] for r in runs)})"
            if "payload_bytes" in runs[0]
            else ""
        )
        rows.append(
            f"| {label}{extra} | {spread(err)} | {100 * (statistics.mean(err) - f_err):+.2f} | {zeros} | {frozen} |"
        )
    print("\n".join(rows))
    print(f"epochs {epochs}, train images {len(train)}, wall time {time.perf_counter() - start:.0f} s")
    with open(args.out, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()
