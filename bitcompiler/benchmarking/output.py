"""A benchmark's rows as a terminal table (rich), results.json, results.csv and PNG plots."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from bitcompiler.benchmarking.rows import OK, Row, columns

_HEADS = {
    "latency_ms": "median ms",
    "latency_p90_ms": "p90 ms",
    "bits_per_weight": "bits/w",
    "weight_bytes": "weight B",
    "flash_bytes": "flash B",
    "ram_bytes": "RAM B",
    "compile_s": "compile s",
    "exact": "== ref",
    "max_rel_error": "max rel err",
    "accuracy": "accuracy %",
    "accuracy_on": "acc. of",
    "float_accuracy": "float acc. %",
}


def cell(field: str, value: Any) -> str:
    if value is None:
        return "-"
    if field in ("accuracy", "float_accuracy"):
        return f"{100 * value:.2f}"
    if field == "reason" and len(value) > 100:  # the whole text is in results.json
        return value[:99] + "…"
    if field == "exact":
        return "yes" if value else "NO"
    if field == "max_rel_error":
        return f"{value:.1e}"
    if isinstance(value, float):
        return f"{value:.3g}" if value < 100 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def table(rows: list[Row], title: str = "bitc bench") -> Any:
    """A ``rich.table.Table`` of ``rows`` (columns no row has a value for are left out)."""
    from rich.table import Table

    fields = [
        f for f in columns(rows) if f not in ("kind",) and any(getattr(r, f) not in (None, "") for r in rows)
    ]
    t = Table(title=title)
    for f in fields:
        wide = f == "reason"
        t.add_column(
            _HEADS.get(f, f), overflow="fold", min_width=30 if wide else None, max_width=50 if wide else None
        )
    for r in rows:
        style = "dim" if r.kind == "peer" else ("red" if r.status != OK else None)
        t.add_row(*(cell(f, getattr(r, f)) for f in fields), style=style)
    return t


def print_table(rows: list[Row], title: str = "bitc bench") -> None:
    from rich.console import Console

    Console(width=220).print(table(rows, title))


def write_all(rows: list[Row], out: Path, meta: dict[str, Any]) -> list[Path]:
    """results.json, results.csv and the plots in ``out``; returns the files written."""
    out.mkdir(parents=True, exist_ok=True)
    with_acc = any(r.accuracy is not None for r in rows)
    dicts = [r.to_dict(with_acc) for r in rows]
    (out / "results.json").write_text(json.dumps({**meta, "rows": dicts}, indent=1))
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns(rows)))
        writer.writeheader()
        writer.writerows(dicts)
    from bitcompiler.benchmarking.plots import plot_all

    return [out / "results.json", out / "results.csv", *plot_all(rows, out)]
