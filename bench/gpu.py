"""GPU benchmark: exported CUDA plans run on a GPU without TVM, against the reference and PyTorch.

Two steps, because the GPU machine has CuPy and a CUDA torch but no TVM:

    python -m bench.gpu prepare [DIR]   # here (TVM, nvcc): compile, export, save inputs/references
    python -m bench --gpu [DIR]         # there: compiled == reference, then timings (JSON on stdout)

``make test-gpu`` runs the second step. DIR defaults to ``bench/gpu_artifacts`` (< 64 MiB).

Checked on the GPU first (integer paths bit-exact, float <= 1e-5 relative): the two GEMMs (128
stored reference rows each), the CNN, and a small tiled CNN (the tiled kernels); the CNN and the
tiled CNN also at batch 2 from the same export (a plan runs at any batch), then at their own.

Timed, alternating in one process (CUDA events, median of rounds):

* W1A1 GEMM M=N=K=4096 (a bit Linear with binarized input; the whole plan: sign packing + GEMM,
  and the GEMM kernel alone) against ``torch._int_mm`` on int8 (4096x4096 @ 4096x4096), with B
  row-major (``torch_int_mm``) and column-major (``torch_int_mm_colB``, cuBLAS's own layout);
* W2A8 GEMM, the same shape (int8 activations x 2-bit codes on ``__dp4a``), against the same;
* binary ResNet-18 (CIFAR input, batch 64, ``BinaryResNet(depth=2)``) against the same float
  model in torch fp16 (cuDNN, ``cudnn.benchmark``).
"""

from __future__ import annotations

import json
import statistics
import sys
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DIR = ROOT / "bench" / "gpu_artifacts"
GEMM = 4096
CNN_BATCH = 64
REF_ROWS = 128  # GEMM rows whose reference is stored (the full output is 64 MiB)
SMALL_BATCH = 2  # the CNNs are also checked at this batch (not an example's), from the same export


def _models():
    import sys as _sys

    _sys.path.insert(0, str(ROOT))
    import torch

    from tests.gpu.models import BinaryResNet, make, randomize_bn

    torch.manual_seed(0)
    resnet18 = randomize_bn(BinaryResNet(widths=(64, 128, 256, 512), depth=2))
    return resnet18, torch.randn(CNN_BATCH, 3, 32, 32), make("tiled_cnn")


def _gemm(directory: Path, name: str, scheme: str, x, stored) -> None:
    """A 4096x4096 bit Linear for target cuda, its input (``stored``, small) and reference rows."""
    import torch

    import bitcompiler as bc

    gemm = torch.nn.Sequential(torch.nn.Linear(GEMM, GEMM, bias=False)).eval()
    cm = bc.compile(gemm, (x,), target="cuda", scheme=scheme)
    cm.export(directory / name)
    np.save(directory / f"{name}_x.npy", stored)
    np.save(directory / f"{name}_ref_rows.npy", cm.reference(x[:REF_ROWS].contiguous()).numpy())


def prepare(directory: Path = DEFAULT_DIR) -> None:
    """Compile and export the benchmarks for target cuda (PTX for sm_75/80/90)."""
    import torch

    import bitcompiler as bc

    directory.mkdir(parents=True, exist_ok=True)
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    signs = torch.randint(0, 2, (GEMM, GEMM), dtype=torch.int8) * 2 - 1
    stored = np.packbits(signs.numpy() > 0, axis=1)  # 2 MiB, not 64
    _gemm(directory, "gemm", "binary:act=binary,first_last=quantize", signs.float(), stored)
    codes = torch.randint(-127, 128, (GEMM, GEMM), dtype=torch.int8)
    codes[:, 0] = 127  # every row's int8 scale is 1: the float input is its own int8 code
    _gemm(directory, "gemm8", "uniform:bits=2,act=8,first_last=quantize", codes.float(), codes.numpy())
    model, xc, (tiled, xt) = _models()
    for name, net, x, scheme in (
        ("cnn", model, xc, "binary:act=binary"),
        ("tiled", tiled, xt, "tiled:p=4,min_weights=1,first_last=quantize,act=binary"),
    ):
        cm = bc.compile(net, (x,), target="cuda", scheme=scheme)
        cm.export(directory / name)
        np.save(directory / f"{name}_x.npy", x.numpy())
        np.save(directory / f"{name}_ref.npy", cm.reference(x).numpy())
        np.save(directory / f"{name}_ref{SMALL_BATCH}.npy", cm.reference(x[:SMALL_BATCH]).numpy())
    size = sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())
    print(f"wrote {directory} ({size / 2**20:.1f} MiB)")


def _time(fn, cp, reps: int) -> float:
    """Milliseconds per call of ``fn`` (CUDA events around ``reps`` calls, after one warm-up)."""
    fn()
    start, stop = cp.cuda.Event(), cp.cuda.Event()
    start.record()
    for _ in range(reps):
        fn()
    stop.record()
    stop.synchronize()
    return float(cp.cuda.get_elapsed_time(start, stop)) / reps


