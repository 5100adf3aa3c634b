"""Run the benchmarks at 1 and 2 threads; write BENCHMARKS.md and bench/results.json.

python -m bench            # layers, models, tiled
python -m bench layers     # one group
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from bench.harness import machine, markdown_table, run_in_subprocess

GROUPS = {
    "layers": "bench.layers",
    "models": "bench.models",
    "tiled": "bench.tiled",
    "cortex_m": "bench.cortex_m",  # instruction counts under QEMU: one run, threads do not matter
    "arm": "bench.arm",  # aarch64 (Cortex-A) instruction counts under qemu-aarch64: one run
    "tune": "bench.tune",  # MetaSchedule over the W1A1 templates, one thread
    "wild": "bench.wild",  # the zoo of third-party architectures (make zoo), one thread
    "lce": "bench.lce",  # Larq Compute Engine on the same binary models (`make peers` installs it)
    "threads": "bench.threads",  # 2 threads vs 1 and whole call vs kernel, alternating in one process
    "floatconv": "bench.floatconv",  # `none` on the zoo models whose float convs lost to torch, one thread
    "int8conv": "bench.int8conv",  # W2A8 convs (two layers, resnet20) vs torch fp32, one thread
}
SINGLE_RUN = ("cortex_m", "arm", "tune", "wild", "floatconv", "int8conv")
RUN_THREADS = {"threads": (2,)}  # one run whose pool has 2 threads; it times 1 and 2 itself
DEFAULT_GROUPS = (
    "layers",
    "models",
    "tiled",
    "cortex_m",
    "arm",
    "tune",
    "lce",
    "threads",
)  # `wild` runs with `make zoo`
ROOT = Path(__file__).resolve().parent.parent
PEERS = ("torch_fp32", "torch_int8", "ort_fp32", "ort_int8", "tvm_fp32")


def _key_cells(r: dict) -> list[str]:
    """The benchmark, batch and thread count: the first three columns of every table."""
    return [r["bench"], str(r["batch"]), str(r["threads"])]


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
    body = []
    for r in rows:
        cold = f"{r['cold_torch_fp32_ms'] / r['cold_bitc_ms']:.1f}x" if "cold_bitc_ms" in r else "–"
        floor = f"{100 * r['floor_ms'] / r['bitc_ms']:.0f}%" if "floor_ms" in r else "–"
        cells = [
            *_key_cells(r),
            f"{r['bitc_ms']:.3f}",
            *(_cell(r, p) for p in peers),
            cold,
            floor,
        ]
        body.append(cells)
    return markdown_table(head, body)


def tiled_table(rows: list[dict]) -> list[str]:
    head = ["benchmark", "batch", "thr", "tiled ms", "binary ms", "call speed-up", "kernel speed-up", "bytes"]
    body = []
    for r in rows:
        cells = [
            *_key_cells(r),
            f"{r['bitc_ms']:.3f}",
            f"{r['bitc_binary_ms']:.3f}",
            f"**{r['speedup_call']:.1f}x**",
            f"{r['speedup_kernel']:.1f}x ({r['kernel_binary_us']:.0f} / {r['kernel_tiled_us']:.0f} µs)",
            f"{r['weight_bytes']:,} vs {r['binary_weight_bytes']:,}",
        ]
        body.append(cells)
    return markdown_table(head, body)


def _vs(peer: str, key: str = "bitc_ms"):
    return lambda r: r[f"{peer}_ms"] / r[key]


def _scaling(r: dict) -> float | None:
    """2 threads vs 1 over the rounds in which the host gave two free cores (bench.threads' probe);
    None (not measured) where too few rounds had them: the threads table then gives the ratio
    over all rounds beside the probe's."""
    return r["speedup_free"]


# The issues' "done when" numbers: (issue, what, group, bench name prefix, batch, value(row), goal, unit);
# a negative goal is an upper bound ("at most").
# fmt: off
TARGETS = [
    ("#3", "W1A1 Linear 4096², batch 1 vs torch fp32", "layers", "linear4096 W1A1", 1, _vs("torch_fp32"), 20, "x"),
    ("#6", "W1A1 Linear 4096², batch 1 vs torch fp32", "layers", "linear4096 W1A1", 1, _vs("torch_fp32"), 50, "x"),
    ("#6", "W1A1 Linear 4096², batch 64 vs torch fp32", "layers", "linear4096 W1A1", 64, _vs("torch_fp32"), 10, "x"),
    ("#6", "weight-only 1-bit, batch 1 vs torch fp32", "layers", "linear4096 W1 weight-only", 1,
     _vs("torch_fp32"), 5, "x"),
    ("#6", "W2A8, batch 1 vs torch dynamic int8", "layers", "linear4096 W2A8", 1, _vs("torch_int8"), 2.5, "x"),
    ("#6", "W2A8, batch 1 vs ONNX Runtime int8", "layers", "linear4096 W2A8", 1, _vs("ort_int8"), 2.5, "x"),
    ("#6", "binary ResNet-18 (CIFAR), batch 1 vs torch fp32", "models", "ResNet-18", 1, _vs("torch_fp32"), 10, "x"),
    ("#6", "binary ResNet-18 (CIFAR), batch 1 vs ONNX Runtime int8", "models", "ResNet-18", 1,
     _vs("ort_int8"), 3, "x"),
    ("#6", "ResNet-18 compile time without tuning, at most", "models", "ResNet-18", 1,
     lambda r: -r["compile_s"], -30, " s"),
    ("#6", "ResNet-18 cached recompile, at most", "models", "ResNet-18", 1,
     lambda r: -r["cached_recompile_s"], -3, " s"),
    ("#19", "demo CNN, batch 1 vs torch fp32 (CPU time, alternating)", "models", "demo CNN", 1,
     _vs("torch_fp32"), 5, "x"),
    ("#19", "demo CNN, batch 64 vs torch fp32 (CPU time, alternating)", "models", "demo CNN", 64,
     _vs("torch_fp32"), 5, "x"),
    ("#19", "W1A1 Linear 4096², batch 64 vs torch fp32", "layers", "linear4096 W1A1", 64, _vs("torch_fp32"), 15,
     "x"),
    ("#19", "MLP-Mixer, batch 1 vs torch fp32", "models", "MLP-Mixer", 1, _vs("torch_fp32"), 8, "x"),
    ("#19", "binary conv3x3 256->256 14x14, batch 1 vs torch fp32", "layers", "conv3x3 256->256 14x14 W1A1", 1,
     _vs("torch_fp32"), 15, "x"),
    ("#19", "binary ResNet-18 (CIFAR), batch 1 vs torch fp32", "models", "ResNet-18", 1, _vs("torch_fp32"), 20, "x"),
    ("#19", "binary ResNet-18 (CIFAR), batch 1 vs LCE's best x86 path (indirect bgemm)", "lce", "ResNet-18", 1,
     _vs("lce_indirect"), 4, "x"),
    ("#19", "ResNet-18 compile time without tuning, at most", "models", "ResNet-18", 1,
     lambda r: -r["compile_s"], -12, " s"),
    ("#19", "W1A1 4096², batch 1: whole call over the kernel alone, at most", "threads", "linear4096 W1A1", 1,
     lambda r: -r["call_over_kernel"] if r["kind"] == "overhead" else None, -1.15, "x"),
    ("#19", "W1A1 4096², batch 64: 2 threads vs 1 (rounds with two free cores)", "threads", "linear4096 W1A1", 64,
     _scaling, 1.8, "x"),
    ("#19", "binary ResNet-18 (CIFAR), batch 1: 2 threads vs 1 (rounds with two free cores)", "threads",
     "ResNet-18", 1, _scaling, 1.7, "x"),
    ("#19", "MLP-Mixer, batch 1: 2 threads vs 1 (rounds with two free cores; never slower, 3% noise band)",
     "threads", "MLP-Mixer", 1, _scaling, 0.97, "x"),
    ("#5", "tiled p=8 W1A1 4096², batch 1 vs plain binary (whole call)", "tiled", "linear4096_w1a1_tiled_p8", 1,
     lambda r: r["speedup_call"], 4, "x"),
    ("#6", "tuned vs untuned W1A1 4096², batch 1 (never slower; 3% noise band)", "tune", "linear4096_w1a1_tune", 1,
     lambda r: r["speedup"], 0.97, "x"),
    ("#19", "tuned vs untuned binary ResNet-18 (CIFAR), batch 1: conv templates (never slower; 3% noise band)",
     "tune", "resnet18_w1a1_tune", 1, lambda r: r["speedup"], 0.97, "x"),
    ("#7", "256x256 W1A1 on cortex-m4: fewer instructions than CMSIS-DSP q7", "cortex_m", "dense 256x256", 1,
     lambda r: r["cmsis_q7_instructions"] / r["w1a1_instructions"], 8, "x"),
    ("#17", "256x256 W1A1 on cortex-m4: fewer instructions than CMSIS-DSP q7", "cortex_m", "dense 256x256", 1,
     lambda r: r["cmsis_q7_instructions"] / r["w1a1_instructions"], 10, "x"),
    ("#17", "256x256 int8 on cortex-m4: fewer instructions than CMSIS-DSP arm_mat_vec_mult_q7", "cortex_m",
     "dense 256x256", 1, lambda r: r["cmsis_matvec_q7_instructions"] / r["int8_instructions"], 1, "x"),
    ("#17", "256x256 1-bit weights, float act on cortex-m4: fewer instructions than CMSIS-DSP q7", "cortex_m",
     "dense 256x256", 1, lambda r: r["cmsis_q7_instructions"] / r["w1a32_instructions"], 2, "x"),
    ("#17", "MLP 784-128-10, default scheme, on cortex-m4: fewer instructions than 4,220,292 (8 bit-planes)",
     "cortex_m", "mlp 784-128-10", 1, lambda r: 4220292 / r["instructions"], 10, "x"),
    ("#17", "4096² W1A1 on aarch64 cortex-a72: fewer instructions than int8 C -O3", "arm",
     "dense 4096x4096 W1A1", 1, lambda r: r["w1a1_vs_int8"] if "a72" in r["target"] else None, 4, "x"),
    ("#17", "4096² W1A1 on aarch64 cortex-a72: fewer instructions than fp32 C -O3", "arm",
     "dense 4096x4096 W1A1", 1, lambda r: r["w1a1_vs_fp32"] if "a72" in r["target"] else None, 16, "x"),
]
# fmt: on


def tune_table(rows: list[dict]) -> list[str]:
    head = [
        "benchmark",
        "batch",
        "thr",
        "trials",
        "tuned kernels",
        "tuning s",
        "untuned ms",
        "tuned ms",
        "speed-up",
    ]
    body = []
    for r in rows:
        cells = [
            *_key_cells(r),
            str(r["trials"]),
            str(int(r["tuned_kernels"])),
        ]
        cells += [
            f"{r['tune_s']:.1f}",
            f"{r['untuned_ms']:.3f}",
            f"{r['tuned_ms']:.3f}",
            f"{r['speedup']:.2f}x",
        ]
        body.append(cells)
    return markdown_table(head, body)


def targets_table(rows: list[dict]) -> list[str]:
    """The issues' "done when" ratios, one thread, from this run's rows."""
    body = []
    for issue, what, group, prefix, batch, value, goal, unit in TARGETS:
        row = next(
            (
                r
                for r in rows
                if r.get("group") == group
                and r["bench"].startswith(prefix)
                and r["batch"] == batch
                and (r["threads"] == 1 or r.get("kind") == "threads")  # those compare 2 threads to 1
            ),
            None,
        )
        try:
            v = value(row) if row is not None else None
        except KeyError:
            v = None
        if v is None:
            why = "not measured" if row is None else f"not measured (see the {group} table)"
            body.append([issue, what, why, f"{abs(goal)}{unit}", "–"])
            continue
        met = "yes" if v >= goal else "**no**"
        body.append([issue, what, f"{abs(v):.1f}{unit}", f"{abs(goal)}{unit}", met])
    wild = [r for r in rows if r.get("group") == "wild"]
    if wild:
        from bench.wild import medians

        med = medians(wild)
        for scheme, goal in (
            ("none", 0.8),
            ("binary", 1.5),
            ("uniform:bits=2,act=8", 1.5),
            ("binary:act=binary", 5),
        ):
            v = med.get(scheme)
            body.append(
                [
                    "#13",
                    f"zoo median `{scheme}`, batch 1 vs torch fp32",
                    f"{v:.2f}x" if v is not None else "–",
                    f"{goal}x",
                    "yes" if v is not None and v >= goal else "**no**",
                ]
            )
        w1a1 = [
            r["torch_fp32_ms"] / r["bitc_ms"]
            for r in wild
            if r["scheme"] == "binary:act=binary" and "bitc_ms" in r
        ]
        if w1a1:
            body.append(
                [
                    "#13",
                    "zoo W1A1 slowest model vs torch fp32",
                    f"{min(w1a1):.2f}x",
                    "1.5x",
                    "yes" if min(w1a1) >= 1.5 else "**no**",
                ]
            )
    return markdown_table(["issue", "target", "measured", "goal", "met"], body)


def main(argv: list[str]) -> None:
    """Run the named groups (all by default) and rewrite BENCHMARKS.md; ``render`` only rewrites it."""
    if argv[:1] == ["--gpu"]:  # on a GPU machine, without TVM: bench/gpu.py
        from bench.gpu import main as gpu_main

        return gpu_main(argv[1:])
    results_path = ROOT / "bench" / "results.json"
    previous = json.loads(results_path.read_text()) if results_path.exists() else {"rows": []}
    if argv == ["render"]:
        info, rows = previous["machine"], previous["rows"]
    else:
        unknown = [g for g in argv if g not in GROUPS]
        if unknown:
            raise SystemExit(f"unknown benchmark group(s) {unknown}; choose from {list(GROUPS)} or 'render'")
        groups = argv or list(DEFAULT_GROUPS)
        rows = [r for r in previous.get("rows", []) if r.get("group") not in groups]
        for group in groups:
            for threads in RUN_THREADS.get(group, (1,) if group in SINGLE_RUN else (1, 2)):
                print(f"running {group} with {threads} thread(s)...", file=sys.stderr, flush=True)
                out = run_in_subprocess(GROUPS[group], threads)
                rows += [{**r, "group": group} for r in json.loads(out.strip().splitlines()[-1])]
        info = machine()
        results_path.write_text(json.dumps({"machine": info, "rows": rows}, indent=2))
    write(info, rows)


def write(info: dict, rows: list[dict]) -> None:
    lines = [
        "# Benchmarks",
        "",
        (
            f"Measured {time.strftime('%Y-%m-%d')} with `make bench` on {info['cpu']} ({info['cores']} cores), "
            f"Python {info['python']}, torch {info['torch']}, TVM {info['tvm']}. Every peer runs in the same "
            "process as bitcompiler; each time is the median of repeated calls of the whole model call "
            "(Python overhead included). `Nx` = peer time / bitcompiler time: higher favours bitcompiler. "
            "Cold = caches evicted (64 MiB written) before every call. HW floor = the W1A1 time at this "
            "machine's measured scalar `popcnt` throughput (bench/limits.py), as a percentage of the "
            "measured time: above 100% means the kernel beats one popcount per 64-bit word (byte-lane "
            "sums, Harley-Seal carry-save adders that popcount one word in 16, or the W1A1 conv's "
            "+-1 byte products on AMX tiles where the CPU has them). "
            "Machine load varies between runs (a shared 2-core VM): compare ratios within a row."
        ),
        "",
    ]
    lines += ["## Targets (one thread)", ""] + targets_table(rows) + [""]
    for group in GROUPS:
        group_rows = [r for r in rows if r.get("group") == group]
        if not group_rows:
            continue
        render = {"tiled": tiled_table, "tune": tune_table}.get(group, table)
        if group == "cortex_m":
            from bench.cortex_m import markdown as render
        if group == "arm":
            from bench.arm import markdown as render
        if group == "wild":
            from bench.wild import markdown as render
        if group == "lce":
            from bench.lce import markdown as render
        if group == "threads":
            from bench.threads import markdown as render
        if group == "floatconv":
            from bench.floatconv import markdown as render
        if group == "int8conv":
            from bench.int8conv import markdown as render
        lines += [f"## {group}", ""] + render(group_rows) + [""]
        extra = [
            r
            for r in group_rows
            if "compile_s" in r and r["threads"] == 1 and group not in ("wild", "lce", "floatconv")
        ]
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
    from bench import gpu

    if gpu.RESULTS.exists():  # measured on a lent GPU (bench/gpu.py), not by `make bench`
        lines += ["## gpu", "", *gpu.markdown(json.loads(gpu.RESULTS.read_text())), ""]
    (ROOT / "BENCHMARKS.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1:])
