"""Run an exported GPU plan without TVM: OpenCL through ``pyopencl``, CUDA through CuPy.

An export directory holds ``plan.json`` (kernels in launch order with their grid and block sizes
and argument buffers, every buffer's dtype and shape, the temporaries' offsets in one arena), the
kernel source (``kernels.cl``, or ``kernels.cu`` with ``kernels.sm_XX.ptx``) and ``weights.npz``.
This module imports only numpy (and the runtime package of the plan's target)::

    from bitcompiler.backends.gpu import runtime
    program = runtime.load("exported_dir")      # compiles or loads the kernels, uploads the weights
    [y] = program([x])                          # numpy arrays in, numpy arrays out

The batch is the one the model was compiled with (static).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from bitcompiler.errors import InputError, LoadError, ToolchainError, ToolchainMissing

PLAN = "plan.json"
WEIGHTS = "weights.npz"
FORMAT = 1
# correctly rounded float division (OpenCL's default allows 2.5 ulp; the reference rounds once)
OPENCL_OPTIONS = ["-cl-fp32-correctly-rounded-divide-sqrt"]
# no contraction of a*b+c into one rounding, as in the reference (PyTorch on the CPU)
CUDA_OPTIONS = ("--fmad=false",)


def read_plan(directory: str | Path) -> dict:
    d = Path(directory)
    try:
        plan = json.loads((d / PLAN).read_text())
    except FileNotFoundError as e:
        raise LoadError(f"{d / PLAN} is missing: export the model for a GPU target first") from e
    if plan.get("format") != FORMAT:
        raise LoadError(f"{d / PLAN}: plan format {plan.get('format')!r}, this version reads {FORMAT}")
    return plan  # type: ignore[no-any-return]


class Program:
    """A plan loaded on a device; subclasses hold the device objects."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.plan = read_plan(self.directory)
        with np.load(self.directory / self.plan["weights"]) as npz:
            self.weights = {k: npz[k] for k in npz.files}
        self.buffers: list[dict] = self.plan["buffers"]

    def check(self, inputs: list[Any]) -> list[np.ndarray]:
        arrays = []
        specs = [self.buffers[i] for i in self.plan["inputs"]]
        if len(inputs) != len(specs):
            raise InputError(f"expected {len(specs)} input(s), got {len(inputs)}")
        for i, (x, spec) in enumerate(zip(inputs, specs)):
            a = np.ascontiguousarray(np.asarray(x))
            if list(a.shape) != spec["shape"] or str(a.dtype) != spec["dtype"]:
                raise InputError(
                    f"input {i}: expected {spec['dtype']} of shape {tuple(spec['shape'])} (GPU targets are "
                    f"compiled for a static batch of {self.plan['batch']}), got {a.dtype} of shape {a.shape}"
                )
            arrays.append(a)
        return arrays

    def __call__(self, inputs: list[Any]) -> list[np.ndarray]:
        raise NotImplementedError


class OpenCLProgram(Program):
    def __init__(self, directory: str | Path, device: Any = None) -> None:
        super().__init__(directory)
        try:
            import pyopencl as cl
        except ImportError as e:
            raise ToolchainMissing(
                "running an OpenCL model needs the Python package pyopencl (pip install pyopencl) and an "
                "OpenCL driver (a GPU's, or pocl on the CPU: apt-get install pocl-opencl-icd)"
            ) from e
        self.cl = cl
        self.device = device or _opencl_device(cl)
        self.ctx = cl.Context([self.device])
        self.queue = cl.CommandQueue(self.ctx)
        source = (self.directory / self.plan["source"]).read_text()
        try:
            self.program = cl.Program(self.ctx, source).build(options=OPENCL_OPTIONS)
        except cl.Error as e:
            raise ToolchainError(
                f"the OpenCL driver of {self.device.name} did not build {self.plan['source']}: {e}"
            ) from e
        mf = cl.mem_flags
        self.arena = cl.Buffer(self.ctx, mf.READ_WRITE, max(int(self.plan["arena_bytes"]), 1))
        self.mem: list[Any] = []
        for b in self.buffers:
            size = max(int(b["nbytes"]), 1)
            if b["kind"] == "weight":
                data = self.weights[b["name"]]
                self.mem.append(
                    cl.Buffer(self.ctx, mf.READ_ONLY | mf.COPY_HOST_PTR, hostbuf=data)
                    if data.nbytes
                    else cl.Buffer(self.ctx, mf.READ_ONLY, 1)
                )
            elif b["kind"] == "temp":
                self.mem.append(self.arena.get_sub_region(int(b["offset"]), size))
            else:
                self.mem.append(cl.Buffer(self.ctx, mf.READ_WRITE, size))
        self.launches = []
        for launch in self.plan["launches"]:
            kernel = cl.Kernel(self.program, launch["kernel"])
            for i, a in enumerate(launch["args"]):
                kernel.set_arg(
                    i, self.mem[a["buffer"]] if "buffer" in a else np.dtype(a["dtype"]).type(a["scalar"])
                )
            grid, block = launch["grid"], launch["block"]
            self.launches.append((kernel, tuple(g * b for g, b in zip(grid, block)), tuple(block)))

    def __call__(self, inputs: list[Any]) -> list[np.ndarray]:
        cl = self.cl
        for i, a in zip(self.plan["inputs"], self.check(inputs)):
            cl.enqueue_copy(self.queue, self.mem[i], a)
        for kernel, global_size, local_size in self.launches:
            cl.enqueue_nd_range_kernel(self.queue, kernel, global_size, local_size)
        outs = []
        for o in self.plan["outputs"]:
            b = self.buffers[o]
            out = np.empty(b["shape"], b["dtype"])
            cl.enqueue_copy(self.queue, out, self.mem[o])
            outs.append(out)
        self.queue.finish()
        return outs


