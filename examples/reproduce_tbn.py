"""Reproduce Tiled Bit Networks (docs/methods.md §4) at small scale; prints markdown tables.

1. MLP 784->128->10, fc1 tiled at p=4 (fc2 is too small: plain binary), on MNIST-5k and
   Fashion-MNIST: exact weight bytes and test accuracy vs binary and float, with α per chunk =
   mean |W| and with learned α (both from the paper), each network at its best lr of MLP_LRS
   (default 0.1, 0.2, 0.4; the same search for every network).
2. A small CNN on Fashion-MNIST at p = 4, 8, 16, 32 vs binary vs float (``min_weights=4096`` so
   that its conv2, conv3 and fc1 are tiled; the paper's 64k default would tile only ResNet-size layers).
3. Bits per weight of a CIFAR-shaped ResNet-18 at p = 4, 8, 16, 32 (accounting only, no training).

Recipe (paper): SGD momentum 0.9, lr 0.1 (MLP: searched, see 1.), cosine, wd 1e-4; activations float (weight-only),
first and last layer quantized as in the paper. Epoch counts are small to fit a shared 2-core
machine; see REPRODUCTIONS.md. Run: ``PYTHONPATH=. python examples/reproduce_tbn.py [mlp|cnn|resnet]``.
"""

from __future__ import annotations

import os
import statistics
import sys

import torch

torch.set_num_threads(1)

from torch import nn

import bitcompiler as bc
from bitcompiler import datasets
from bitcompiler.methods.tiled import weight_storage
from bitcompiler.train import accuracy

sys.path.insert(0, os.path.dirname(__file__))
from _recipe import mean_spread, subset, train

SEEDS = [int(s) for s in os.environ.get("SEEDS", "0,1,2").split(",")]
PAPER_BPW = {4: 0.259, 8: 0.135, 16: 0.073, 32: 0.043}


def mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 10))


def small_cnn() -> nn.Module:
    block = lambda cin, cout: [
        nn.Conv2d(cin, cout, 3, padding=1),
        nn.BatchNorm2d(cout),
        nn.ReLU(),
        nn.MaxPool2d(2),
    ]
    return nn.Sequential(
        *block(1, 16),
        *block(16, 32),
        *block(32, 64),
        nn.Flatten(),
        nn.Linear(64 * 3 * 3, 128),
        nn.ReLU(),
        nn.Linear(128, 10),
    )


def storage_bytes(model: nn.Module) -> float:
    return sum(bits for _, _, bits in weight_storage(model)) / 8


def run(
    make, scheme: str | None, train_data, test_data, epochs: int, seed: int, lr: float = 0.1
) -> tuple[float, float, float]:
    torch.manual_seed(seed)
    model = make()
    if scheme is not None:
        model = bc.prepare(model, scheme)
    secs = train(model, train_data, epochs, lr=lr, seed=seed)
    return accuracy(model, test_data), storage_bytes(model), secs


