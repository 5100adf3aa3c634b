"""Run the benchmarks at 1 and 2 threads; write BENCHMARKS.md and bench/results.json.

python -m bench            # layers, models, tiled
python -m bench layers     # one group
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from bench.harness import machine, run_in_subprocess

GROUPS = {"layers": "bench.layers", "models": "bench.models", "tiled": "bench.tiled"}
ROOT = Path(__file__).resolve().parent.parent
PEERS = ("torch_fp32", "torch_int8", "ort_fp32", "ort_int8", "tvm_fp32")


def _cell(r: dict, peer: str) -> str:
    if f"{peer}_ms" not in r:
        return "–"
    return f"**{r[f'{peer}_ms'] / r['bitc_ms']:.1f}x** ({r[f'{peer}_ms']:.3f})"


def table(rows: list[dict]) -> list[str]:
    peers = [p for p in PEERS if any(f"{p}_ms" in r for r in rows)]
    head = [
        "benchmark",
        "batch",
        "thr",
        "bitcompiler ms",
        *(f"vs {p}" for p in peers),
        "cold vs torch_fp32",
        "of HW floor",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cold = f"{r['cold_torch_fp32_ms'] / r['cold_bitc_ms']:.1f}x" if "cold_bitc_ms" in r else "–"
        floor = f"{100 * r['floor_ms'] / r['bitc_ms']:.0f}%" if "floor_ms" in r else "–"
        cells = [
            r["bench"],
            str(r["batch"]),
            str(r["threads"]),
            f"{r['bitc_ms']:.3f}",
            *(_cell(r, p) for p in peers),
            cold,
            floor,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main(argv: list[str]) -> None:
    groups = argv or list(GROUPS)
    results_path = ROOT / "bench" / "results.json"
    previous = json.loads(results_path.read_text()) if results_path.exists() else {"rows": []}
    rows = [r for r in previous.get("rows", []) if r.get("group") not in groups]
    for group in groups:
        for threads in (1, 2):
            print(f"running {group} with {threads} thread(s)...", file=sys.stderr, flush=True)
            out = run_in_subprocess(GROUPS[group], threads)
            rows += [{**r, "group": group} for r in json.loads(out.strip().splitlines()[-1])]
    info = machine()
    results_path.write_text(json.dumps({"machine": info, "rows": rows}, indent=2))
    lines = [
        "# Benchmarks",
        "",
        (
            f"Measured {time.strftime('%Y-%m-%d')} with `make bench` on {info['cpu']} ({info['cores']} cores), "
            f"Python {info['python']}, torch {info['torch']}, TVM {info['tvm']}. Every peer runs in the same "
            "process as bitcompiler; each time is the median of repeated calls of the whole model call "
            "(Python overhead included). `Nx` = peer time / bitcompiler time: higher favours bitcompiler. "
            "Cold = caches evicted (64 MiB written) before every call. HW floor = the W1A1 lower bound "
            "from this machine's measured popcount throughput (bench/limits.py); the percentage is how "
            "close the kernel gets to it."
        ),
        "",
    ]
    for group in GROUPS:
        group_rows = [r for r in rows if r.get("group") == group]
        if not group_rows:
            continue
        lines += [f"## {group}", ""] + table(group_rows) + [""]
        extra = [r for r in group_rows if "compile_s" in r and r["threads"] == 1]
        for r in extra:
            cached = (
                f", cached recompile {r['cached_recompile_s']:.1f} s" if "cached_recompile_s" in r else ""
            )
            lines.append(
                f"- {r['bench']} ({r['scheme']}, batch {r['batch']}): compile {r['compile_s']:.1f} s{cached}"
            )
        lim = next((r["limits"] for r in group_rows if "limits" in r), None)
        if lim:
            lines.append(
                f"- machine limits (1 thread): memory {lim['memory_gbs']:.1f} GB/s, popcount "
                f"{lim['popcount_gwords_s']:.2f} G 64-bit words/s"
            )
        lines.append("")
    (ROOT / "BENCHMARKS.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1:])
