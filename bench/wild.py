"""The zoo: third-party architectures (bench/corpus.py) under four schemes, batch 1, one thread.

For every model and scheme: compile time, compiled time vs torch fp32 (eager, the same process,
alternating; this thread's CPU time, so other processes on a shared host do not skew the ratio),
bits/weight, and whether compiled == reference. ``make zoo`` runs it and writes the table into
BENCHMARKS.md; ``python -m bench.wild resnet20_cifar10 mixnet_s`` runs a few.

``--rows FILE`` appends each row to a JSON-lines file as it is produced (a partial run is
usable) and skips the cells already there (a run resumes); ``--render FILE`` puts that file's
rows into bench/results.json and rewrites BENCHMARKS.md.
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

import bitcompiler as bc
from bench.corpus import MODELS, build
from bench.harness import alternate_cpu_ms

SCHEMES = ("none", "binary", "binary:act=binary", "uniform:bits=2,act=8")
SHORT = {
    "none": "none",
    "binary": "W1 float-act",
    "binary:act=binary": "W1A1",
    "uniform:bits=2,act=8": "W2A8",
}


def relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-12))


def float32_noise(model: torch.nn.Module, x: torch.Tensor) -> float:
    """How far eager float32 is from float64 on ``x``: random-weight nets can amplify rounding
    (IGCV3's grouped 1x1 convs: 1.2e-3), and no float32 implementation can do better than that."""
    with torch.no_grad():
        return relative_error(model(x), copy.deepcopy(model).double()(x.double()).float())


def tolerance(model: torch.nn.Module, x: torch.Tensor) -> float:
    """The zoo's float tolerance: 1e-4 relative, or ten times the model's own float32 noise."""
    return max(1e-4, 10 * float32_noise(model, x))


def worst_layer_ratio(cm: bc.CompiledModel) -> float:
    """The largest bits/weight over nominal (plus scales, word-aligned) of any bit layer."""
    try:
        from tests.test_storage import layer_ratios
    except ImportError:  # an installed bench without the tests
        return float("nan")
    return max(layer_ratios(cm, aligned=True).values(), default=1.0)


def measure(name: str, scheme: str, model: torch.nn.Module, x: torch.Tensor, tol: float = 1e-4) -> dict:
    row: dict = {
        "bench": name,
        "scheme": scheme,
        "batch": 1,
        "threads": torch.get_num_threads(),
        "tolerance": tol,
    }
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cm = bc.compile(model, (x,), scheme=scheme)
    except Exception as e:  # noqa: BLE001 - a failed compile is a row of the table
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        return row
    row["compile_s"], row["compile_cpu_s"] = time.perf_counter() - t0, time.process_time() - c0
    xb = torch.randn(4, *x.shape[1:], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        row["err_vs_reference"] = max(relative_error(cm(i), cm.reference(i)) for i in (x, xb))
        row["torch_fp32_ms"], row["bitc_ms"] = alternate_cpu_ms(lambda: model(x), lambda: cm(x))
    row["bits_per_weight"] = cm.report().bits_per_weight
    row["worst_layer_bits"] = max((r.bits_per_weight for r in cm.report().layers), default=0.0)
    row["worst_layer_ratio"] = worst_layer_ratio(cm)
    return row


def commit() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=False,
        )
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            check=False,
            text=True,
        ).stdout.strip()
    except OSError:
        return "unknown"
    return out.stdout.strip() + ("+dirty" if dirty else "") if out.returncode == 0 else "unknown"


def load_rows(path: Path | None) -> list[dict]:
    if path is None or not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main(argv: list[str]) -> None:
    if argv[:1] == ["--render"]:
        return render(Path(argv[1]))
    path = Path(argv[1]) if argv[:1] == ["--rows"] else None
    names = argv[2:] if path is not None else argv
    torch.set_num_threads(1)
    rows = load_rows(path)
    done = {(r["bench"], r["scheme"]) for r in rows}
    stamp = {"commit": commit()}
    for name in names or MODELS:
        todo = [s for s in SCHEMES if (name, s) not in done]
        if not todo:
            continue
        model, x = build(name)
        tol = tolerance(model, torch.randn(4, *x.shape[1:], generator=torch.Generator().manual_seed(1)))
        for scheme in todo:
            row = {
                **measure(name, scheme, model, x, tol),
                **stamp,
                "loadavg": os.getloadavg()[0],
                "time": time.time(),
            }
            print(json.dumps(row), file=sys.stderr, flush=True)
            if path is not None:
                with path.open("a") as f:
                    f.write(json.dumps(row) + "\n")
            rows.append(row)
    print(json.dumps(rows))


def render(path: Path) -> None:
    """Replace the ``wild`` rows of bench/results.json by ``path``'s rows; rewrite BENCHMARKS.md."""
    from bench.__main__ import ROOT, write
    from bench.harness import machine

    results = ROOT / "bench" / "results.json"
    previous = json.loads(results.read_text()) if results.exists() else {"rows": []}
    rows = [r for r in previous["rows"] if r.get("group") != "wild"]
    rows += [{**r, "group": "wild"} for r in load_rows(path)]
    info = previous.get("machine") or machine()
    results.write_text(json.dumps({"machine": info, "rows": rows}, indent=2))
    write(info, rows)


def medians(rows: list[dict]) -> dict[str, float]:
    """Median speed-up over torch fp32 per scheme (failed compiles count as 0)."""
    out = {}
    for scheme in SCHEMES:
        ratios = [
            r["torch_fp32_ms"] / r["bitc_ms"] if "bitc_ms" in r else 0.0
            for r in rows
            if r["scheme"] == scheme
        ]
        if ratios:
            out[scheme] = statistics.median(ratios)
    return out


