"""Cortex-M instruction counts: bitcompiler's 256x256 W1A1 dense vs int8 baselines.

Baselines: a plain C int8 dot-product loop, and CMSIS-DSP's ``arm_dot_prod_q7`` per output row
(built from the ``cmsisdsp`` sdist's C sources with ``ARM_MATH_LOOPUNROLL``; on cores with the DSP
extension, M4/M7/M55, ``ARM_MATH_DSP`` is on and the loop runs on ``__SXTB16`` + ``__SMLAD``).
All run as firmware under QEMU (same harness, same markers, same board flags, ``-O2``); the count
is the instructions executed between the markers. Run: ``python -m bench.cortex_m [cortex-m4 ...]``.

The CMSIS-DSP sources come from ``$CMSIS_DSP_DIR`` (a CMSIS-DSP checkout) or are fetched once with
``pip download --no-binary :all: cmsisdsp==<installed version>`` into ``~/.cache/bitcompiler``.
The pip package has no CMSIS-Core headers, so the few CMSIS-Core macros ``arm_math.h`` needs are
defined in a small ``cmsis_compiler.h`` here (the same instructions CMSIS-Core's GCC header emits).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import bitcompiler as bc
from bench.harness import markdown_table
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


CMSIS_MODEL_C = """\
/* Baseline: y[n] = s * arm_dot_prod_q7(W[n,:], x), CMSIS-DSP q7 dot product per output row. */
#include "dsp/basic_math_functions.h"
#include "model.h"
#include "weights.h"

static q7_t xq[%(K)d];

int bitc_run(const float *in, float *out) {
  for (int k = 0; k < %(K)d; ++k) xq[k] = (q7_t)in[k];  /* input already holds int8 values */
  for (int n = 0; n < %(N)d; ++n) {
    q31_t acc;
    arm_dot_prod_q7(bitc_w_int8 + n * %(K)d, xq, %(K)d, &acc);
    out[n] = bitc_scale * (float)acc;
  }
  return 0;
}
"""

CMSIS_MATVEC_C = """\
/* Baseline: y = arm_mat_vec_mult_q7(W, x), CMSIS-DSP's q7 matrix x vector (4 rows at a time; its
   q7 output is the int32 sum >> 7, saturated). */
#include "dsp/matrix_functions.h"
#include "model.h"
#include "weights.h"

static q7_t xq[%(K)d];
static q7_t yq[%(N)d];

