"""GPU benchmark: exported CUDA plans run on a GPU without TVM, against the reference and PyTorch.

Two steps, because the GPU machine has CuPy and a CUDA torch but no TVM:

    python -m bench.gpu prepare [DIR]   # here (TVM, nvcc): compile, export, save inputs/references
    python -m bench --gpu [DIR]         # there: compiled == reference, then timings (JSON on stdout)

``make test-gpu`` runs the second step. DIR defaults to ``bench/gpu_artifacts`` (< 64 MiB).

Timed, alternating in one process (CUDA events, median of rounds):

* W1A1 GEMM M=N=K=4096 (a bit Linear with binarized input; the whole plan: sign packing + GEMM,
  and the GEMM kernel alone) against ``torch._int_mm`` on int8 (4096x4096 @ 4096x4096);
* a binary ResNet-ish CNN (CIFAR input, batch 64) against the same float model in torch fp16.
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


def _cnn():
    import sys as _sys

    _sys.path.insert(0, str(ROOT))
    import torch

    from tests.gpu.models import BinaryResNet, randomize_bn

    torch.manual_seed(0)
    return randomize_bn(BinaryResNet(widths=(64, 128, 256, 512))), torch.randn(CNN_BATCH, 3, 32, 32)


def prepare(directory: Path = DEFAULT_DIR) -> None:
    """Compile and export both benchmarks for target cuda (PTX for sm_75/80/90)."""
    import torch

    import bitcompiler as bc

    directory.mkdir(parents=True, exist_ok=True)
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    gemm = torch.nn.Sequential(torch.nn.Linear(GEMM, GEMM, bias=False)).eval()
    signs = torch.randint(0, 2, (GEMM, GEMM), dtype=torch.int8) * 2 - 1
    x = signs.float()
    cm = bc.compile(gemm, (x,), target="cuda", scheme="binary:act=binary,first_last=quantize")
    cm.export(directory / "gemm")
    np.save(directory / "gemm_x_bits.npy", np.packbits(signs.numpy() > 0, axis=1))  # 2 MiB, not 16
    np.save(directory / "gemm_ref_rows.npy", cm.reference(x[:REF_ROWS].contiguous()).numpy()[:REF_ROWS])
    model, xc = _cnn()
    cm = bc.compile(model, (xc,), target="cuda", scheme="binary:act=binary")
    cm.export(directory / "cnn")
    np.save(directory / "cnn_x.npy", xc.numpy())
    np.save(directory / "cnn_ref.npy", cm.reference(xc).numpy())
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


def run(directory: Path = DEFAULT_DIR, rounds: int = 7) -> dict:
    """Check compiled == reference on the GPU, then time against PyTorch; returns the results."""
    import cupy as cp
    import torch

    from bitcompiler.backends.gpu.runtime import CUDAProgram

    out: dict = {"gpu": torch.cuda.get_device_name(0), "checks": {}}
    # --- correctness from the exported plans
    gemm = CUDAProgram(directory / "gemm")
    signs = np.unpackbits(np.load(directory / "gemm_x_bits.npy"), axis=1).astype(np.int8) * 2 - 1
    x = signs.astype(np.float32)
    [y] = gemm([x])
    ref = np.load(directory / "gemm_ref_rows.npy")
    out["checks"]["gemm_exact_rows"] = bool(np.array_equal(y[: len(ref)], ref))
    cnn = CUDAProgram(directory / "cnn")
    xc, refc = np.load(directory / "cnn_x.npy"), np.load(directory / "cnn_ref.npy")
    [yc] = cnn([xc])
    out["checks"]["cnn_max_rel_err"] = float(np.abs(yc - refc).max() / max(np.abs(refc).max(), 1e-6))
    out["checks"]["ok"] = out["checks"]["gemm_exact_rows"] and out["checks"]["cnn_max_rel_err"] <= 1e-5
    # --- timings, alternating bitcompiler and torch in each round
    dense = [launch[1:] for launch in gemm.launches if "bitc_dense_binary" in launch[0]]
    a = torch.from_numpy(signs).cuda()
    b = torch.randint(-1, 2, (GEMM, GEMM), dtype=torch.int8, device="cuda")
    model, _ = _cnn()  # the same float architecture (its weights do not change its time)
    model = model.cuda().half().eval()
    xh = torch.from_numpy(xc).cuda().half()
    torch.backends.cudnn.benchmark = True

    def gemm_kernel_only() -> None:
        for fn, grid, block, args, shared in dense:
            fn(grid, block, args, shared_mem=shared)

    def torch_cnn() -> None:
        with torch.no_grad():
            model(xh)

    rows: dict[str, list[float]] = {
        k: [] for k in ("bitc_gemm", "bitc_gemm_kernel", "torch_int_mm", "bitc_cnn", "torch_fp16_cnn")
    }
    for _ in range(rounds):
        rows["bitc_gemm"].append(_time(gemm.launch, cp, 10))
        rows["bitc_gemm_kernel"].append(_time(gemm_kernel_only, cp, 10))
        rows["torch_int_mm"].append(_time(lambda: torch._int_mm(a, b), cp, 10))
        rows["bitc_cnn"].append(_time(cnn.launch, cp, 20))
        rows["torch_fp16_cnn"].append(_time(torch_cnn, cp, 20))
    ms = {k: statistics.median(v) for k, v in rows.items()}
    out["ms"] = ms
    out["int_mm_over_bitc_gemm"] = ms["torch_int_mm"] / ms["bitc_gemm"]
    out["int_mm_over_bitc_gemm_kernel"] = ms["torch_int_mm"] / ms["bitc_gemm_kernel"]
    out["fp16_over_bitc_cnn"] = ms["torch_fp16_cnn"] / ms["bitc_cnn"]
    return out


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
