"""Run every benchmark at 1 and 2 threads and write BENCHMARKS.md and bench/results.json."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from bench.harness import machine, run_in_subprocess

BENCHES = ["bench.linear"]
ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    rows = []
    for module in BENCHES:
        for threads in (1, 2):
            print(f"running {module} with {threads} thread(s)...", file=sys.stderr, flush=True)
            rows += json.loads(run_in_subprocess(module, threads).strip().splitlines()[-1])
    info = machine()
    (ROOT / "bench" / "results.json").write_text(json.dumps({"machine": info, "rows": rows}, indent=2))
    lines = [
        "# Benchmarks",
        "",
        (
            f"Measured {time.strftime('%Y-%m-%d')} with `make bench` on {info['cpu']} ({info['cores']} cores), "
            f"Python {info['python']}, torch {info['torch']}, TVM {info['tvm']}. Baselines run in the same "
            "process as bitcompiler; each number is the median of repeated calls (warm caches) of the whole "
            "model call, Python overhead included."
        ),
        "",
        "Speed-up = peer time / bitcompiler time (higher is better for bitcompiler).",
        "",
    ]
    peers = [k.removesuffix("_ms") for k in rows[0] if k.endswith("_ms") and k != "bitc_ms"]
    lines.append("| benchmark | batch | threads | bitcompiler (ms) | " + " | ".join(f"vs {p}" for p in peers) + " |")
    lines.append("|---|---|---|---|" + "---|" * len(peers))
    for r in rows:
        ratios = " | ".join(f"{r[p + '_ms'] / r['bitc_ms']:.1f}x ({r[p + '_ms']:.3f} ms)" for p in peers)
        lines.append(f"| {r['bench']} | {r['batch']} | {r['threads']} | {r['bitc_ms']:.3f} | {ratios} |")
    (ROOT / "BENCHMARKS.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
