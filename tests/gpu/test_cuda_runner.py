"""The CuPy runner's bookkeeping without a GPU: a recording stand-in for the ``cupy`` module takes
the launches, so the per-batch sizes, arguments and arena views the runner hands to CUDA are
checked against the plan here. (Whether the kernels compute the reference is checked on pocl by
test_gpu.py and, on a lent GPU, by ``python -m bench --gpu``.)"""

from __future__ import annotations

import shutil
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import pytest

import bitcompiler as bc
from bitcompiler.backends.gpu import plan as gpu_plan
from bitcompiler.backends.gpu import runtime
from tests.gpu.models import make


class _DeviceArray(np.ndarray):
    def set(self, a: np.ndarray) -> None:  # cupy's host -> device copy
        self[...] = a


def _fake_cupy(launched: list, modules: list) -> types.ModuleType:
    cp = types.ModuleType("cupy")

    class RawModule:
        def __init__(self, path: str | None = None, code: str | None = None, options: tuple = ()) -> None:
            modules.append(Path(path).name if path else "nvrtc")

        def get_function(self, name: str):
            def launch(grid, block, args, shared_mem=0):
                launched.append((name, grid, block, args, shared_mem))

            return launch

    cp.RawModule = RawModule  # type: ignore[attr-defined]
    cp.cuda = types.SimpleNamespace(Device=lambda: types.SimpleNamespace(compute_capability="86"))  # type: ignore[attr-defined]
    cp.uint8 = np.uint8  # type: ignore[attr-defined]
    cp.empty = lambda shape, dtype: np.zeros(shape, dtype).view(_DeviceArray)  # type: ignore[attr-defined]
    cp.asarray = lambda a: np.array(a).view(_DeviceArray)  # type: ignore[attr-defined]
    cp.asnumpy = np.asarray  # type: ignore[attr-defined]
    return cp


def test_cuda_runner_launches_each_batch_as_its_plan_says(tmp_path: Path, monkeypatch) -> None:
    model, x = make("mlp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cm = bc.compile(model, (x,), target="cuda", scheme="binary:act=binary")
    out = cm.export(tmp_path / "cuda")
    launched: list = []
    modules: list = []
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy(launched, modules))
    program = runtime.load(out)
    assert isinstance(program, runtime.CUDAProgram)
    # an sm_86 device runs the newest PTX it can (sm_80); without nvcc, NVRTC compiles the source
    assert modules == (["kernels.sm_80.ptx"] if shutil.which("nvcc") else ["nvrtc"])
    plan = program.plan
    for batch in (3, 8, 3):
        launched.clear()
        xb = np.random.default_rng(batch).standard_normal((batch, 40), dtype=np.float32)
        [y] = program([xb])
        assert y.shape == (batch, 7)
        layout = gpu_plan.layout(plan, {"B": batch})
        assert [(n, list(g), list(b), s) for n, g, b, _, s in launched] == [
            (k["kernel"], k["grid"], k["block"], k["shared"]) for k in layout.launches
        ]
        assert program.launches == program.bound.launches and len(program.launches) == len(launched)
        [given] = program.inputs()
        assert np.array_equal(given, xb)  # the input copied to the batch's device array
        arena = program.bound.arena
        for (_, _, _, args, _), launch in zip(launched, layout.launches):
            for value, arg in zip(args, launch["args"]):
                if "scalar" in arg:
                    assert value == arg["scalar"] and value.dtype == np.dtype(arg["dtype"])
                    continue
                spec = plan["buffers"][arg["buffer"]]
                assert list(value.shape) == layout.shapes[arg["buffer"]] and str(value.dtype) == spec["dtype"]
                if spec["kind"] == "temp":  # a view of the arena at the planned offset
                    assert np.shares_memory(value, arena)
                    start = value.__array_interface__["data"][0] - arena.__array_interface__["data"][0]
                    assert start == layout.offsets[arg["buffer"]]
    assert any(
        a.get("scalar") == "B" for k in plan["launches"] for a in k["args"]
    )  # the batch reaches kernels


def test_no_cupy_names_the_package(tmp_path: Path, monkeypatch) -> None:
    model, x = make("mlp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = bc.compile(model, (x,), target="cuda", scheme="binary:act=binary").export(tmp_path / "c")
    monkeypatch.setitem(sys.modules, "cupy", None)
    with pytest.raises(bc.errors.ToolchainMissing, match="CuPy"):
        runtime.load(out)
