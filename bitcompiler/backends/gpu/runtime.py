"""Run an exported GPU plan without TVM: OpenCL through ``pyopencl``, CUDA through CuPy.

An export directory holds ``plan.json`` (kernels in launch order with their grid and block sizes
and argument buffers, every buffer's dtype and shape; sizes that depend on the batch are
expressions of it, see :mod:`.plan`), the kernel source (``kernels.cl``, or ``kernels.cu`` with
``kernels.sm_XX.ptx``) and ``weights.npz``. This module imports only numpy (and the runtime
package of the plan's target)::

    from bitcompiler.backends.gpu import runtime
    program = runtime.load("exported_dir")      # compiles or loads the kernels, uploads the weights
    [y] = program([x])                          # numpy arrays in, numpy arrays out, any batch

Each batch size gets its own static memory plan, device buffers and launch sizes on its first
call; the last few are kept (:data:`KEEP`), so alternating batches do not re-plan.
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bitcompiler.backends.gpu import plan as planning
from bitcompiler.errors import InputError, LoadError, ToolchainError, ToolchainMissing

PLAN = "plan.json"
WEIGHTS = "weights.npz"
FORMAT = 2  # 2: sizes are expressions of the batch ("vars"); 1 had a fixed "batch" and arena
KEEP = 4  # batch sizes whose device buffers stay allocated
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
        raise LoadError(
            f"{d / PLAN}: plan format {plan.get('format')!r}, this version reads {FORMAT}; export the model "
            "again with this version of bitcompiler"
        )
    return plan  # type: ignore[no-any-return]


class Program:
    """A plan loaded on a device; subclasses hold the device objects of each batch size
    (:meth:`_allocate`) in ``self.bound``, the one of the last call."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.plan = read_plan(self.directory)
        with np.load(self.directory / self.plan["weights"]) as npz:
            self.weights = {k: npz[k] for k in npz.files}
        self.buffers: list[dict] = self.plan["buffers"]
        self._bound: OrderedDict[tuple, Any] = OrderedDict()
        self.bound: Any = None

    def check(self, inputs: list[Any]) -> list[np.ndarray]:
        """The inputs as contiguous arrays, their dtypes and shapes checked; binds their batch."""
        arrays = [np.ascontiguousarray(np.asarray(x)) for x in inputs]
        env = planning.bind(self.plan, [a.shape for a in arrays])
        for i, (a, b) in enumerate(zip(arrays, self.plan["inputs"])):
            if str(a.dtype) != self.buffers[b]["dtype"]:
                raise InputError(f"input {i}: expected {self.buffers[b]['dtype']}, got {a.dtype}")
        self.bind(env)
        return arrays

    def bind(self, env: dict[str, int]) -> Any:
        """Make the device objects of the batch ``env`` (e.g. ``{"B": 64}``) current and return them."""
        key = tuple(sorted(env.items()))
        if key not in self._bound:
            self._bound[key] = self._allocate(planning.layout(self.plan, env))
            while len(self._bound) > KEEP:
                self._bound.popitem(last=False)
        self._bound.move_to_end(key)
        self.bound = self._bound[key]
        return self.bound

    def _allocate(self, layout: planning.Layout) -> Any:
        raise NotImplementedError

    def __call__(self, inputs: list[Any]) -> list[np.ndarray]:
        raise NotImplementedError


