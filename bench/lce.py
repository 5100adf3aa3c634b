"""bitcompiler against Larq Compute Engine (LCE) on the same binary architectures, at BENCH_THREADS.

LCE lives in its own environment (``make peers``: ``.peers/lce``, TensorFlow 2.16 and numpy 1.x,
which this project's environment cannot hold). ``bench/lce_worker.py`` runs there: it builds the
models in Larq, converts them with ``convert_keras_model``, checks the ``LceBconv2d``/``LceQuantize``
ops, and times LCE's interpreter on request, both its default path and ``use_indirect_bgemm=True``
(its fastest on x86: LCE's optimized kernels are Arm-only), at the same thread count as ours. This
process compiles the torch models, checks them against ``cm.reference`` and times them; the two
processes take turns (ours, LCE default, LCE indirect, three rounds), and each time is the median
of the rounds' medians. Without ``.peers/lce`` the rows say so and carry no LCE times.

How the models correspond (torch: ``bench/zoo.py``, ``binary:act=binary``; Larq:
``bench/lce_worker.py``):

* **ResNet-18 (CIFAR)**: the same layers. The stem conv (3x3, 64) and the classifier stay full
  precision in both. Every other conv is binary: signs of the inputs and of the weights. BN
  follows every conv (ours is folded into the binary kernel's epilogue, LCE fuses it into
  ``LceBconv2d``'s multiplier and bias). Shortcuts where the shape changes are a binary 1x1 conv
  (stride 2) + BN in both; the others are identity. Each block ends in ``hardtanh(y + shortcut)``
  (LCE: ``RELU_N1_TO_1``); the binary conv inside a block reads ``hardtanh(bn(conv))``.
  **Padding differs**: ours is torch's (zeros, which count 0 in a binary conv); LCE's models pad
  with +1 (``pad_values=1.0``), its fast path: with zeros (``pad_values=0.0``, the same numbers as
  ours) LCE's ResNet-18 measured 23-27 ms against 15 ms with +1 (indirect bgemm, one thread, this
  VM under load), so the faster peer is the one timed.
* **bconv**: one binary 3x3 256->256 conv on 14x14, padded as above, float outputs (ours also
  applies the per-channel scale and bias of the torch conv's epilogue; LCE's has none).
* **dense**: the 4096x4096 binary dense; in Larq a 1x1 binary conv on a 1x1x4096 map, because LCE
  0.16 converts a binary ``QuantDense`` to a float ``FULLY_CONNECTED``.

Inputs are float in both (NCHW for ours, NHWC for LCE), one image, whole calls (Python included).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench.harness import median_seconds

THREADS = int(os.environ.get("BENCH_THREADS", "1"))
torch.set_num_threads(THREADS)

import bitcompiler as bc
from bench import zoo
from bench.layers import check

ROOT = Path(__file__).resolve().parent.parent
LCE_PYTHON = ROOT / ".peers" / "lce" / "bin" / "python"
ROUNDS = 3
SECONDS = 0.3  # per timing, each side


class Worker:
    """The LCE process: one request per line, one answer per line (``bench/lce_worker.py``)."""

    def __init__(self, models: list[str]) -> None:
        env = dict(os.environ, TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL="3")
        self.proc = subprocess.Popen(
            [str(LCE_PYTHON), str(ROOT / "bench" / "lce_worker.py"), *models],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=env,
        )
        self._expect_ok(self._line())

    def _line(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the LCE worker exited (status {self.proc.wait()})")
        return line.strip()

    @staticmethod
    def _expect_ok(line: str) -> str:
        if not line.startswith("ok"):
            raise RuntimeError(f"the LCE worker answered: {line}")
        return line[3:]

    def ask(self, request: str) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(request + "\n")
        self.proc.stdin.flush()
        return self._expect_ok(self._line())

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait()


def ours() -> dict[str, tuple[str, torch.nn.Module, tuple, str]]:
    """LCE model name -> (benchmark name, torch model, input shape, scheme)."""
    torch.manual_seed(0)
    w1a1 = "binary:act=binary,first_last=quantize"
    return {
        "resnet18": ("ResNet-18 (CIFAR)", zoo.randomized(zoo.ResNet18()), (3, 32, 32), "binary:act=binary"),
        "bconv": (
            "bconv 3x3 256->256 14x14",
            torch.nn.Conv2d(256, 256, 3, padding=1).eval(),
            (256, 14, 14),
            w1a1,
        ),
        "dense": ("dense 4096² (LCE: 1x1 bconv)", torch.nn.Linear(4096, 4096).eval(), (4096,), w1a1),
    }


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def absent_reason() -> str | None:
    """Why LCE cannot be timed here, or None."""
    if not LCE_PYTHON.exists():
        return f"LCE not installed ({LCE_PYTHON} missing: run `make peers`)"
    return None


def main() -> None:
    models = ours()
    absent = absent_reason()
    worker = None if absent else Worker(list(models))
    rows = []
    for lce_name, (name, model, shape, scheme) in models.items():
        x = torch.randn(1, *shape)
        cm = bc.compile(model, (x,), scheme=scheme)
        check(cm, x)
        row: dict = {"bench": name, "scheme": scheme, "batch": 1, "threads": THREADS}
        times: dict[str, list[float]] = {"bitc": [], "lce": [], "lce_indirect": []}
        for _ in range(ROUNDS):
            call = lambda cm=cm, x=x: cm(x)
            times["bitc"].append(1e3 * median_seconds(call, min_time=SECONDS, max_time=SECONDS))
            if worker is not None:
                for key, path in (("lce", "default"), ("lce_indirect", "indirect")):
                    times[key].append(float(worker.ask(f"time {lce_name} {path} {THREADS} {SECONDS}")))
        row.update({f"{k}_ms": median(v) for k, v in times.items() if v})
        if worker is not None:
            row["lce_ops"] = worker.ask(f"ops {lce_name}")
        else:
            row["lce_absent"] = absent
        rows.append(row)
    if worker is not None:
        worker.close()
    print(json.dumps(rows))


def markdown(rows: list[dict]) -> list[str]:
    from bench.harness import markdown_table

    body = []
    for r in rows:
        cells = [r["bench"], str(r["batch"]), str(r["threads"]), f"{r['bitc_ms']:.3f}"]
        if "lce_ms" not in r:
            body.append([*cells, r.get("lce_absent", "not measured"), "–"])
            continue
        for key in ("lce_ms", "lce_indirect_ms"):
            cells.append(f"**{r[key] / r['bitc_ms']:.1f}x** ({r[key]:.3f})")
        body.append(cells)
    head = ["benchmark", "batch", "thr", "bitcompiler ms", "vs LCE default", "vs LCE indirect bgemm"]
    notes = [
        "",
        (
            "LCE 0.16 (`make peers`) runs in its own process, taking turns with ours (three rounds, "
            "median); the same architectures built in Larq and converted with `convert_keras_model` "
            "(ops checked: `LceBconv2d`, `LceQuantize`). How the models correspond: `bench/lce.py`."
        ),
    ]
    ops = {r["bench"]: r["lce_ops"] for r in rows if "lce_ops" in r and r["threads"] == 1}
    notes += [f"- {name}: LCE ops {o}" for name, o in ops.items()]
    return markdown_table(head, body) + notes


if __name__ == "__main__":
    if "--help" in sys.argv:
        print(__doc__)
    else:
        t0 = time.perf_counter()
        main()
        print(f"lce bench: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