int bitc_run(const float *in, float *out) {
  for (int k = 0; k < %(K)d; ++k) xq[k] = (q7_t)in[k];  /* input already holds int8 values */
  arm_matrix_instance_q7 w = {%(N)d, %(K)d, (q7_t *)bitc_w_int8};
  arm_mat_vec_mult_q7(&w, xq, yq);
  for (int n = 0; n < %(N)d; ++n) out[n] = bitc_scale * (float)yq[n];
  return 0;
}
"""

# CMSIS-Core's compiler macros that CMSIS-DSP's headers use, for GCC (CMSIS-Core is not in the
# cmsisdsp package). The DSP intrinsics map to the ACLE builtins: the same SXTB16 / SMLAD.
CMSIS_COMPILER_H = """\
#pragma once
#include <stdint.h>
#define __ASM __asm
#define __INLINE inline
#define __STATIC_INLINE static inline
#define __STATIC_FORCEINLINE __attribute__((always_inline)) static inline
#define __ALIGNED(x) __attribute__((aligned(x)))
#define __PACKED __attribute__((packed))
#define __RESTRICT __restrict
#define __CLZ(x) ((uint8_t)__builtin_clz(x))
__STATIC_FORCEINLINE uint32_t __ROR(uint32_t x, uint32_t n) {
  n &= 31u;
  return n == 0u ? x : (x >> n) | (x << (32u - n));
}
#if defined(__ARM_FEATURE_DSP) && __ARM_FEATURE_DSP == 1
#include <arm_acle.h>
#define __SMLAD(x, y, sum) ((int32_t)__smlad((x), (y), (sum)))
#define __SXTB16(x) ((uint32_t)__sxtb16((x)))
#define __SSAT(x, n) __ssat((x), (n))
#else
__STATIC_FORCEINLINE int32_t __SSAT(int32_t x, uint32_t n) {
  int32_t hi = (int32_t)((1u << (n - 1u)) - 1u), lo = -hi - 1;
  return x > hi ? hi : x < lo ? lo : x;
}
#endif
"""
CMSIS_FILES = (
    "Include",
    "PrivateInclude",
    "Source/BasicMathFunctions/arm_dot_prod_q7.c",
    "Source/MatrixFunctions/arm_mat_vec_mult_q7.c",
    "LICENSE",
)


def cmsis_dsp_dir() -> Path:
    """A CMSIS-DSP source tree: ``$CMSIS_DSP_DIR``, or the installed cmsisdsp's sdist (cached)."""
    if os.environ.get("CMSIS_DSP_DIR"):
        return Path(os.environ["CMSIS_DSP_DIR"])
    try:
        version = metadata.version("cmsisdsp")
    except metadata.PackageNotFoundError as e:
        raise RuntimeError("CMSIS-DSP baseline: pip install -e '.[bench]' (needs cmsisdsp)") from e
    cache = Path("~/.cache/bitcompiler").expanduser() / f"cmsisdsp-{version}"
    if all((cache / f).exists() for f in CMSIS_FILES):
        return cache
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:"]
        cmd += ["--no-build-isolation", "-d", tmp, f"cmsisdsp=={version}"]
        subprocess.run(cmd, check=True, capture_output=True)
        (sdist,) = Path(tmp).glob("cmsisdsp-*.tar.gz")
        staging = Path(tmp) / "src"
        with tarfile.open(sdist) as tar:
            prefix = f"cmsisdsp-{version}/"
            members = [
                m for m in tar.getmembers() if m.name.startswith(tuple(prefix + f for f in CMSIS_FILES))
            ]
            for m in members:
                m.name = m.name[len(prefix) :]
            tar.extractall(staging, members=members, filter="data")
        cache.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(staging, cache, dirs_exist_ok=True)
    return cache


def _int8_bundle(directory: Path, target: bc.Target, cmsis: Path | None = None, matvec: bool = False) -> Path:
    """The int8 baseline firmware: the plain C loop, or from ``cmsis`` ``arm_dot_prod_q7`` per row
    (``matvec``: ``arm_mat_vec_mult_q7``)."""
    board = board_for(target)
    rng = np.random.default_rng(0)
    w = rng.integers(-127, 128, size=(N, K), dtype=np.int8)
    items = ",".join(str(int(v)) for v in w.reshape(-1))
    model_c, kernels_c, make = INT8_MODEL_C, "", makefile(board)
    if cmsis is not None:
        model_c = CMSIS_MATVEC_C if matvec else CMSIS_MODEL_C
        kernels_c = (cmsis / CMSIS_FILES[3 if matvec else 2]).read_text(encoding="utf-8-sig")
        (directory / "cmsis_compiler.h").write_text(CMSIS_COMPILER_H)
        flags = f"-I. -I{cmsis / 'Include'} -I{cmsis / 'PrivateInclude'} -DARM_MATH_LOOPUNROLL"
        if "mve" in target.capabilities.features:  # CMSIS-DSP's Helium code (mat x vec has one)
            flags += " -DARM_MATH_HELIUM"
        make = make.replace("\nARCH    := ", f"\nARCH    := {flags} ", 1)
    files = {
        "model.h": f"#pragma once\n#define BITC_INPUT_SIZE {K}\n#define BITC_OUTPUT_SIZE {N}\nint bitc_run(const float *in, float *out);\n",
        "model.c": model_c % {"K": K, "N": N},
        "kernels.h": "",
        "kernels.c": kernels_c,
        "weights.h": "#include <stdint.h>\nextern const int8_t bitc_w_int8[];\nextern const float bitc_scale;\n",
        "weights.c": f'#include "weights.h"\nconst int8_t bitc_w_int8[] = {{{items}}};\nconst float bitc_scale = 0.01f;\n',
        "main.c": MAIN_C,
        "startup.c": STARTUP_C,
        "semihost.h": SEMIHOST_H,
        "semihost.c": SEMIHOST_C,
        "linker.ld": linker_ld(board),
        "Makefile": make,
    }
    for name, text in files.items():
        (directory / name).write_text(text)
    return qemu.build(directory)


