"""GPU targets without a GPU: OpenCL kernels run on pocl (the CPU) against the reference, the CUDA
source compiles to PTX with nvcc, and exported plans run with TVM's import blocked."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import bitcompiler as bc
from bitcompiler.backends.gpu import plan as gpu_plan
from bitcompiler.errors import InputError, TargetError, ToolchainMissing
from tests.conftest import assert_close
from tests.gpu.models import make

try:
    import pyopencl as cl

    _DEVICES = [d for p in cl.get_platforms() for d in p.get_devices()]
    _NO_OPENCL = "" if _DEVICES else "no OpenCL device (apt-get install pocl-opencl-icd)"
except Exception as e:  # noqa: BLE001 - ImportError, or the ICD loader finding no platform
    _NO_OPENCL = f"pyopencl/an OpenCL driver unavailable ({type(e).__name__}): pip install pyopencl, apt-get install pocl-opencl-icd"

needs_opencl = pytest.mark.skipif(bool(_NO_OPENCL), reason=_NO_OPENCL)
needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH (CUDA toolkit)")

W1A1 = "binary:act=binary"
# (model, scheme, exact): exact where every layer's accumulator is an integer and no float op
# (a float conv, a mean) sits between them
CASES = [
    ("mlp", W1A1, True),
    ("mlp", "binary", False),
    ("mlp", "uniform:bits=2,act=8", True),
    ("resnet", W1A1, False),
    ("resnet", "binary", False),
    ("resnet", "uniform:bits=2,act=8", False),
    ("depthwise", W1A1, False),
    ("depthwise", "uniform:bits=2,act=8", False),
    ("binary_resnet", W1A1, False),
    ("binary_resnet", "binary", False),
    ("transformer", "none", False),
    ("transformer", W1A1, False),
]


BATCHES = (1, 3, 8)  # one plan, any batch: none of these is a compiled example's batch


def _compile(model: nn.Module, x: torch.Tensor, target: str, scheme: str) -> bc.CompiledModel:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return bc.compile(model, (x,), target=target, scheme=scheme)


def _batches(x: torch.Tensor, batches: tuple[int, ...] = BATCHES) -> list[torch.Tensor]:
    """The example, then fresh inputs of each batch size (nothing is specialized to the example)."""
    return [x, *(torch.randn(b, *x.shape[1:]) for b in batches)]


def _check(cm: bc.CompiledModel, inputs: list[torch.Tensor], exact: bool) -> None:
    for inp in inputs:
        got, ref = cm(inp), cm.reference(inp)
        assert got.shape == ref.shape and got.shape[0] == inp.shape[0]
        if exact:
            assert torch.equal(got, ref), (inp.shape[0], (got - ref).abs().max())
        else:
            assert_close(got, ref)


@needs_opencl
@pytest.mark.parametrize(("name", "scheme", "exact"), CASES, ids=[f"{n}-{s}" for n, s, _ in CASES])
def test_opencl_matches_reference(name: str, scheme: str, exact: bool) -> None:
    model, x = make(name)
    cm = _compile(model, x, "opencl", scheme)
    _check(cm, _batches(x), exact)


TILED = "tiled:p=4,min_weights=1,first_last=quantize"


@needs_opencl
@pytest.mark.parametrize(("act", "exact"), [("binary", True), ("8", True), ("float", False)])
def test_opencl_tiled_layers_get_kernels_and_match_reference(act: str, exact: bool) -> None:
    model, x = make("tiled_cnn")
    cm = _compile(model, x, "opencl", f"{TILED},act={act}")
    kernels = [launch["kernel"] for launch in cm._runner.plan["launches"]]
    for op in ("tiled_conv2d", "tiled"):  # each tiled layer: its R distinct rows, then the p-fold expand
        assert any(k.startswith(f"bitc_{op}_") and "_rows" in k for k in kernels), kernels
        assert any(k.startswith(f"bitc_{op}_") and "_expand" in k for k in kernels), kernels
    assert "expanded" not in str(cm.report())
    _check(cm, _batches(x), exact)


@needs_nvcc
def test_cuda_tiled_kernels_compile_to_ptx() -> None:
    model, x = make("tiled_cnn")
    runner = _compile(model, x, "cuda", f"{TILED},act=binary")._runner
    assert sorted(runner.ptx) == ["sm_75", "sm_80", "sm_90"]
    rows = [
        k["kernel"]
        for k in runner.plan["launches"]
        if k["kernel"].startswith("bitc_tiled") and "_rows" in k["kernel"]
    ]
    assert {k.split("_")[2] for k in rows} == {"conv2d", "binary"}, rows  # tiled convs and linears
    for name in rows:
        body = runner.ptx["sm_90"][runner.ptx["sm_90"].index(f".entry {name}(") :]
        assert "popc.b32" in body[: body.index("\n}\n")], name


@needs_opencl
def test_opencl_tiled_linear_unaligned_matches_reference() -> None:
    """p=3 does not divide the 64 outputs: the kernel that reads each weight's bit of the flat tile."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(40, 12), nn.ReLU(), nn.Linear(12, 64), nn.ReLU(), nn.Linear(64, 5)).eval()
    x = torch.randn(4, 40)
    cm = _compile(model, x, "opencl", "tiled:p=3,min_weights=1,first_last=quantize,act=binary")
    kernels = [launch["kernel"] for launch in cm._runner.plan["launches"]]
    assert any(k.startswith("bitc_tiled_binary_12x64_p3") and "_rows" not in k for k in kernels), kernels
    _check(cm, _batches(x), exact=True)


