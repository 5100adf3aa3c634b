"""The aarch64 Linux bundle: the Cortex-M bundle's model sources (``model.c/h``, ``kernels.c/h``,
``weights.c/h``: static memory plan, no malloc, no TVM runtime), the kernels' C built with the
NEON prelude of :mod:`.neon` and the NEON dense kernels of :mod:`.dense`, plus a Linux harness (``main.c``: float32 in from a file, out to
a file), a Makefile using ``aarch64-linux-gnu-gcc -O3 -mcpu=<core>`` and a README.
"""

from __future__ import annotations

from pathlib import Path

from bitcompiler.backends.aarch64 import dense, neon
from bitcompiler.backends.aarch64.cores import Core
from bitcompiler.backends.cortex_m.bundle import (
    MODEL_FILES,
    kernels_h,
    model_c,
    model_h,
    readme_head,
    weights_c,
)
from bitcompiler.backends.cortex_m.host import HOST_MAIN_C
from bitcompiler.backends.cortex_m.kernel_c import generate_c, split_kernels
from bitcompiler.backends.cortex_m.program import Program

HARNESS_FILES = ["main.c", "Makefile", "README.md"]
CFLAGS = "-O3 -std=gnu99 -ffp-contract=off -Wall -Wno-unused-variable -Wno-unused-function"

_MARKERS = """\
/* The instruction counter counts what runs between the first execution of each marker. */
__attribute__((noinline)) void bitc_marker_begin(void) { __asm volatile("nop"); }
__attribute__((noinline)) void bitc_marker_end(void) { __asm volatile("nop"); }

"""
_RUN = "  int rc = bitc_run(input, output);\n"


def linux_main(host_main: str) -> str:
    """The Linux harness: the Cortex-M bundle's host harness (``BITC_INPUT_SIZE`` float32 from
    argv[1], ``BITC_OUTPUT_SIZE`` float32 to argv[2]) with its run between two markers."""
    if _RUN not in host_main or "int main(" not in host_main:
        raise ValueError("the host harness has no `int main(` with a bitc_run call to mark")
    marked = host_main.replace("int main(", _MARKERS + "int main(", 1)
    return marked.replace(_RUN, "  bitc_marker_begin();\n" + _RUN + "  bitc_marker_end();\n", 1)


MAIN_C = linux_main(HOST_MAIN_C)


def makefile(core: Core) -> str:
    return f"""\
# Builds the model and its test harness for {core.name} ({core.arch}, Linux).
#   make                      -> app (static; on an aarch64 host without the cross compiler: make CC=gcc)
#   make run IN=x.bin OUT=y.bin -> runs it (under qemu-aarch64 unless this host is aarch64)
ifeq ($(origin CC),default)
CC      := aarch64-linux-gnu-gcc
endif
ARCH    := {" ".join(core.cflags)}
CFLAGS  ?= {CFLAGS}
SRCS    := model.c kernels.c weights.c main.c
QEMU    ?= $(if $(filter aarch64 arm64,$(shell uname -m)),,qemu-aarch64 -cpu {core.qemu_cpu})
IN      ?= bitc_in.bin
OUT     ?= bitc_out.bin

app: $(SRCS) model.h kernels.h weights.h
\t$(CC) $(ARCH) $(CFLAGS) -static $(SRCS) -lm -o $@

run: app
\t$(QEMU) ./app $(IN) $(OUT)

clean:
\trm -f app bitc_out.bin

.PHONY: run clean
"""


def readme(program: Program, core: Core) -> str:
    kernels = "from TVM's C code generator (the xnor-popcount sums run on NEON `cnt`)"
    head = readme_head(program, f"{core.name} (aarch64 Linux)", kernels, "")
    return f"""\
{head}
To use in your program, compile these six files with `-O3 {" ".join(core.cflags)}` and link `-lm`.

`main.c` is a test harness: `make && make run IN=x.bin OUT=y.bin` reads {program.input.numel} little-endian
float32 from `x.bin` and writes the output to `y.bin`, under `qemu-aarch64` unless the host is
aarch64. Needs `aarch64-linux-gnu-gcc` and `qemu-aarch64`
(`sudo apt-get install gcc-aarch64-linux-gnu qemu-user`).
"""


def write_bundle(program: Program, core: Core, directory: Path) -> list[str]:
    """Write every file of the bundle into ``directory``; return their names."""
    directory.mkdir(parents=True, exist_ok=True)
    wh, wc = weights_c(program.weights)
    tvm_kernels, c_kernels = split_kernels(program.kernels)
    kernels_c = generate_c(tvm_kernels, prelude=neon.PRELUDE + dense.PRELUDE, rewrite=neon.xor_popcount_runs)
    files = {
        "model.h": model_h(program),
        "model.c": model_c(program),
        "kernels.h": kernels_h(program),
        "kernels.c": kernels_c + "".join(c_kernels),
        "weights.h": wh,
        "weights.c": wc,
        "main.c": MAIN_C,
        "Makefile": makefile(core),
        "README.md": readme(program, core),
    }
    assert set(MODEL_FILES) <= set(files)
    for name, text in files.items():
        (directory / name).write_text(text)
    return list(files)
