"""PNG plots of a benchmark (matplotlib): accuracy vs bits/weight, latency per target x scheme,
Cortex-M instructions and flash. Each is drawn only when some row has its numbers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bitcompiler.benchmarking.rows import OK, Row


def _save(plt: Any, fig: Any, path: Path) -> bool:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_all(rows: list[Row], out: Path) -> list[Path]:
    ok = [r for r in rows if r.status == OK]
    written = []
    for name, fn in (
        ("accuracy_vs_bits.png", _accuracy),
        ("latency.png", _latency),
        ("cortex_m.png", _cortex_m),
    ):
        if fn(ok, out / name):
            written.append(out / name)
    return written


def _accuracy(rows: list[Row], path: Path) -> bool:
    """One point per scheme (its best-measured row) and the peers at 32 bits."""
    best: dict[str, Row] = {}
    for r in rows:
        if r.accuracy is not None and (r.scheme not in best or r.accuracy_on == "compiled"):
            best[r.scheme] = r
    if not best:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for scheme, r in best.items():
        bits = r.bits_per_weight if r.bits_per_weight is not None else 32.0
        marker = "s" if r.kind == "peer" else "o"
        ax.scatter([bits], [100 * r.accuracy], marker=marker, s=60, label=f"{scheme} ({bits:.2f} b/w)")  # type: ignore[operator]
    float_acc = next((r.float_accuracy for r in rows if r.float_accuracy is not None), None)
    if float_acc is not None:
        ax.axhline(100 * float_acc, color="grey", ls="--", lw=1, label=f"float model {100 * float_acc:.1f} %")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("weight storage (bits per weight, log2 scale)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Accuracy vs bits per weight (one point per scheme)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return _save(plt, fig, path)


def _hbars(ax: Any, rows: list[Row], values: list[float], errors: list[float] | None = None) -> None:
    """One horizontal bar per row, labelled ``target · scheme``, coloured by target (the legend)."""
    targets = list(dict.fromkeys(r.target for r in rows))
    order = sorted(range(len(rows)), key=lambda i: targets.index(rows[i].target))  # grouped by target
    rows, values = [rows[i] for i in order], [values[i] for i in order]
    errors = [errors[i] for i in order] if errors is not None else None
    ys = list(range(len(rows)))[::-1]
    colors = [f"C{targets.index(r.target)}" for r in rows]
    xerr = [[0.0] * len(errors), errors] if errors is not None else None
    ax.barh(ys, values, color=colors, xerr=xerr, capsize=3)
    ax.set_yticks(ys, [f"{r.target} · {r.scheme}" for r in rows])
    for i, t in enumerate(targets):
        ax.barh([0], [0], color=f"C{i}", label=t)  # legend entries
    ax.legend(fontsize=8, title="target", loc="best", framealpha=0.9)
    ax.grid(True, axis="x", alpha=0.3)


def _latency(rows: list[Row], path: Path) -> bool:
    """Median latency (bars) and p90 (whiskers): one bar per target x scheme and per peer."""
    timed = [r for r in rows if r.latency_ms is not None and r.latency_p90_ms is not None]
    if not timed:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 1.5 + 0.4 * len(timed)))
    meds = [float(r.latency_ms) for r in timed]  # type: ignore[arg-type]
    _hbars(ax, timed, meds, [float(r.latency_p90_ms) - m for r, m in zip(timed, meds)])  # type: ignore[arg-type]
    ax.set_xlabel("latency per inference, batch 1 (ms)")
    if max(meds) > 30 * min(meds):
        ax.set_xscale("log")
        ax.set_xlabel("latency per inference, batch 1 (ms, log scale)")
    ax.set_title("Latency per target and scheme (bar: median, whisker: p90)")
    return _save(plt, fig, path)


def _cortex_m(rows: list[Row], path: Path) -> bool:
    """Instructions per inference and flash per target x scheme (QEMU targets)."""
    counted = [r for r in rows if r.instructions is not None]
    if not counted:
        return False
    plt = _pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 1.8 + 0.4 * len(counted)))
    _hbars(a1, counted, [float(r.instructions) / 1e6 for r in counted])  # type: ignore[arg-type]
    a1.set_xlabel("instructions per inference (millions, QEMU count)")
    a1.set_title("Executed instructions")
    _hbars(a2, counted, [(r.flash_bytes or 0) / 1024 for r in counted])
    a2.set_xlabel("flash: code + weights + constants (KiB)")
    a2.set_title("Flash")
    return _save(plt, fig, path)