class W1A1Convs(nn.Module):
    """Binary convs only (the input binarized too): every output is an integer accumulator times
    the layer's scale, so OpenCL must agree bit for bit."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(8, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32)
        self.c2 = nn.Conv2d(32, 40, 3, stride=2, padding=1, bias=False)
        self.c3 = nn.Conv2d(40, 40, 3, padding=1, groups=40, bias=False)  # depthwise

    def forward(self, x):
        return self.c3(
            torch.nn.functional.hardtanh(self.c2(torch.nn.functional.hardtanh(self.b1(self.c1(x)))))
        )


@needs_opencl
def test_opencl_w1a1_conv_and_depthwise_bit_exact() -> None:
    torch.manual_seed(5)
    from tests.gpu.models import randomize_bn

    model, x = randomize_bn(W1A1Convs()), torch.randn(3, 8, 9, 9)
    cm = _compile(model, x, "opencl", "binary:act=binary,first_last=quantize")
    assert any("bitc_conv2d_binary" in launch["kernel"] for launch in cm._runner.plan["launches"])
    _check(cm, _batches(x), exact=True)


@pytest.fixture(scope="module")
def cuda_binary_resnet() -> tuple[bc.CompiledModel, torch.Tensor]:
    model, x = make("binary_resnet")
    return _compile(model, x, "cuda", W1A1), x


@needs_nvcc
def test_cuda_ptx_for_three_archs_with_popc(cuda_binary_resnet, tmp_path: Path) -> None:
    cm, _x = cuda_binary_resnet
    out = cm.export(tmp_path / "cuda")
    plan = json.loads((out / "plan.json").read_text())
    assert sorted(plan["ptx"]) == ["sm_75", "sm_80", "sm_90"]
    source = (out / "kernels.cu").read_text()
    binary = [k["kernel"] for k in plan["launches"] if "_binary_" in k["kernel"]]
    assert binary, "no W1A1 kernel in the plan"
    for arch, name in plan["ptx"].items():
        ptx = (out / name).read_text()
        assert f".target {arch}" in ptx
        for kernel in binary:  # every W1A1 kernel counts bits with the popc instruction
            body = ptx[ptx.index(f".entry {kernel}(") :]
            body = body[: body.index("\n}\n")]
            assert "popc.b32" in body, (arch, kernel)
    assert "__popc" in source


def test_cuda_runs_through_cupy_or_names_what_is_missing(cuda_binary_resnet) -> None:
    cm, x = cuda_binary_resnet
    try:
        import cupy

        assert cupy.cuda.Device().compute_capability
    except Exception:  # noqa: BLE001 - no CuPy, or no GPU for it
        with pytest.raises(ToolchainMissing, match="CuPy|CUDA device"):
            cm(x)
        return
    assert_close(cm(x), cm.reference(x))


@needs_opencl
def test_export_runs_without_tvm_at_any_batch(tmp_path: Path) -> None:
    """One exported plan, run at batch 1, 3 and 8 in a process where importing TVM fails."""
    model, x = make("binary_resnet")
    cm = _compile(model, x, "opencl", W1A1)
    out = cm.export(tmp_path / "ocl")
    assert {"plan.json", "kernels.cl", "weights.npz"} <= {p.name for p in out.iterdir()}
    for b in BATCHES:
        xb = torch.randn(b, *x.shape[1:])
        np.save(tmp_path / f"x{b}.npy", xb.numpy())
        np.save(tmp_path / f"ref{b}.npy", cm.reference(xb).numpy())
    script = f"""
import sys
sys.modules["tvm"] = None  # any import of tvm now raises ImportError
import numpy as np, torch
import bitcompiler as bc
from bitcompiler.backends.gpu import runtime
program, loaded = runtime.load({str(out)!r}), bc.load({str(out)!r})
for b in {BATCHES!r}:
    x, ref = np.load({str(tmp_path)!r} + f"/x{{b}}.npy"), np.load({str(tmp_path)!r} + f"/ref{{b}}.npy")
    [y] = program([x])
    assert y.shape == ref.shape, (b, y.shape)
    assert np.abs(y - ref).max() <= 1e-5 * np.abs(ref).max(), (b, np.abs(y - ref).max())
    assert np.array_equal(y, loaded(torch.from_numpy(x)).numpy()), b
assert not any(m == "tvm" or m.startswith("tvm.") for m in sys.modules if sys.modules[m] is not None)
print("ok")
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-3000:]


def test_bad_targets_and_calls_raise_clear_errors() -> None:
    model, x = make("mlp")
    with pytest.raises(TargetError, match="sm_75 or newer"):
        bc.compile(model, (x,), target=bc.Target("cuda", arch="sm_50"))
    with pytest.raises(TargetError, match="unknown option"):
        bc.compile(model, (x,), target=bc.Target("opencl", arch="sm_80"))