def table(rows: list[tuple]) -> None:
    print("| model | weights stored | test accuracy % (mean ± half-range) | seconds/run |")
    print("|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(str(c) for c in r) + " |")


def part_mlp() -> None:
    """Each network at its best lr of MLP_LRS (mean test accuracy over the seeds; the same search for all)."""
    configs = {
        "float": None,
        "binary": "binary:first_last=quantize",
        "tiled p=4": "tiled:p=4,first_last=quantize",
        "tiled p=4, learned α": "tiled:p=4,first_last=quantize,alpha=learned",
    }
    lrs = [float(x) for x in os.environ.get("MLP_LRS", "0.1,0.2,0.4").split(",")]
    plan = os.environ.get("MLP_PLAN", "mnist-5k:30,fashion-mnist:8")  # dataset:epochs,...
    for name, epochs in ((d, int(e)) for d, e in (x.split(":") for x in plan.split(","))):
        tr, te = datasets.load(name, "train"), datasets.load(name, "test")
        rows = []
        for label, scheme in configs.items():
            by_lr = {lr: [run(mlp, scheme, tr, te, epochs, s, lr) for s in SEEDS] for lr in lrs}
            best = max(lrs, key=lambda lr: statistics.mean(r[0] for r in by_lr[lr]))
            res = by_lr[best]
            cells = " · ".join(f"lr {lr}: {mean_spread([r[0] for r in by_lr[lr]])}" for lr in lrs)
            rows.append(
                (
                    label,
                    f"{res[0][1]:,.0f} B",
                    mean_spread([r[0] for r in res]),
                    best,
                    cells,
                    f"{res[0][2]:.0f}",
                )
            )
            print(f"[mlp] {name} {label}: {rows[-1]}", file=sys.stderr, flush=True)
        print(f"\n### MLP 784-128-10 on {name} ({epochs} epochs, seeds {SEEDS}, lr searched over {lrs})\n")
        print("| model | weights stored | test accuracy % at best lr | best lr | every lr | seconds/run |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            print("| " + " | ".join(str(c) for c in r) + " |")


def part_cnn() -> None:
    n_train = int(os.environ.get("CNN_TRAIN", "8000"))
    epochs = int(os.environ.get("CNN_EPOCHS", "2"))
    tr = subset(datasets.load("fashion-mnist", "train"), n_train)
    te = datasets.load("fashion-mnist", "test")
    configs = {"float": None, "binary": "binary:first_last=quantize"}
    configs.update(
        {f"tiled p={p}": f"tiled:p={p},min_weights=4096,first_last=quantize" for p in (4, 8, 16, 32)}
    )
    rows, points = [], []
    for label, scheme in configs.items():
        res = [run(small_cnn, scheme, tr, te, epochs, s) for s in SEEDS]
        n = sum(w for _, w, _ in weight_storage(small_cnn()))
        bpw = 8 * res[0][1] / n
        points.append((label, bpw, [r[0] for r in res]))
        rows.append(
            (
                label,
                f"{res[0][1]:,.0f} B ({bpw:.3f} bits/w)",
                mean_spread([r[0] for r in res]),
                f"{res[0][2]:.0f}",
            )
        )
        print(f"[cnn] {label}: {rows[-1]}", file=sys.stderr, flush=True)
    print(f"\n### Small CNN on Fashion-MNIST ({n_train} training images, {epochs} epochs, seeds {SEEDS})\n")
    table(rows)
    plot_accuracy_vs_bits(
        points, os.environ.get("CNN_PLOT", "docs/img/tbn_accuracy_bits.png"), n_train, epochs
    )


def plot_accuracy_vs_bits(points: list[tuple], path: str, n_train: int, epochs: int) -> None:
    """Test accuracy (mean, error bar = seed range) against stored bits per weight, log x axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, bpw, accs in points:
        mean = 100 * statistics.mean(accs)
        lo, hi = mean - 100 * min(accs), 100 * max(accs) - mean
        ax.errorbar([bpw], [mean], yerr=[[lo], [hi]], fmt="o", capsize=3)
        ax.annotate(label, (bpw, mean), textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("stored bits per weight (tile bits + α floats)")
    ax.set_ylabel("test accuracy %")
    ax.set_title(f"Small CNN, Fashion-MNIST ({n_train} images, {epochs} epochs, seeds {SEEDS})", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot written to {path}", file=sys.stderr)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.c2, self.b2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.short = nn.Sequential()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = torch.relu(self.b1(self.c1(x)))
        return torch.relu(self.b2(self.c2(y)) + self.short(x))


def resnet18_cifar() -> nn.Module:
    layers, cin = [nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU()], 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
        cin = cout
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, 10))


def part_resnet() -> None:
    print("\n### CIFAR-shaped ResNet-18: bits per weight (all conv + linear weights, scales included)\n")
    print("| p | ours, first/last tiled-or-binary | ours, first/last float | paper |")
    print("|---|---|---|---|")
    torch.manual_seed(0)
    for p in (4, 8, 16, 32):
        cells = []
        for fl in ("quantize", "keep"):
            net = bc.prepare(resnet18_cifar(), f"tiled:p={p},first_last={fl}")
            rows = weight_storage(net)
            if fl == "keep":  # the paper leaves first and last layers out: count them as float
                rows = [
                    (n, w, 32 * w) if i in (0, len(rows) - 1) else (n, w, b)
                    for i, (n, w, b) in enumerate(rows)
                ]
            cells.append(sum(b for _, _, b in rows) / sum(w for _, w, _ in rows))
        print(f"| {p} | {cells[0]:.3f} | {cells[1]:.3f} | {PAPER_BPW[p]} |")


if __name__ == "__main__":
    parts = sys.argv[1:] or ["resnet", "mlp", "cnn"]
    for part in parts:
        {"mlp": part_mlp, "cnn": part_cnn, "resnet": part_resnet}[part]()