DENSE_SCHEMES = {
    "w1a1": "binary:act=binary,first_last=quantize",
    "w1a32": "binary:first_last=quantize",  # 1-bit weights, float activations
    "int8": "uniform:bits=8,act=8,first_last=quantize",  # 8-bit codes x int8 activations
    "tiled": "tiled:p=4,act=binary,first_last=quantize",
}
DENSE_OPTIONS = {"w1a32_notables": ("binary:first_last=quantize", {"act_tables": False})}  # no RAM tables


def _bitcompiler_dense(target: bc.Target, x: torch.Tensor, prefix: str = "") -> dict:
    """Instructions, flash and RAM of the 256x256 layer per scheme (and target options) on
    ``target``; output == reference."""
    row = {}
    variants = {label: (scheme, {}) for label, scheme in DENSE_SCHEMES.items()}
    for label, (scheme, options) in {**variants, **DENSE_OPTIONS}.items():
        t = bc.Target(target.name, **{**dict(target.options), **options}) if options else target
        cm = bc.compile(nn.Linear(K, N), (x,), target=t, scheme=scheme)
        xs = torch.randn(2, K)
        assert torch.allclose(cm(xs), cm.reference(xs), rtol=1e-5, atol=1e-5), f"{label}: output != reference"
        extra = cm.report().extra
        row[f"{prefix}{label}_instructions"] = extra["instructions"]
        row[f"{prefix}{label}_flash"] = extra["flash_bytes"]
        row[f"{prefix}{label}_ram"] = extra["ram_bytes"]
        row[f"{prefix}{label}_kernels"] = [k for k in extra["kernels"].values() if "quantize" not in k]
    return row