@needs_opencl
def test_batch_is_dynamic_without_warning() -> None:
    model, x = make("mlp")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cm = bc.compile(model, (x,), target="opencl", scheme=W1A1)
    assert not [w for w in caught if "batch" in str(w.message)], [str(w.message) for w in caught]
    plan = cm._runner.plan
    assert cm.dynamic_batch and "batch" not in cm.report().extra
    assert plan["vars"] == {"B": {"input": 0, "axis": 0}}
    assert plan["buffers"][plan["inputs"][0]]["shape"] == ["B", 40]
    assert any(isinstance(g, str) and "B" in g for launch in plan["launches"] for g in launch["grid"])
    _check(cm, _batches(x, (8, 1, 3, 1)), exact=True)  # back to a batch seen before
    with pytest.raises(InputError, match="expected float32 tensor of shape"):
        cm(torch.randn(3, 41))


class FixedBatch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(40, 8)

    def forward(self, x):
        return self.fc(x.view(4, -1))  # fixes the batch at 4


@needs_opencl
def test_a_model_that_fixes_its_batch_gets_a_static_plan() -> None:
    model, x = FixedBatch().eval(), torch.randn(4, 40)
    with pytest.warns(UserWarning, match="fixed batch of 4"):
        cm = bc.compile(model, (x,), target="opencl", scheme=W1A1)
    plan = cm._runner.plan
    assert plan["vars"] == {} and plan["buffers"][plan["inputs"][0]]["shape"] == [4, 40]
    assert "fixed at 4" in cm.report().extra["batch"]
    _check(cm, [x, torch.randn(4, 40)], exact=False)
    with pytest.raises(InputError, match="fixed batch of 4"):
        cm(torch.randn(5, 40))


def test_memory_plan_reuses_without_overlap() -> None:
    model, x = make("resnet")
    cm = _compile(model, x, "cuda" if shutil.which("nvcc") else "opencl", W1A1)
    plan = cm._runner.plan
    temps = {i for i, b in enumerate(plan["buffers"]) if b["kind"] == "temp"}
    assert any(isinstance(plan["buffers"][i]["nbytes"], str) for i in temps)  # sized from the batch
    for batch in (1, 8):
        layout = gpu_plan.layout(plan, {"B": batch})
        steps: dict[int, list[int]] = {}
        for step, launch in enumerate(layout.launches):
            for a in launch["args"]:
                if a.get("buffer") in temps:
                    steps.setdefault(a["buffer"], []).append(step)
        size = {i: layout.nbytes[i] for i in temps}
        assert layout.arena_bytes < sum(-(-n // gpu_plan.ALIGN) * gpu_plan.ALIGN for n in size.values())
        assert all(layout.offsets[i] + size[i] <= layout.arena_bytes for i in temps)
        spans = {b: (min(s), max(s)) for b, s in steps.items()}
        for i, (first_i, last_i) in spans.items():
            for j, (first_j, last_j) in spans.items():
                if i < j and first_i <= last_j and first_j <= last_i:  # both live at some kernel
                    oi, oj = layout.offsets[i], layout.offsets[j]
                    assert oi + size[i] <= oj or oj + size[j] <= oi, (batch, i, j)


class DenseBN(nn.Module):
    """W1A1 dense layers with BatchNorm between them (folded into thresholds or scales)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.na = nn.Linear(256, 128), nn.BatchNorm1d(128)
        self.b, self.nb = nn.Linear(128, 192), nn.BatchNorm1d(192)
        self.c = nn.Linear(192, 10)

    def forward(self, x):
        return self.c(self.nb(self.b(self.na(self.a(x)))))


def _dense_bn() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(7)
    model = DenseBN().eval()
    for bn in (model.na, model.nb):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 1.5)
    return model, torch.randn(64, 256)


@needs_opencl
def test_opencl_w1a1_dense_tiled_bit_exact() -> None:
    model, x = _dense_bn()
    cm = _compile(model, x, "opencl", "binary:act=binary,first_last=quantize")
    tiled = [
        k
        for k in cm._runner.plan["launches"]
        if "bitc_dense_binary" in k["kernel"] and k["block"] == [16, 16, 1]
    ]
    assert tiled, "no W1A1 dense kernel got the shared-memory tiled schedule"
    assert all(t["grid"][1] == "(B + 63) // 64" for t in tiled), tiled  # rows padded to whole tiles
    _check(cm, _batches(x, (1, 3, 70)), exact=True)


@needs_nvcc
def test_cuda_w1a1_dense_tiled_ptx() -> None:
    model, x = _dense_bn()
    cm = _compile(model, x, "cuda", "binary:act=binary,first_last=quantize")
    runner = cm._runner
    assert "__shared__" in runner.source and "__popc" in runner.source
    ptx = runner.ptx["sm_80"]
    name = next(k["kernel"] for k in runner.plan["launches"] if k["block"] == [16, 16, 1])
    body = ptx[ptx.index(f".entry {name}(") :]
    assert "popc.b32" in body[: body.index("\n}\n")]
