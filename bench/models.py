"""Whole models: binary CIFAR ResNet-18 and an MLP-Mixer, compiled W1A1 (first/last 8-bit) vs peers.

Also measures compile time without tuning and a cached recompile. One JSON line.
"""

from __future__ import annotations

import json
import os
import time

import torch

THREADS = int(os.environ.get("BENCH_THREADS", "1"))
torch.set_num_threads(THREADS)

import bitcompiler as bc
from bench import zoo
from bench.layers import bench_layer

SCHEME = "binary:act=binary"


def recompile_s(model: torch.nn.Module, shape: tuple) -> float:
    t0 = time.perf_counter()
    bc.compile(model, (torch.randn(1, *shape),), scheme=SCHEME)
    return time.perf_counter() - t0


def main() -> None:
    torch.manual_seed(0)
    peers = ("torch_fp32", "ort_fp32", "ort_int8", "tvm_fp32")
    rows = []
    for name, model, shape in (
        ("ResNet-18 (CIFAR)", zoo.randomized(zoo.ResNet18()), (3, 32, 32)),
        ("MLP-Mixer", zoo.MLPMixer().eval(), (3, 32, 32)),
    ):
        r = bench_layer(name, model, shape, SCHEME, (1,), peers)
        r[0]["cached_recompile_s"] = recompile_s(model, shape)
        rows += r
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