def _baselines(target: bc.Target, x: torch.Tensor) -> dict:
    """The plain C int8 loop and CMSIS-DSP's q7 dot product per row and matrix x vector."""
    row: dict = {}
    xq = np.clip(np.round(x.numpy() * 40), -127, 127).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        elf = _int8_bundle(Path(tmp), target)
        res = qemu.run(board_for(target), elf, xq, N, count=True)
        row["int8_c_instructions"], row["int8_c_flash"] = res.instructions, qemu.sizes(elf).flash_bytes
    with tempfile.TemporaryDirectory() as tmp:
        elf = _int8_bundle(Path(tmp), target, cmsis_dsp_dir())
        cmsis = qemu.run(board_for(target), elf, xq, N, count=True)
        assert np.array_equal(cmsis.output, res.output), "CMSIS-DSP q7 and the C loop disagree"
        row["cmsis_q7_instructions"], row["cmsis_q7_flash"] = cmsis.instructions, qemu.sizes(elf).flash_bytes
    with tempfile.TemporaryDirectory() as tmp:
        elf = _int8_bundle(Path(tmp), target, cmsis_dsp_dir(), matvec=True)
        matvec = qemu.run(board_for(target), elf, xq, N, count=True)
        expected = np.clip(np.floor(res.output / np.float32(0.01) + 0.5) // 128, -128, 127) * np.float32(0.01)
        assert np.allclose(matvec.output, expected, rtol=1e-5), "arm_mat_vec_mult_q7 and the C loop disagree"
        row["cmsis_matvec_q7_instructions"] = matvec.instructions
        row["cmsis_matvec_q7_flash"] = qemu.sizes(elf).flash_bytes
    return row


def measure(target_name: str) -> dict:
    """The 256x256 dense: bitcompiler per scheme vs the int8 baselines; on a Helium core also
    bitcompiler without Helium (``mve=False``: the scalar DSP kernels), prefixed ``scalar_``."""
    target = bc.Target(target_name)
    torch.manual_seed(0)
    x = torch.randn(1, K)
    row: dict = {"bench": f"dense {K}x{N}", "target": target_name, "batch": 1, "threads": 1}
    row.update(_bitcompiler_dense(target, x))
    if "mve" in target.capabilities.features:
        row.update(_bitcompiler_dense(bc.Target(target_name, mve=False), x, "scalar_"))
    row.update(_baselines(target, x))
    row["speedup_w1a1_vs_int8_c"] = round(row["int8_c_instructions"] / row["w1a1_instructions"], 2)
    row["speedup_w1a1_vs_cmsis_q7"] = round(row["cmsis_q7_instructions"] / row["w1a1_instructions"], 2)
    return row


MLP_SCHEMES = {
    "default": "binary",  # fc1 and fc2 keep 8-bit codes, float activations (the default scheme)
    "binary": "binary:act=binary,first_last=quantize",
    "tiled p=4": "tiled:p=4,act=binary,first_last=quantize",  # fc1 tiled; fc2 is too small (binary)
    "int8": "uniform:bits=8,act=8,first_last=quantize",  # 8 weight bit-planes x int8 activations
}


def measure_mlp(target_name: str) -> list[dict]:
    """MLP 784-128-10 on the board: instructions, flash and RAM per scheme; output == reference."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 10))
    x = torch.randn(1, 1, 28, 28)
    rows = []
    for variant, scheme in MLP_SCHEMES.items():
        cm = bc.compile(net, (x,), target=bc.Target(target_name), scheme=scheme)
        assert torch.allclose(cm(x), cm.reference(x), rtol=1e-5, atol=1e-5), f"{variant}: output != reference"
        extra = cm.report().extra
        rows.append(
            {
                "bench": "mlp 784-128-10",
                "variant": variant,
                "scheme": scheme,
                "target": target_name,
                "batch": 1,
                "threads": 1,
                **{k: extra[k] for k in ("instructions", "flash_bytes", "ram_bytes", "weights_flash_bytes")},
            }
        )
    return rows


class IssueCNN(nn.Module):
    """The small binary CNN of the Cortex-M memory issue: 1 -> 32 -> 32 -> 64 channels, 3x3 convs,
    28x28 input, BatchNorm, ReLU, a residual add at full resolution, a max-pool, global average
    pooling and a 64 -> 10 classifier. The stem has no ReLU: a binary conv reading the signs of a
    ReLU's output would see all ones whatever the image."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32)
        self.c2, self.b2 = nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32)
        self.c3, self.b3 = nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64)
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.b1(self.c1(x))  # signed, so the signs c2 and c3 read vary with the image
        x = x + F.relu(self.b2(self.c2(x)))  # two 28x28x32 maps
        x = F.max_pool2d(x, 2)
        x = F.relu(self.b3(self.c3(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def issue_cnn() -> nn.Module:
    """:class:`IssueCNN` with seeded weights and BatchNorm statistics, in eval mode."""
    torch.manual_seed(0)
    net = IssueCNN()
    for bn in (net.b1, net.b2, net.b3):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.5, 0.5)
    return net.eval()


def measure_cnn(target_name: str, **options: object) -> dict:
    """The issue's CNN (``binary:act=binary``) on the board: RAM, flash, instructions; output ==
    reference (bit for bit)."""
    net, x = issue_cnn(), torch.randn(1, 1, 28, 28)
    cm = bc.compile(net, (x,), target=bc.Target(target_name, **options), scheme="binary:act=binary")
    xs = torch.randn(2, 1, 28, 28)
    assert torch.equal(cm(xs), cm.reference(xs)), "cnn: output != reference"
    extra = cm.report().extra
    keys = ("instructions", "flash_bytes", "ram_bytes", "arena_bytes", "stack_bytes", "arena_peak_layer")
    row = {"bench": "cnn 1-32-32-64", "target": target_name, "batch": 1, "threads": 1}
    return {**row, "options": dict(options), **{k: extra[k] for k in keys}}


def _cell(r: dict, key: str) -> str:
    return f"{r[f'{key}_instructions']:,} ({r[f'{key}_flash']:,} B)"


def markdown(rows: list[dict]) -> list[str]:
    """The Cortex-M section of BENCHMARKS.md: instruction counts (exact, QEMU), flash and RAM."""
    lines = [
        (
            "Instructions executed by one inference, counted exactly under QEMU between markers around "
            "the model call (same harness, `arm-none-eabi-gcc -O2`, board flags); flash in parentheses. "
            "CMSIS-DSP q7: `arm_dot_prod_q7` per row; mat x vec: `arm_mat_vec_mult_q7` (4 rows at a time, "
            "Helium on M55). `Nx` = baseline instructions / bitcompiler instructions. "
            "Reproduce: `python -m bench.cortex_m cortex-m4 cortex-m55`."
        ),
        "",
    ]
    dense = [r for r in rows if r["bench"].startswith("dense")]
    cols = ("w1a1", "w1a32", "w1a32_notables", "int8", "int8_c", "cmsis_q7", "cmsis_matvec_q7")
    body = [[r["target"], *(_cell(r, c) if f"{c}_flash" in r else "-" for c in cols)] for r in dense]
    head = [
        "target",
        "W1A1",
        "W1 (float act)",
        "W1, `act_tables=False`",
        "int8",
        "plain C int8",
        "CMSIS-DSP q7",
        "CMSIS mat x vec q7",
    ]
    lines += [
        f"**dense {K}x{N}** (bitcompiler: W1A1, W1 with float activations, int8 = `uniform:bits=8,act=8`)",
        "",
    ]
    lines += markdown_table(head, body) + [""]
    ratios = [
        [r["target"]]
        + [
            f"{r[f'{b}_instructions'] / r[f'{c}_instructions']:.1f}x"
            for b in ("cmsis_q7", "cmsis_matvec_q7")
            for c in ("w1a1", "w1a32", "int8")
        ]
        for r in dense
    ]
    head = [
        "target",
        *(f"{c} vs {b}" for b in ("CMSIS q7", "mat x vec") for c in ("W1A1", "W1 float", "int8")),
    ]
    lines += markdown_table(head, ratios) + [""]
    helium = [r for r in dense if "scalar_w1a1_instructions" in r]
    if helium:
        lines += ["**Helium (MVE) against the scalar kernels** (`Target(..., mve=False)`), same layer:", ""]
        body = []
        for r in helium:
            for c in DENSE_SCHEMES:
                cells = [r["target"], c, _cell(r, f"scalar_{c}"), _cell(r, c)]
                cells.append(f"**{r[f'scalar_{c}_instructions'] / r[f'{c}_instructions']:.2f}x**")
                cells.append(", ".join(f"`{k}`" for k in r[f"{c}_kernels"]))
                body.append(cells)
        head = ["target", "layer", "scalar", "Helium", "scalar / Helium", "kernels (Helium build)"]
        lines += markdown_table(head, body) + [""]
    mlp = [
        [r["target"], r["bench"], r["variant"], f"`{r['scheme']}`"]
        + [f"{r['instructions']:,}", f"{r['flash_bytes']:,}", f"{r['ram_bytes']:,}"]
        for r in rows
        if r["bench"].startswith("mlp")
    ]
    head = ["target", "model", "weights", "scheme", "instructions", "flash B", "RAM B"]
    lines += markdown_table(head, mlp)
    cnn = [
        [r["target"], ", ".join(f"{k}={v}" for k, v in r["options"].items()) or "-"]
        + [f"{r[k]:,}" for k in ("instructions", "flash_bytes", "ram_bytes", "arena_bytes", "stack_bytes")]
        + [r["arena_peak_layer"]]
        for r in rows
        if r["bench"].startswith("cnn")
    ]
    if cnn:
        lines += ["", "**The memory issue's CNN** (`bench.cortex_m.IssueCNN`, `binary:act=binary`):", ""]
        head = ["target", "options", "instructions", "flash B", "RAM B", "arena B", "stack B", "peak at"]
        lines += markdown_table(head, cnn)
    return lines


def main() -> None:
    targets = sys.argv[1:] or ["cortex-m4", "cortex-m55"]
    rows = []
    for t in targets:
        rows += [measure(t), *measure_mlp(t), measure_cnn(t)]
    print("\n".join(markdown(rows)), file=sys.stderr)
    print(json.dumps(rows))  # last line: the rows, for bench/__main__.py


if __name__ == "__main__":
    main()