def _checks(directory: Path, programs: dict) -> dict:
    """compiled == reference on the GPU, from the exported plans."""
    checks: dict = {}
    bits = np.load(directory / "gemm_x.npy")
    inputs = {
        "gemm": (np.unpackbits(bits, axis=1).astype(np.float32) * 2 - 1),
        "gemm8": np.load(directory / "gemm8_x.npy").astype(np.float32),
    }
    for name in ("gemm", "gemm8"):
        [y] = programs[name]([inputs[name]])
        checks[f"{name}_exact_rows"] = bool(
            np.array_equal(y[:REF_ROWS], np.load(directory / f"{name}_ref_rows.npy"))
        )
    for name in ("cnn", "tiled"):  # the small batch first: the timed launches use the last batch run
        x = np.load(directory / f"{name}_x.npy")
        for tag, xb, ref_file in (
            (f"_batch{SMALL_BATCH}", x[:SMALL_BATCH], f"{name}_ref{SMALL_BATCH}.npy"),
            ("", x, f"{name}_ref.npy"),
        ):
            [y] = programs[name]([xb])
            ref = np.load(directory / ref_file)
            err = np.abs(y - ref).max() / max(np.abs(ref).max(), 1e-6) if y.shape == ref.shape else np.inf
            checks[f"{name}{tag}_max_rel_err"] = float(err)
    checks["tiled_exact"] = (
        checks["tiled_max_rel_err"] == 0.0 == checks[f"tiled_batch{SMALL_BATCH}_max_rel_err"]
    )
    checks["ok"] = (
        checks["gemm_exact_rows"] and checks["gemm8_exact_rows"] and checks["tiled_exact"]
        and max(checks["cnn_max_rel_err"], checks[f"cnn_batch{SMALL_BATCH}_max_rel_err"]) <= 1e-5
    )  # fmt: skip
    return checks


def _kernels(program, part: str):
    """A callable launching only the plan's kernels whose name contains ``part``."""
    chosen = [launch[1:] for launch in program.launches if part in launch[0]]

    def launch() -> None:
        for fn, grid, block, args, shared in chosen:
            fn(grid, block, args, shared_mem=shared)

    return launch


def run(directory: Path = DEFAULT_DIR, rounds: int = 7) -> dict:
    """Check compiled == reference on the GPU, then time against PyTorch; returns the results."""
    import cupy as cp
    import torch

    from bitcompiler.backends.gpu.runtime import CUDAProgram

    out: dict = {"gpu": torch.cuda.get_device_name(0)}
    programs = {name: CUDAProgram(directory / name) for name in ("gemm", "gemm8", "cnn", "tiled")}
    out["checks"] = _checks(directory, programs)
    a = torch.randint(-127, 128, (GEMM, GEMM), dtype=torch.int8, device="cuda")
    b = torch.randint(-127, 128, (GEMM, GEMM), dtype=torch.int8, device="cuda")
    b_col = b.t().contiguous().t()  # the same values, column-major
    model, xc, _tiled = _models()  # the same float architecture (its weights do not change its time)
    model = model.cuda().half().eval()
    xh = xc.cuda().half()
    torch.backends.cudnn.benchmark = True

    def torch_cnn() -> None:
        with torch.no_grad():
            model(xh)

    timed = {
        "bitc_gemm": (programs["gemm"].launch, 10),
        "bitc_gemm_kernel": (_kernels(programs["gemm"], "bitc_dense_binary"), 10),
        "bitc_gemm8": (programs["gemm8"].launch, 10),
        "bitc_gemm8_kernel": (_kernels(programs["gemm8"], "_dp4a"), 10),
        "torch_int_mm": (lambda: torch._int_mm(a, b), 10),
        "torch_int_mm_colB": (lambda: torch._int_mm(a, b_col), 10),
        "bitc_cnn": (programs["cnn"].launch, 20),
        "torch_fp16_cnn": (torch_cnn, 20),
    }
    ms = _alternate(timed, cp, rounds)
    out["ms"] = ms
    best = min(ms["torch_int_mm"], ms["torch_int_mm_colB"])
    for name in ("bitc_gemm", "bitc_gemm_kernel", "bitc_gemm8", "bitc_gemm8_kernel"):
        out[f"int_mm_best_over_{name}"] = best / ms[name]
    out["fp16_over_bitc_cnn"] = ms["torch_fp16_cnn"] / ms["bitc_cnn"]
    print(json.dumps(out, indent=1), flush=True)  # kept even if the probe below breaks the device
    if int(cp.cuda.Device().compute_capability) >= 80:  # the binary tensor-core probe (bench/gpu_mma.py)
        from bench import gpu_mma

        try:
            probe, out["checks"]["probe_mma_exact"] = gpu_mma.run(cp)
            keep = ("bitc_gemm_kernel", "torch_int_mm_colB")
            pms = _alternate({"probe_mma_w1a1": (probe, 10), **{k: timed[k] for k in keep}}, cp, rounds)
            out["probe_ms"] = pms
            out["probe_int_mm_colB_over_mma"] = pms["torch_int_mm_colB"] / pms["probe_mma_w1a1"]
        except Exception as e:  # noqa: BLE001 - a probe: report why it did not run
            out["probe_error"] = f"{type(e).__name__}: {e}"[:2000]
    return out


