"""Cortex-M instruction counts: bitcompiler's 256x256 W1A1 dense vs a plain C int8 dot-product loop.

Both run as firmware under QEMU (same harness, same markers, same ``-O2``); the count is the
instructions executed between the markers. Run: ``python -m bench.cortex_m [cortex-m4 ...]``.
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
from bitcompiler.backends.cortex_m import qemu
from bitcompiler.backends.cortex_m.boards import board_for
from bitcompiler.backends.cortex_m.bundle import (
    MAIN_C,
    SEMIHOST_C,
    SEMIHOST_H,
    STARTUP_C,
    linker_ld,
    makefile,
)

K = N = 256

INT8_MODEL_C = """\
/* Baseline: y[n] = s * sum_k W[n,k] * x[k], int8 weights and activations, int32 accumulate. */
#include <stdint.h>
#include "model.h"
#include "weights.h"

static int8_t xq[%(K)d];

int bitc_run(const float *in, float *out) {
  for (int k = 0; k < %(K)d; ++k) xq[k] = (int8_t)in[k];  /* input already holds int8 values */
  for (int n = 0; n < %(N)d; ++n) {
    const int8_t *w = bitc_w_int8 + n * %(K)d;
    int32_t acc = 0;
    for (int k = 0; k < %(K)d; ++k) acc += (int32_t)w[k] * (int32_t)xq[k];
    out[n] = bitc_scale * (float)acc;
  }
  return 0;
}
"""


def _int8_bundle(directory: Path, target: bc.Target) -> Path:
    board = board_for(target)
    rng = np.random.default_rng(0)
    w = rng.integers(-127, 128, size=(N, K), dtype=np.int8)
    items = ",".join(str(int(v)) for v in w.reshape(-1))
    files = {
        "model.h": f"#pragma once\n#define BITC_INPUT_SIZE {K}\n#define BITC_OUTPUT_SIZE {N}\nint bitc_run(const float *in, float *out);\n",
        "model.c": INT8_MODEL_C % {"K": K, "N": N},
        "kernels.h": "",
        "kernels.c": "",
        "weights.h": "#include <stdint.h>\nextern const int8_t bitc_w_int8[];\nextern const float bitc_scale;\n",
        "weights.c": f'#include "weights.h"\nconst int8_t bitc_w_int8[] = {{{items}}};\nconst float bitc_scale = 0.01f;\n',
        "main.c": MAIN_C,
        "startup.c": STARTUP_C,
        "semihost.h": SEMIHOST_H,
        "semihost.c": SEMIHOST_C,
        "linker.ld": linker_ld(board),
        "Makefile": makefile(board),
    }
    for name, text in files.items():
        (directory / name).write_text(text)
    return qemu.build(directory)


def measure(target_name: str) -> dict:
    target = bc.Target(target_name)
    torch.manual_seed(0)
    x = torch.randn(1, K)
    row: dict = {"target": target_name, "shape": f"{K}x{N}"}
    for label, scheme in (
        ("w1a1", "binary:act=binary,first_last=quantize"),
        ("w1a32", "binary:first_last=quantize"),
    ):
        cm = bc.compile(nn.Linear(K, N), (x,), target=target, scheme=scheme)
        row[f"{label}_instructions"] = cm.report().extra["instructions"]
        row[f"{label}_flash"] = cm.report().extra["flash_bytes"]
    with tempfile.TemporaryDirectory() as tmp:
        elf = _int8_bundle(Path(tmp), target)
        xq = np.clip(np.round(x.numpy() * 40), -127, 127).astype(np.float32)
        res = qemu.run(board_for(target), elf, xq, N, count=True)
        row["int8_c_instructions"] = res.instructions
        row["int8_c_flash"] = qemu.sizes(elf).flash_bytes
    row["speedup_w1a1_vs_int8_c"] = round(row["int8_c_instructions"] / row["w1a1_instructions"], 2)
    return row


def main() -> None:
    targets = sys.argv[1:] or ["cortex-m4"]
    rows = [measure(t) for t in targets]
    for r in rows:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
