"""aarch64 (Cortex-A) instruction counts: bitcompiler's 4096x4096 W1A1 dense vs int8 and fp32 C.

Every variant runs in the same Linux harness (the aarch64 bundle's ``main.c``, markers around
the model call) built with ``aarch64-linux-gnu-gcc -O3 -mcpu=<core>`` and counted exactly under
``qemu-aarch64`` (:mod:`bitcompiler.backends.aarch64.toolchain`). Baselines, batch 1:

* int8: ``y[n] = s * sum_k W[n,k] x[k]``, int8 weights and activations, int32 sums: gcc vectorizes
  it (``smull`` + ``saddw`` on A53/A72, ``sdot`` on A76);
* fp32: the same loop in float; without ``-ffast-math`` gcc keeps the float sum in order (scalar
  ``fmadd``); the ``-ffast-math`` row lets it reassociate into NEON ``fmla``.

Weights are linked as a binary blob (``.incbin``): 16 MiB of int8 or 64 MiB of float as C text
would take gcc minutes. Also: the MLP 784-128-10 under four schemes on the first core. Every
baseline's output is checked against numpy, bitcompiler's against
``cm.reference``. Run: ``python -m bench.arm [cortex-a72 cortex-a76 ...]``.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

import bitcompiler as bc
from bench.harness import markdown_table
from bitcompiler.backends.aarch64 import toolchain
from bitcompiler.backends.aarch64.bundle import MAIN_C, makefile
from bitcompiler.backends.aarch64.cores import CORES

K = N = 4096
SCALE = 0.01

MODEL_C = {
    "int8": """\
#include <stdint.h>
#include "model.h"
extern const int8_t bitc_w[];
static int8_t xq[%(K)d];

int bitc_run(const float *in, float *out) {
  for (int k = 0; k < %(K)d; ++k) xq[k] = (int8_t)in[k];  /* the input holds int8 values */
  for (int n = 0; n < %(N)d; ++n) {
    const int8_t *w = bitc_w + n * %(K)d;
    int32_t acc = 0;
    for (int k = 0; k < %(K)d; ++k) acc += (int32_t)w[k] * (int32_t)xq[k];
    out[n] = %(S)sf * (float)acc;
  }
  return 0;
}
""",
    "fp32": """\
#include "model.h"
extern const float bitc_w[];

int bitc_run(const float *in, float *out) {
  for (int n = 0; n < %(N)d; ++n) {
    const float *w = bitc_w + n * %(K)d;
    float acc = 0.0f;
    for (int k = 0; k < %(K)d; ++k) acc += w[k] * in[k];
    out[n] = acc;
  }
  return 0;
}
""",
}

WEIGHTS_C = """\
/* the weights as a binary blob: w.bin */
__asm__(".section .rodata\\n.balign 16\\n.global bitc_w\\nbitc_w:\\n.incbin \\"w.bin\\"\\n.previous");
"""


def baseline(kind: str, mcpu: str, w: np.ndarray, x: np.ndarray, cflags: str = "") -> tuple[int, np.ndarray]:
    """Instructions of the ``kind`` (int8 / fp32) baseline for ``mcpu`` and its output on ``x``."""
    core = CORES[mcpu]
    with tempfile.TemporaryDirectory(prefix="bitc-bench-a64-") as tmp:
        d = Path(tmp)
        files = {
            "model.h": f"#pragma once\n#define BITC_INPUT_SIZE {K}\n#define BITC_OUTPUT_SIZE {N}\n"
            "int bitc_run(const float *in, float *out);\n",
            "model.c": MODEL_C[kind] % {"K": K, "N": N, "S": repr(SCALE)},
            "kernels.c": "",
            "kernels.h": "",
            "weights.h": "",
            "weights.c": WEIGHTS_C,
            "main.c": MAIN_C,
            "Makefile": makefile(core).replace("\nCFLAGS  ?= ", f"\nCFLAGS  ?= -O3 {cflags} #", 1),
        }
        for name, text in files.items():
            (d / name).write_text(text)
        (d / "w.bin").write_bytes(np.ascontiguousarray(w).tobytes())
        exe = toolchain.build(d)
        res = toolchain.run(core, exe, x, N, count=True)
        assert res.instructions is not None
        return res.instructions, res.output


def measure(mcpu: str, fast_math: bool = True) -> dict:
    """The W1A1 layer and its baselines on ``mcpu``; ``fast_math=False`` skips that fp32 variant."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    x = torch.randn(1, K)
    row: dict = {"bench": f"dense {K}x{N} W1A1", "target": f"aarch64 {mcpu}", "batch": 1, "threads": 1}
    cm = bc.compile(
        nn.Linear(K, N),
        (x,),
        target=bc.Target("aarch64", mcpu=mcpu),
        scheme="binary:act=binary,first_last=quantize",
    )
    assert torch.equal(cm(x), cm.reference(x)), "W1A1: output != reference"
    row["w1a1_instructions"] = cm.report().extra["instructions"]
    row["w1a1_weight_bytes"] = cm.report().extra["weights_bytes"]

    w8 = rng.integers(-127, 128, size=(N, K), dtype=np.int8)
    xq = np.clip(np.round(x.numpy() * 40), -127, 127).astype(np.float32)
    row["int8_instructions"], y8 = baseline("int8", mcpu, w8, xq)
    acc = w8.astype(np.int64) @ xq[0].astype(np.int64)
    assert np.array_equal(y8, np.float32(SCALE) * acc.astype(np.float32)), "int8 baseline != numpy"

    wf = rng.standard_normal((N, K)).astype(np.float32)
    ref = wf.astype(np.float64) @ x.numpy()[0].astype(np.float64)
    for label, flags in (("fp32", ""), ("fp32_fast", "-ffast-math"))[: 2 if fast_math else 1]:
        row[f"{label}_instructions"], yf = baseline("fp32", mcpu, wf, x.numpy(), flags)
        assert np.abs(yf - ref).max() <= 1e-4 * np.abs(ref).max(), f"{label} baseline != numpy"
    for base in ("int8", "fp32", "fp32_fast")[: 3 if fast_math else 2]:
        row[f"w1a1_vs_{base}"] = round(row[f"{base}_instructions"] / row["w1a1_instructions"], 1)
    return row


