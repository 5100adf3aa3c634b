"""The zoo: third-party architectures (bench/corpus.py) under four schemes, batch 1, one thread.

For every model and scheme: compile time, compiled time vs torch fp32 (eager, the same process,
alternating), bits/weight, and whether compiled == reference. ``make zoo`` runs it and writes
the table into BENCHMARKS.md; ``python -m bench.wild resnet20_cifar10 mixnet_s`` runs a few.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
import warnings

import torch

import bitcompiler as bc
from bench.corpus import MODELS, build
from bench.harness import median_seconds

SCHEMES = ("none", "binary", "binary:act=binary", "uniform:bits=2,act=8")
SHORT = {
    "none": "none",
    "binary": "W1 float-act",
    "binary:act=binary": "W1A1",
    "uniform:bits=2,act=8": "W2A8",
}


def relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-12))


def measure(name: str, scheme: str, model: torch.nn.Module, x: torch.Tensor) -> dict:
    row: dict = {"bench": name, "scheme": scheme, "batch": 1, "threads": torch.get_num_threads()}
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cm = bc.compile(model, (x,), scheme=scheme)
    except Exception as e:  # noqa: BLE001 - a failed compile is a row of the table
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        return row
    row["compile_s"] = time.perf_counter() - t0
    xb = torch.randn(4, *x.shape[1:], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        row["err_vs_reference"] = relative_error(cm(xb), cm.reference(xb))
    torch_s, bitc_s = [], []
    with torch.no_grad():
        for _ in range(2):  # alternate: the host's clock moves, ratios within a round do not
            torch_s.append(median_seconds(lambda: model(x), repeat=20, min_time=0.1, max_time=1.0))
            bitc_s.append(median_seconds(lambda: cm(x), repeat=20, min_time=0.1, max_time=1.0))
    row["torch_fp32_ms"], row["bitc_ms"] = 1e3 * min(torch_s), 1e3 * min(bitc_s)
    row["bits_per_weight"] = cm.report().bits_per_weight
    row["worst_layer_bits"] = max((r.bits_per_weight for r in cm.report().layers), default=0.0)
    return row


def main(names: list[str]) -> None:
    torch.set_num_threads(1)
    rows = []
    for name in names or MODELS:
        model, x = build(name)
        for scheme in SCHEMES:
            row = measure(name, scheme, model, x)
            print(json.dumps(row), file=sys.stderr, flush=True)
            rows.append(row)
    print(json.dumps(rows))


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


def markdown(rows: list[dict]) -> list[str]:
    from bench.harness import markdown_table

    models = list(dict.fromkeys(r["bench"] for r in rows))
    head = ["model", "torch fp32 ms"] + [f"{SHORT[s]}: speed, bits/w, compile s" for s in SCHEMES]
    body = []
    for m in models:
        by = {r["scheme"]: r for r in rows if r["bench"] == m}
        torch_ms = next((r["torch_fp32_ms"] for r in by.values() if "torch_fp32_ms" in r), None)
        cells = [m, f"{torch_ms:.2f}" if torch_ms else "–"]
        for s in SCHEMES:
            r = by.get(s)
            if r is None:
                cells.append("–")
            elif "error" in r:
                cells.append(f"**failed**: {r['error'][:80]}")
            else:
                exact = "" if r["err_vs_reference"] <= 1e-4 else f" (**err {r['err_vs_reference']:.1e}**)"
                cells.append(
                    f"{r['torch_fp32_ms'] / r['bitc_ms']:.2f}x, {r['bits_per_weight']:.2f}, "
                    f"{r['compile_s']:.1f}{exact}"
                )
        body.append(cells)
    med = medians(rows)
    body.append(["**median**", ""] + [f"**{med[s]:.2f}x**" if s in med else "–" for s in SCHEMES])
    done = len(models)
    note = (
        []
        if done == len(MODELS)
        else [
            "",
            f"Partial run: {done} of the {len(MODELS)} corpus models were measured; `make zoo` measures all.",
        ]
    )
    return markdown_table(head, body) + note


if __name__ == "__main__":
    main(sys.argv[1:])
