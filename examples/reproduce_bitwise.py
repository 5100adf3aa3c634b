"""Reproduce bit-wise training (docs/methods.md §2) on Fashion-MNIST with a small CNN.

Float vs sign-only vs top-2-of-6 vs all bits (6 magnitude bits + sign, Adam), plus a run whose
frozen bits hold a random payload (bits=7, sign trained: 7 of 8 bits per weight frozen) that must
come back unchanged after training. First and last layers stay 8-bit affine (bitcompiler's
default). Reports test error (mean ± spread over 3 seeds), zero-weight fraction, frozen fraction.

``--lrs`` (Adam learning rates): float runs at each and its best by mean test accuracy is kept
(there is no validation split: the lr is picked on the test set, for every arm alike).
``--bit-lrs``: every bit-wise config runs at each and is reported at its best; without it they run
at float's best lr and at 1e-3. ``--bn`` puts BatchNorm before every ReLU and ``--width`` sets
the channels (both for every arm, float included); ``--schedule cosine`` decays every arm's lr to 0
(:func:`bitcompiler.train.fit`). ``--jobs N`` runs N trainings at once in separate processes (one
thread each; same numbers).

    PYTHONPATH=. .venv/bin/python examples/reproduce_bitwise.py           # ≈ 7 min on one core (20k images, 2 epochs, lr 1e-3)
    PYTHONPATH=. .venv/bin/python examples/reproduce_bitwise.py --train-limit 0 --epochs 4 --lrs 1e-3,3e-3,1e-2 --jobs 2  # 1012 s on 2 cores
    PYTHONPATH=. .venv/bin/python examples/reproduce_bitwise.py --train-limit 0 --epochs 3 --bn --schedule cosine --lrs 3e-3,1e-2,3e-2 --bit-lrs 3e-3,1e-2,3e-2 --jobs 2  # 1277 s on 2 cores
    PYTHONPATH=. .venv/bin/python examples/reproduce_bitwise.py --train-limit 0 --epochs 3 --width 16,32,128 --bn --schedule cosine --lrs 1e-2 --bit-lrs 1e-2  # 1695 s on one core
    PYTHONPATH=. .venv/bin/python examples/reproduce_bitwise.py --quick   # a smoke run
"""

from __future__ import annotations

import argparse
import concurrent.futures
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


