"""Whole models: binary CIFAR ResNet-18 and an MLP-Mixer, compiled W1A1 (first/last 8-bit) vs peers,
and the demo CNN (`make demo`'s model) against torch fp32 at batch 1 and 64, alternating in this
process (this thread's CPU time).

Also measures compile time without tuning and a cached recompile. One JSON line.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from pathlib import Path

import torch

THREADS = int(os.environ.get("BENCH_THREADS", "1"))
torch.set_num_threads(THREADS)

import bitcompiler as bc
from bench import zoo
from bench.harness import alternate_cpu_ms
from bench.layers import bench_layer

SCHEME = "binary:act=binary"


def recompile_s(model: torch.nn.Module, shape: tuple) -> float:
    t0 = time.perf_counter()
    bc.compile(model, (torch.randn(1, *shape),), scheme=SCHEME)
    return time.perf_counter() - t0


def demo_models() -> tuple[torch.nn.Module, torch.nn.Module]:
    """`make demo`'s CNN (examples/demo.py's ``small_cnn`` for 28x28 images): ``(float, prepared)``,
    the second prepared for ``binary:act=binary`` with BatchNorm statistics of a few random
    batches (not trained: the speed does not depend on the weights)."""
    path = Path(__file__).resolve().parent.parent / "examples" / "demo.py"
    spec = importlib.util.spec_from_file_location("bitc_demo", path)
    assert spec is not None and spec.loader is not None
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    net = bc.prepare(demo.small_cnn(28), SCHEME).train()
    with torch.no_grad():
        for _ in range(3):
            net(torch.randn(64, 1, 28, 28))
    return demo.small_cnn(28).eval(), net.eval()


def demo_rows() -> list[dict]:
    """The demo CNN against the same architecture in torch fp32, each batch alternating."""
    fp32, net = demo_models()
    t0 = time.perf_counter()
    cm = bc.compile(net, (torch.randn(1, 1, 28, 28),), scheme=SCHEME)
    compile_s = time.perf_counter() - t0
    rows = []
    for batch in (1, 64):
        x = torch.randn(batch, 1, 28, 28)
        assert torch.equal(cm(x), cm.reference(x)), "demo CNN: compiled output differs from the reference"
        with torch.no_grad():
            peer, ours = alternate_cpu_ms(lambda: fp32(x), lambda: cm(x))  # noqa: B023
        row = {"bench": "demo CNN (28x28)", "scheme": SCHEME, "batch": batch, "threads": THREADS}
        rows.append({**row, "compile_s": compile_s, "bitc_ms": ours, "torch_fp32_ms": peer})
    return rows


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
    rows += demo_rows()
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