MLP_SCHEMES = (
    "binary:act=binary",  # the first and last layers 8-bit with int8 activations
    "binary",  # float activations; first and last 8-bit
    "uniform:bits=2,act=8",
    "binary:act=binary,first_last=quantize",
)


def measure_mlp(mcpu: str) -> list[dict]:
    """MLP 784-128-10 per scheme: instructions on ``mcpu``; output equal to the reference."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 10))
    x = torch.randn(1, 1, 28, 28)
    rows = []
    for scheme in MLP_SCHEMES:
        cm = bc.compile(net, (x,), target=bc.Target("aarch64", mcpu=mcpu), scheme=scheme)
        ref = cm.reference(x)
        assert (cm(x) - ref).abs().max() <= 1e-5 * ref.abs().max(), f"{scheme}: output != reference"
        extra = cm.report().extra
        rows.append(
            {
                "bench": "mlp 784-128-10",
                "scheme": scheme,
                "target": f"aarch64 {mcpu}",
                "batch": 1,
                "threads": 1,
                "instructions": extra["instructions"],
                "weights_bytes": extra["weights_bytes"],
            }
        )
    return rows


def markdown(rows: list[dict]) -> list[str]:
    """The aarch64 section of BENCHMARKS.md."""
    lines = [
        (
            "Instructions executed by one inference (batch 1), counted exactly under `qemu-aarch64` between "
            "markers around the model call; every variant in the same harness, `aarch64-linux-gnu-gcc -O3 "
            "-mcpu=<core>`. int8 and fp32 are plain C loops (gcc vectorizes int8: `smull`/`saddw`, `sdot` "
            "on A76; fp32 stays scalar without `-ffast-math`). `Nx` = baseline / W1A1. "
            "Reproduce: `python -m bench.arm cortex-a72`."
        ),
        "",
    ]
    body = []
    for r in (r for r in rows if r["bench"].startswith("dense")):
        cells = [r["target"], r["bench"]]
        cells += [f"{r[f'{c}_instructions']:,}" for c in ("w1a1", "int8", "fp32", "fp32_fast")]
        cells += [
            f"**{r['w1a1_vs_int8']:.1f}x**",
            f"**{r['w1a1_vs_fp32']:.1f}x**",
            f"{r['w1a1_vs_fp32_fast']:.1f}x",
        ]
        body.append(cells)
    head = ["target", "layer", "bitcompiler W1A1", "C int8 -O3", "C fp32 -O3", "C fp32 -O3 -ffast-math"]
    lines += markdown_table([*head, "vs int8", "vs fp32", "vs fp32 fast-math"], body) + [""]
    mlp = [
        [r["target"], r["bench"], f"`{r['scheme']}`", f"{r['instructions']:,}", f"{r['weights_bytes']:,}"]
        for r in rows
        if r["bench"].startswith("mlp")
    ]
    return lines + markdown_table(["target", "model", "scheme", "instructions", "weights B"], mlp)


def main() -> None:
    cores = sys.argv[1:] or ["cortex-a72", "cortex-a76"]
    rows = [measure(m) for m in cores] + measure_mlp(cores[0])
    print("\n".join(markdown(rows)), file=sys.stderr)
    print(json.dumps(rows))  # last line: the rows, for bench/__main__.py


if __name__ == "__main__":
    main()