def cnn(width: tuple[int, int, int] = (8, 16, 64), bn: bool = False) -> nn.Module:
    """conv(1→c1)-pool-conv(c1→c2)-pool-fc(49·c2→f)-fc(f→10), ReLUs; ``bn``: BatchNorm before each
    ReLU (it folds into the compiled layers' epilogues). The same network for every arm."""
    c1, c2, f = width

    def norm(kind: type[nn.Module], c: int) -> list[nn.Module]:
        return [kind(c)] if bn else []

    return nn.Sequential(
        nn.Conv2d(1, c1, 3, padding=1),
        *norm(nn.BatchNorm2d, c1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(c1, c2, 3, padding=1),
        *norm(nn.BatchNorm2d, c2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(c2 * 7 * 7, f),
        *norm(nn.BatchNorm1d, f),
        nn.ReLU(),
        nn.Linear(f, 10),
    )


def spread(xs: list[float], scale: float = 100) -> str:
    return f"{scale * statistics.mean(xs):.2f} ± {scale * (max(xs) - min(xs)) / 2:.2f}"


_DATA: dict[int, tuple] = {}


def data(limit: int) -> tuple:
    if limit not in _DATA:
        train, test = datasets.load("fashion-mnist", "train"), datasets.load("fashion-mnist", "test")
        if limit:
            train = torch.utils.data.Subset(train, range(limit))
        _DATA[limit] = train, test
    return _DATA[limit]


def run(label: str, seed: int, lr: float, opts: dict) -> dict:
    """One training of config ``label`` (one thread); returns its test accuracy and bit statistics.

    ``opts``: epochs, limit (training images, 0: all), width, bn, schedule."""
    torch.set_num_threads(1)
    train, test = data(opts["limit"])
    scheme = CONFIGS[label]
    torch.manual_seed(seed)
    net = cnn(opts["width"], opts["bn"])
    if scheme is not None:
        net = bc.prepare(net, scheme)
    blob = b""
    if label.startswith("payload"):
        blob = bytes(
            torch.randint(
                0, 256, (payload.capacity(net),), generator=torch.Generator().manual_seed(100 + seed)
            ).tolist()
        )
        payload.embed(net, blob)
    h = fit(
        net,
        train,
        opts["epochs"],
        lr=lr,
        val_data=test,
        progress=False,
        seed=seed,
        schedule=opts["schedule"],
    )
    r = {"lr": lr, "seed": seed, "acc": h.val_accuracy[-1], "seconds": h.seconds}
    if scheme is not None:
        r.update(zeros=bitwise.sparsity(net), frozen=bitwise.frozen_fraction(net))
    if blob:
        r.update(payload_bytes=len(blob), payload_intact=payload.extract(net, len(blob)) == blob)
    return r


def run_all(pool, jobs: list[tuple[str, float]], seeds, opts: dict) -> dict:
    """Every (config, lr) in ``jobs`` at every seed, in the pool if there is one."""
    tasks = [(label, seed, lr, opts) for label, lr in jobs for seed in seeds]
    if pool is None:
        outs = (run(*t) for t in tasks)
    else:
        outs = pool.map(run, *zip(*tasks))
    results: dict[tuple[str, float], list[dict]] = {}
    for (label, seed, lr, *_), r in zip(tasks, outs):
        results.setdefault((label, lr), []).append(r)
        print(f"{label} lr={lr:g} seed={seed}: {r}", flush=True)
    return results


def mean_err(runs: list[dict]) -> float:
    return statistics.mean(1 - r["acc"] for r in runs)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--train-limit", type=int, default=20000, help="first N training images (0: all 60,000)")
    p.add_argument("--lrs", default="1e-3", help="comma-separated Adam lrs for float")
    p.add_argument(
        "--bit-lrs",
        default="",
        help="comma-separated Adam lrs for every bit-wise config (default: float's best and 1e-3)",
    )
    p.add_argument(
        "--width", default="8,16,64", help="c1,c2,f: conv1 and conv2 channels, fc1 width (every arm)"
    )
    p.add_argument("--bn", action="store_true", help="BatchNorm before every ReLU (every arm)")
    p.add_argument(
        "--schedule", default="constant", choices=["constant", "cosine"], help="lr schedule (every arm)"
    )
    p.add_argument("--jobs", type=int, default=1, help="trainings run at once, one process and thread each")
    p.add_argument("--out", default="/tmp/bitwise_results.json")
    args = p.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    epochs = 1 if args.quick else args.epochs
    limit = 2000 if args.quick else args.train_limit
    width = tuple(int(x) for x in args.width.split(","))
    opts = {"epochs": epochs, "limit": limit, "width": width, "bn": args.bn, "schedule": args.schedule}
    lrs = [float(x) for x in args.lrs.split(",")]
    pool = concurrent.futures.ProcessPoolExecutor(args.jobs) if args.jobs > 1 else None
    if args.bit_lrs:
        bit_lrs = [float(x) for x in args.bit_lrs.split(",")]
        jobs = [(label, lr) for label in CONFIGS for lr in (lrs if label == "float" else bit_lrs)]
        results = run_all(pool, jobs, SEEDS, opts)  # one pool map: no idle worker between phases
    else:
        results = run_all(pool, [("float", lr) for lr in lrs], SEEDS, opts)
        float_lr = min(lrs, key=lambda lr: mean_err(results["float", lr]))
        bit_lrs = sorted({float_lr, 1e-3})
        results |= run_all(
            pool, [(label, lr) for label in CONFIGS if label != "float" for lr in bit_lrs], SEEDS, opts
        )
    if pool is not None:
        pool.shutdown()
    best = {
        label: min((lr for lb, lr in results if lb == label), key=lambda lr: mean_err(results[label, lr]))
        for label in CONFIGS
    }
    print("lr search (test error %, mean ± half-range over seeds):")
    for (label, lr), runs in results.items():
        mark = " <- best" if best[label] == lr and len([k for k in results if k[0] == label]) > 1 else ""
        print(f"  {label} lr={lr:g}: {spread([1 - r['acc'] for r in runs])}{mark}")
    rows = [
        "| config | lr | test error % | Δ vs float (pt) | zero weights % | frozen bits % |",
        "|---|---|---|---|---|---|",
    ]
    f_err = mean_err(results["float", best["float"]])
    for label in CONFIGS:
        runs = results[label, best[label]]
        err = [1 - r["acc"] for r in runs]
        zeros = spread([r["zeros"] for r in runs]) if "zeros" in runs[0] else "-"
        frozen = f"{100 * runs[0]['frozen']:.1f}" if "frozen" in runs[0] else "-"
        extra = (
            f" (payload {runs[0]['payload_bytes']} B, intact: {all(r['payload_intact'] for r in runs)})"
            if "payload_bytes" in runs[0]
            else ""
        )
        rows.append(
            f"| {label}{extra} | {best[label]:g} | {spread(err)} | {100 * (statistics.mean(err) - f_err):+.2f} | {zeros} | {frozen} |"
        )
    print("\n".join(rows))
    print(
        f"epochs {epochs}, train images {len(data(limit)[0])}, width {width}, bn {args.bn}, "
        f"schedule {args.schedule}, wall time {time.perf_counter() - start:.0f} s"
    )
    with open(args.out, "w") as f:
        json.dump({f"{label} lr={lr:g}": runs for (label, lr), runs in results.items()}, f)


if __name__ == "__main__":
    main()
