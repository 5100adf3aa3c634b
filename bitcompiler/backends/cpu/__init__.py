"""Host CPU backend: LLVM with the detected (or given) ``-mcpu``, run by the Relax VM.

``Target("cpu")`` compiles for this machine; ``Target("cpu", mcpu="x86-64-v2")`` for another
x86 CPU (its ISA features choose the kernels, e.g. no AVX2 kernels without AVX2).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from bitcompiler import amx
from bitcompiler.backends.base import Backend, BuildInput, Capabilities, Target, register_backend
from bitcompiler.backends.cpu.build import build_cached, build_relax, load_library
from bitcompiler.backends.cpu.pipeline import relax_pipeline
from bitcompiler.backends.cpu.runner import LIB, CPURunner, quiet_native_stderr

__all__ = ["LIB", "CPUBackend", "CPURunner", "build_relax", "quiet_native_stderr", "relax_pipeline"]

# ISA features the kernel choosers and passes may ask about, and the vector width each gives
_FEATURES = {"sse4.2": 128, "avx": 256, "avx2": 256, "fma": 0, "avx512f": 512, "neon": 128}


@register_backend
class CPUBackend(Backend):
    family = "cpu"
    targets = ("cpu",)
    tunable = True

    def build(self, inp: BuildInput, target: Target) -> CPURunner:
        return build_cached(inp, target)

    def load(self, directory: Path, target: Target) -> CPURunner:
        return load_library(directory)

    def tvm_target(self, target: Target) -> Any:
        import tvm
        from tvm.target import codegen

        mcpu = target.get("mcpu") or codegen.llvm_get_system_cpu()
        spec = {"kind": "llvm", "mcpu": mcpu, "num-cores": _cores()}
        mattr = []
        if mcpu.startswith(("znver", "bdver", "btver", "amdfam10")):
            # no SSE4a: LLVM's SLP vectorizer sometimes gathers byte lanes with the legacy-SSE
            # `insertq`, which made a 128x64 W1A1 dense 50x slower (1.4 ms instead of 28 µs
            # at batch 256) when it was built next to any other function (measured on znver3)
            mattr.append("-sse4a")
        if not target.get("mcpu") and amx.enable():
            # this host's AMX tiles (LLVM names some AMX CPUs by an older model without them);
            # the W1A1 convs that fit run on them (kernels/conv_amx.py)
            mattr += ["+amx-tile", "+amx-int8"]
        if mattr:
            spec["mattr"] = mattr
        return tvm.target.Target(spec)

    def capabilities(self, target: Target) -> Capabilities:
        from tvm.target import codegen

        tvm_target = self.tvm_target(target)
        features = set()
        for name in _FEATURES:
            try:
                if codegen.target_has_features(name, tvm_target):
                    features.add(name)
            except Exception:  # noqa: BLE001, S112 - a feature this LLVM does not know: absent
                continue
        vector_bits = max((_FEATURES[f] for f in features), default=0)
        return Capabilities(frozenset(features), 64, vector_bits, compact_weights=True)


def _cores() -> int:
    return int(os.environ.get("TVM_NUM_THREADS", os.cpu_count() or 1))
