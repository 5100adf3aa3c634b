"""Build a Cortex-M bundle's model code for the host, optionally under AddressSanitizer and
UndefinedBehaviorSanitizer.

The bundle's six model files (``model.c``, ``kernels.c``, ``weights.c`` and their headers) are
plain C99 plus a few Arm-only inline-asm popcount helpers that fall back to C elsewhere, so the
same code the firmware runs compiles with the host's ``gcc``. A small ``host_main.c`` replaces the
QEMU harness: it reads ``BITC_INPUT_SIZE`` little-endian float32 values from the file named by
its first argument, calls ``bitc_run`` and writes ``BITC_OUTPUT_SIZE`` floats to the second.

>>> exe = host_build(cm._runner.bundle, sanitize=True)  # doctest: +SKIP
>>> y = host_run(exe, x[:1].numpy())  # doctest: +SKIP
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

HOST_MAIN_C = """\
/* Host harness for a bitcompiler Cortex-M bundle: float32 in from argv[1], out to argv[2]. */
#include <stdio.h>
#include "model.h"

static float input[BITC_INPUT_SIZE];
static float output[BITC_OUTPUT_SIZE];

int main(int argc, char **argv) {
  if (argc != 3) {
    fprintf(stderr, "usage: %s in.bin out.bin\\n", argv[0]);
    return 2;
  }
  FILE *f = fopen(argv[1], "rb");
  if (!f || fread(input, sizeof input, 1, f) != 1) return 2;
  fclose(f);
  int rc = bitc_run(input, output);
  f = fopen(argv[2], "wb");
  if (!f || fwrite(output, sizeof output, 1, f) != 1) return 3;
  fclose(f);
  return rc;
}
"""

SOURCES = ["model.c", "kernels.c", "weights.c", "host_main.c"]
SANITIZE_FLAGS = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]


class HostBuildError(RuntimeError):
    """The host compiler is missing, the bundle did not compile, or the program failed."""


def host_build(bundle_dir: str | Path, sanitize: bool = True, cc: str = "gcc") -> Path:
    """Compile the bundle's model code with ``host_main.c`` into ``bundle_dir/host.elf``.

    ``sanitize=True`` adds ``-fsanitize=address,undefined -fno-sanitize-recover=all``: the first
    out-of-bounds access, overflow or misaligned load aborts the program with a report.
    """
    bundle = Path(bundle_dir)
    if shutil.which(cc) is None:
        raise HostBuildError(f"{cc} not found; install a host C compiler (e.g. apt-get install gcc)")
    (bundle / "host_main.c").write_text(HOST_MAIN_C)
    exe = bundle / ("host-asan.elf" if sanitize else "host.elf")
    flags = ["-std=gnu99", "-O1", "-g", "-ffp-contract=off", "-Wall", "-Wno-unused-variable"]
    flags += ["-Wno-unused-function", "-DBITC_KERNEL="]
    cmd = [cc, *flags, *(SANITIZE_FLAGS if sanitize else []), *SOURCES, "-lm", "-o", exe.name]
    proc = subprocess.run(cmd, cwd=bundle, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise HostBuildError(f"host build in {bundle} failed ({' '.join(cmd)}):\n{proc.stderr[-4000:]}")
    return exe


def host_run(exe: str | Path, x: np.ndarray, timeout: float = 120) -> np.ndarray:
    """Run the host program on one sample ``x`` (batch of one); return its output floats.

    A sanitizer report or a non-zero exit is a :class:`HostBuildError` carrying the report."""
    with tempfile.TemporaryDirectory(prefix="bitc-host-") as tmp:
        src, dst = Path(tmp) / "in.bin", Path(tmp) / "out.bin"
        src.write_bytes(np.ascontiguousarray(x, dtype="<f4").tobytes())
        proc = subprocess.run(
            [str(exe), str(src), str(dst)], capture_output=True, text=True, timeout=timeout, check=False
        )
        if proc.returncode != 0 or "runtime error" in proc.stderr:
            raise HostBuildError(f"{exe} exited with {proc.returncode}:\n{proc.stderr[-4000:]}")
        return np.frombuffer(dst.read_bytes(), dtype="<f4").copy()