SLOWEST = {"none": 1.0, "binary": 1.0, "binary:act=binary": 1.5, "uniform:bits=2,act=8": 1.0}
GOALS = {"none": 0.8, "binary": 1.5, "binary:act=binary": 5.0, "uniform:bits=2,act=8": 1.5}


def speed(r: dict) -> float:
    return r["torch_fp32_ms"] / r["bitc_ms"]


def cell(r: dict | None) -> str:
    if r is None:
        return "–"
    if "error" in r:
        return f"**failed**: {r['error'][:80]}"
    flags = (
        "" if r["err_vs_reference"] <= r.get("tolerance", 1e-4) else f" (**err {r['err_vs_reference']:.1e}**)"
    )
    if r.get("worst_layer_ratio", 1.0) > 1.1:
        flags += f" (**layer {r['worst_layer_ratio']:.2f}x nominal**)"
    return f"{speed(r):.2f}x, {r['bits_per_weight']:.2f}, {r['compile_s']:.1f}{flags}"


def problems(rows: list[dict]) -> list[str]:
    """Every cell that misses #13: failed, inexact, a layer over 1.1x nominal, or slower than its floor."""
    out = []
    for r in rows:
        what = f"{r['bench']} `{r['scheme']}`"
        if "error" in r:
            out.append(f"{what}: compile failed ({r['error'][:120]})")
            continue
        if r["err_vs_reference"] > r.get("tolerance", 1e-4):
            out.append(
                f"{what}: compiled vs reference {r['err_vs_reference']:.1e} (tolerance {r.get('tolerance', 1e-4):.0e})"
            )
        if r.get("worst_layer_ratio", 1.0) > 1.1:
            out.append(f"{what}: a layer stores {r['worst_layer_ratio']:.2f}x its nominal bits")
        if speed(r) < SLOWEST[r["scheme"]]:
            out.append(f"{what}: {speed(r):.2f}x torch fp32 (floor {SLOWEST[r['scheme']]}x)")
    return out


def summary(rows: list[dict]) -> list[str]:
    """The run (commit, load, wall time) and #13's done-when figures."""
    ok = [r for r in rows if "error" not in r]
    med = medians(rows)
    w1a1 = [speed(r) for r in ok if r["scheme"] == "binary:act=binary"]
    loads = sorted(r["loadavg"] for r in rows if "loadavg" in r)
    stamps = [r["time"] for r in rows if "time" in r]
    commits = sorted({r.get("commit", "?") for r in rows})
    models = {r["bench"] for r in rows}
    per_commit = ", ".join(f"{c} ({sum(r.get('commit', '?') == c for r in rows)} cells)" for c in commits)
    head = (
        f"{len(models)} of the corpus's {len(MODELS)} models. Commit measured: {per_commit} (a row's "
        "`commit` in bench/results.json). Batch 1, one thread; times are this thread's CPU time "
        "per call (`bench.harness.alternate_cpu_ms`: the best of three alternating medians, torch and "
        "bitcompiler in one process), so other processes on the shared host do not enter the ratios."
    )
    if loads:
        head += (
            f" Load average (1 min) during the run: {loads[0]:.1f} to {loads[-1]:.1f}, median "
            f"{statistics.median(loads):.1f}, on {os.cpu_count()} cores; run wall time "
            f"{(max(stamps) - min(stamps)) / 60:.0f} min (first to last row)."
        )
    lines = [head, "", "#13 done-when over this run:", ""]
    for s in SCHEMES:
        if s in med:
            met = "met" if med[s] >= GOALS[s] else "**not met**"
            lines.append(f"- `{s}` median {med[s]:.2f}x torch fp32 (goal >= {GOALS[s]}x): {met}")
    if w1a1:
        lines.append(f"- W1A1 slowest model {min(w1a1):.2f}x (goal >= 1.5x)")
    worst = max((r.get("worst_layer_ratio", 0.0) for r in ok), default=0.0)
    inexact = sum(r["err_vs_reference"] > r.get("tolerance", 1e-4) for r in ok)
    lines.append(
        f"- {len(ok)} of {len(rows)} cells compile; {inexact} differ from their reference by more than the "
        "tolerance (1e-4 relative, or ten times the model's own float32-vs-float64 difference); "
        f"worst layer {worst:.2f}x its nominal bits (goal <= 1.1x)"
    )
    missed = problems(rows)
    lines += ["", "Cells that miss:" + (" none." if not missed else "")]
    return lines + [f"- {p}" for p in missed] + [""]


def markdown(rows: list[dict]) -> list[str]:
    from bench.harness import markdown_table

    models = list(dict.fromkeys(r["bench"] for r in rows))
    head = ["model", "torch fp32 ms"] + [f"{SHORT[s]}: speed, bits/w, compile s" for s in SCHEMES]
    body = []
    for m in models:
        by = {r["scheme"]: r for r in rows if r["bench"] == m}
        torch_ms = next((r["torch_fp32_ms"] for r in by.values() if "torch_fp32_ms" in r), None)
        body.append([m, f"{torch_ms:.2f}" if torch_ms else "–"] + [cell(by.get(s)) for s in SCHEMES])
    med = medians(rows)
    body.append(["**median**", ""] + [f"**{med[s]:.2f}x**" if s in med else "–" for s in SCHEMES])
    note = (
        []
        if len(models) == len(MODELS)
        else [
            "",
            f"Partial run: {len(models)} of the {len(MODELS)} corpus models were measured; `make zoo` measures all.",
        ]
    )
    return summary(rows) + markdown_table(head, body) + note


if __name__ == "__main__":
    main(sys.argv[1:])