@dataclass
class Bound:
    """A program's device objects for one batch size."""

    layout: planning.Layout
    arena: Any  # the temporaries' memory
    mem: list[Any]  # per buffer: its device memory (weights shared by every batch)
    launches: list[tuple]  # per kernel launch, in the runner's own form


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
        self.weight_mem = {
            i: cl.Buffer(self.ctx, mf.READ_ONLY | mf.COPY_HOST_PTR, hostbuf=self.weights[b["name"]])
            if self.weights[b["name"]].nbytes
            else cl.Buffer(self.ctx, mf.READ_ONLY, 1)
            for i, b in enumerate(self.buffers)
            if b["kind"] == "weight"
        }

    def _allocate(self, layout: planning.Layout) -> Bound:
        cl = self.cl
        arena = cl.Buffer(self.ctx, cl.mem_flags.READ_WRITE, max(layout.arena_bytes, 1))
        mem: list[Any] = []
        for i, b in enumerate(self.buffers):
            size = max(layout.nbytes[i], 1)
            if b["kind"] == "weight":
                mem.append(self.weight_mem[i])
            elif b["kind"] == "temp":
                mem.append(arena.get_sub_region(layout.offsets[i], size))
            else:
                mem.append(cl.Buffer(self.ctx, cl.mem_flags.READ_WRITE, size))
        launches = []
        for launch in layout.launches:
            kernel = cl.Kernel(self.program, launch["kernel"])
            for i, a in enumerate(launch["args"]):
                kernel.set_arg(
                    i, mem[a["buffer"]] if "buffer" in a else np.dtype(a["dtype"]).type(a["scalar"])
                )
            grid, block = launch["grid"], launch["block"]
            launches.append((kernel, tuple(g * b for g, b in zip(grid, block)), tuple(block)))
        return Bound(layout, arena, mem, launches)

    def __call__(self, inputs: list[Any]) -> list[np.ndarray]:
        cl = self.cl
        arrays = self.check(inputs)
        bound = self.bound
        for i, a in zip(self.plan["inputs"], arrays):
            cl.enqueue_copy(self.queue, bound.mem[i], a)
        for kernel, global_size, local_size in bound.launches:
            cl.enqueue_nd_range_kernel(self.queue, kernel, global_size, local_size)
        outs = []
        for o in self.plan["outputs"]:
            out = np.empty(bound.layout.shapes[o], self.buffers[o]["dtype"])
            cl.enqueue_copy(self.queue, out, bound.mem[o])
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
        self.weight_mem = {
            i: cp.asarray(self.weights[b["name"]])
            for i, b in enumerate(self.buffers)
            if b["kind"] == "weight"
        }

    def _allocate(self, layout: planning.Layout) -> Bound:
        cp = self.cp
        arena = cp.empty(max(layout.arena_bytes, 1), dtype=cp.uint8)
        mem: list[Any] = []
        for i, b in enumerate(self.buffers):
            if b["kind"] == "weight":
                mem.append(self.weight_mem[i])
            elif b["kind"] == "temp":
                off = layout.offsets[i]
                view = arena[off : off + layout.nbytes[i]].view(b["dtype"])
                mem.append(view.reshape(layout.shapes[i]))
            else:
                mem.append(cp.empty(layout.shapes[i], dtype=b["dtype"]))
        launches = []
        for launch in layout.launches:
            fn = self.module.get_function(launch["kernel"])
            args = tuple(
                mem[a["buffer"]] if "buffer" in a else np.dtype(a["dtype"]).type(a["scalar"])
                for a in launch["args"]
            )
            grid, block = tuple(launch["grid"]), tuple(launch["block"])
            launches.append((launch["kernel"], fn, grid, block, args, launch["shared"]))
        return Bound(layout, arena, mem, launches)

    @property
    def launches(self) -> list[tuple]:
        """The current batch's launches: (kernel name, function, grid, block, args, shared bytes)."""
        return self.bound.launches  # type: ignore[no-any-return]

    def inputs(self) -> list[Any]:
        """The device arrays the current batch's inputs are read from (write them in place to skip
        host copies; :meth:`bind` chooses the batch)."""
        return [self.bound.mem[i] for i in self.plan["inputs"]]

    def outputs(self) -> list[Any]:
        return [self.bound.mem[o] for o in self.plan["outputs"]]

    def launch(self) -> None:
        """Run every kernel of the current batch once on the current stream (no copies, no
        synchronization)."""
        for _name, fn, grid, block, args, shared in self.bound.launches:
            fn(grid, block, args, shared_mem=shared)

    def __call__(self, inputs: list[Any]) -> list[np.ndarray]:
        arrays = self.check(inputs)  # binds the batch: inputs() are then its device arrays
        for dst, a in zip(self.inputs(), arrays):
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
