"""The AOT program's data: tensors (arena storage and aliases), ``const`` weights, the steps of
``bitc_run`` in order, and where each tensor lives (:func:`plan_storage`: lifetimes, in-place
sharing, then :mod:`.memory_plan`'s offsets). :mod:`.aot` builds it; :mod:`.bundle` writes it."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from bitcompiler.backends.cortex_m.kernel_c import Kernel
from bitcompiler.backends.cortex_m.memory_plan import ArenaPlan, Buffer, plan_arena

C_TYPES = {"float32": "float", "int32": "int32_t", "int8": "int8_t", "uint8": "uint8_t"}
ITEMSIZE = {"float32": 4, "int32": 4, "int8": 1, "uint8": 1}


@dataclass
class Tensor:
    name: str
    shape: tuple[int, ...]
    dtype: str
    storage: str  # the arena buffer holding it (an alias shares its source's storage)
    value: str = ""  # the tensor a step wrote whose bytes these are (itself, or an alias's source)

    def __post_init__(self) -> None:
        self.value = self.value or self.name

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * ITEMSIZE[self.dtype]


@dataclass
class Weight:
    symbol: str
    array: np.ndarray  # int32 or float32, flattened in C order
    layer: str

    @property
    def c_type(self) -> str:
        return C_TYPES[str(self.array.dtype)]


@dataclass
class Step:
    """One statement block of ``bitc_run`` with the tensors it reads and writes."""

    code: list[str]
    reads: list[str]
    writes: list[str]
    label: str
    # elementwise steps: the read tensors the output may overwrite when they die here (in place)
    inplace: tuple[str, ...] = ()


@dataclass
class Program:
    """Everything ``model.c`` needs: steps in order, tensors, weights, kernels, the arena plan."""

    input: Tensor
    output: Tensor
    tensors: dict[str, Tensor]
    steps: list[Step]
    weights: list[Weight]
    kernels: list[Kernel]
    plan: ArenaPlan
    layer_bytes: dict[str, int] = field(default_factory=dict)  # flash per layer (weights)
    layer_kernels: dict[str, str] = field(default_factory=dict)  # layer -> the kernel it calls

    @property
    def weight_bytes(self) -> int:
        return sum(w.array.nbytes for w in self.weights)

    @property
    def peak_layer(self) -> str:
        """The step (layer) where the most activation bytes are live at once."""
        return self.steps[self.plan.peak_step].label if self.plan.peak_step >= 0 else "-"

    @property
    def writes_output_in_place(self) -> bool:
        """The last layer writes the caller's ``out`` (no arena buffer, no copy) unless the
        output is the input itself."""
        return self.output.storage != self.input.storage


def plan_storage(
    tensors: dict[str, Tensor], steps: list[Step], graph_input: Tensor, graph_output: Tensor
) -> ArenaPlan:
    """Lifetimes of the arena buffers (aliases extend their storage's life) -> arena offsets.

    The input and output live in the caller's ``in`` / ``out``, not in the arena. An elementwise
    step writes over an input (of its size) that no later step reads: its output takes that
    input's buffer."""
    outside = {graph_input.storage, graph_output.storage}
    share_in_place(tensors, steps, outside)
    first: dict[str, int] = {}
    last: dict[str, int] = {}
    size: dict[str, int] = {}
    for i, step in enumerate(steps):
        for t in (tensors[n] for n in step.writes):
            first.setdefault(t.storage, i)
            last[t.storage] = max(last.get(t.storage, i), i)
            size[t.storage] = max(size.get(t.storage, 0), t.nbytes)
        for t in (tensors[n] for n in step.reads):
            last[t.storage] = max(last.get(t.storage, i), i)
    buffers = [Buffer(s, size[s], first[s], last[s]) for s in first if s not in outside]
    return plan_arena(buffers)


def share_in_place(tensors: dict[str, Tensor], steps: list[Step], outside: set[str]) -> None:
    """Give each in-place step's output the storage of a same-size input that dies at that step."""
    last: dict[str, int] = {}
    for i, step in enumerate(steps):
        for n in (*step.reads, *step.writes):
            last[tensors[n].storage] = i
    for i, step in enumerate(steps):
        if not step.inplace or len(step.writes) != 1:
            continue
        y = tensors[step.writes[0]]
        for x in (tensors[n] for n in step.inplace):
            if y.storage in outside or x.storage in outside or x.storage == y.storage:
                continue
            if last[x.storage] != i or (x.dtype, x.nbytes) != (y.dtype, y.nbytes):
                continue
            old = y.storage
            for t in tensors.values():
                if t.storage == old:
                    t.storage = x.storage
            last[x.storage] = last.pop(old)
            break


def pointer(program: Program, name: str) -> str:
    t = program.tensors[name]
    if t.storage == program.input.storage:
        return "((float*)in)"
    if t.storage == program.output.storage:
        return "((void*)out)"
    return f"((void*)(bitc_arena + {program.plan.offsets[t.storage]}))"