def _alternate(timed: dict, cp, rounds: int) -> dict[str, float]:
    """Median milliseconds of each ``name: (fn, reps)``, the callables alternating in every round."""
    rows: dict[str, list[float]] = {k: [] for k in timed}
    for _ in range(rounds):
        for name, (fn, reps) in timed.items():
            rows[name].append(_time(fn, cp, reps))
    return {k: statistics.median(v) for k, v in rows.items()}


RESULTS = ROOT / "bench" / "gpu_results.json"  # the last GPU run's output, rendered into BENCHMARKS.md


def markdown(result: dict) -> list[str]:
    """BENCHMARKS.md's ``gpu`` section from a run's result (``python -m bench --gpu`` output; an
    older run's result lacks some rows)."""
    ms, checks = result["ms"], result["checks"]
    int_mm = {k: ms[k] for k in ("torch_int_mm", "torch_int_mm_colB") if k in ms}
    best, peer = min(int_mm.values()), "torch._int_mm" + (" (best B layout)" if len(int_mm) > 1 else "")
    cnn = result.get("cnn", "binary ResNet-18 (CIFAR), batch 64")
    rows = [
        ("W1A1 GEMM 4096³, whole plan (sign packing + GEMM)", "bitc_gemm", peer, best),
        ("W1A1 GEMM 4096³, GEMM kernel (popc)", "bitc_gemm_kernel", peer, best),
        ("W2A8 GEMM 4096³, whole plan (quantize + GEMM)", "bitc_gemm8", peer, best),
        ("W2A8 GEMM 4096³, GEMM kernel (dp4a)", "bitc_gemm8_kernel", peer, best),
        (cnn, "bitc_cnn", "torch fp16 (cuDNN)", ms["torch_fp16_cnn"]),
    ]
    table = [(w, ms[k], p, pm) for w, k, p, pm in rows if k in ms]
    if "probe_ms" in result:
        p = result["probe_ms"]
        table.append(
            ("probe: W1A1 GEMM 4096³ on b1 mma.sync (bench/gpu_mma.py)", p["probe_mma_w1a1"],
             "torch._int_mm (column-major B)", p["torch_int_mm_colB"])
        )  # fmt: skip
    names = {"torch_int_mm": "B row-major", "torch_int_mm_colB": "B column-major"}
    layouts = ", ".join(f"{names[k]} {v:.3f} ms" for k, v in int_mm.items())
    lines = [
        f"On {result['gpu']} ({result.get('measured', 'date not recorded')}): exported CUDA plans run by "
        "CuPy without TVM (`python -m bench --gpu`), every peer in the same process, alternating, CUDA "
        f"events, median of 7 rounds. torch._int_mm: {layouts}. Checks on the GPU: "
        + ", ".join(f"{k} {v}" for k, v in checks.items() if k != "ok")
        + ".",
        "",
        "| what | bitcompiler ms | peer | peer ms | Nx |",
        "| --- | --- | --- | --- | --- |",
    ]
    lines += [f"| {w} | {b:.3f} | {p} | {pm:.3f} | {pm / b:.2f}x |" for w, b, p, pm in table]
    gemm, fp16 = best / ms["bitc_gemm"], ms["torch_fp16_cnn"] / ms["bitc_cnn"]
    lines += [
        "",
        f"- #16 goal W1A1 GEMM 4096³ >= 3x {peer} (whole plan): {gemm:.2f}x, "
        + ("met" if gemm >= 3 else "**not met**"),
        f"- #16 goal binary ResNet-18 (CIFAR) batch 64 faster than torch fp16: {cnn} {fp16:.2f}x, "
        + (
            "met"
            if fp16 > 1 and "ResNet-18" in cnn
            else "**not measured on ResNet-18 itself**"
            if fp16 > 1
            else "**not met**"
        ),
    ]
    return lines


def main(argv: list[str]) -> None:
    if argv[:1] == ["prepare"]:
        prepare(Path(argv[1]) if len(argv) > 1 else DEFAULT_DIR)
        return
    result = run(Path(argv[0]) if argv else DEFAULT_DIR)
    print(json.dumps(result, indent=1))
    if not result["checks"]["ok"]:
        raise SystemExit("GPU results differ from the reference")


if __name__ == "__main__":
    main(sys.argv[1:])