def _opencl_device(cl: Any) -> Any:
    try:
        platforms = cl.get_platforms()
    except cl.Error:
        platforms = []
    devices = [d for p in platforms for d in p.get_devices()]
    if not devices:
        raise ToolchainMissing(
            "no OpenCL device found: install your GPU's OpenCL driver, or pocl to run on the CPU "
            "(apt-get install pocl-opencl-icd)"
        )
    gpus = [d for d in devices if d.type & cl.device_type.GPU]
    return (gpus or devices)[0]


class CUDAProgram(Program):
    def __init__(self, directory: str | Path) -> None:
        super().__init__(directory)
        try:
            import cupy as cp
        except ImportError as e:
            raise ToolchainMissing(
                "running a CUDA model needs CuPy (pip install cupy-cuda12x or cupy-cuda13x, matching the driver)"
            ) from e
        try:
            cc = int(cp.cuda.Device().compute_capability)
        except Exception as e:
            raise ToolchainMissing(
                f"no CUDA device found ({type(e).__name__}: {e}); run on a machine with an NVIDIA GPU"
            ) from e
        self.cp = cp
        ptx = {int(re.sub(r"\D", "", a)): f for a, f in self.plan.get("ptx", {}).items()}
        usable = [a for a in ptx if a <= cc]
        if usable:  # the newest PTX the device can run (the driver compiles it for the device)
            self.module = cp.RawModule(path=str(self.directory / ptx[max(usable)]))
        else:  # no PTX fits: NVRTC compiles the source for this device
            code = (self.directory / self.plan["source"]).read_text()
            self.module = cp.RawModule(code=code, options=CUDA_OPTIONS)
        self.arena = cp.empty(max(int(self.plan["arena_bytes"]), 1), dtype=cp.uint8)
        self.mem = []
        for b in self.buffers:
            if b["kind"] == "weight":
                self.mem.append(cp.asarray(self.weights[b["name"]]))
            elif b["kind"] == "temp":
                off = int(b["offset"])
                self.mem.append(self.arena[off : off + int(b["nbytes"])].view(b["dtype"]).reshape(b["shape"]))
            else:
                self.mem.append(cp.empty(b["shape"], dtype=b["dtype"]))
        self.launches = []
        for launch in self.plan["launches"]:
            fn = self.module.get_function(launch["kernel"])
            args = tuple(
                self.mem[a["buffer"]] if "buffer" in a else np.dtype(a["dtype"]).type(a["scalar"])
                for a in launch["args"]
            )
            grid, block = tuple(launch["grid"]), tuple(launch["block"])
            self.launches.append((launch["kernel"], fn, grid, block, args, int(launch["shared"])))

    def inputs(self) -> list[Any]:
        """The device arrays the inputs are read from (write them in place to skip host copies)."""
        return [self.mem[i] for i in self.plan["inputs"]]

    def outputs(self) -> list[Any]:
        return [self.mem[o] for o in self.plan["outputs"]]

    def launch(self) -> None:
        """Run every kernel once on the current stream (no copies, no synchronization)."""
        for _name, fn, grid, block, args, shared in self.launches:
            fn(grid, block, args, shared_mem=shared)

    def __call__(self, inputs: list[Any]) -> list[np.ndarray]:
        for dst, a in zip(self.inputs(), self.check(inputs)):
            dst.set(a)
        self.launch()
        return [self.cp.asnumpy(o) for o in self.outputs()]


def load(directory: str | Path) -> Program:
    """The plan in ``directory`` loaded on its target's device (see the module docstring)."""
    plan = read_plan(directory)
    if plan["target"] == "opencl":
        return OpenCLProgram(directory)
    if plan["target"] == "cuda":
        return CUDAProgram(directory)
    raise LoadError(f"{Path(directory) / PLAN}: unknown target {plan['target']!r}")
