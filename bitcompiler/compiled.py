"""``CompiledModel`` (what ``compile()`` returns) and ``load()`` (what reads an exported one back).

>>> import torch, bitcompiler as bc
>>> cm = bc.compile(torch.nn.Sequential(torch.nn.Linear(8, 4)), (torch.randn(1, 8),))
>>> cm.inputs[0].describe()
'float32 tensor of shape (batch, 8)'
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import fx
from torch.utils import _pytree as pytree

from bitcompiler import artifact
from bitcompiler.artifact import FORMAT_VERSION
from bitcompiler.backends.base import Runner
from bitcompiler.errors import InputError, InputTypeError, LoadError, TargetError
from bitcompiler.report import Report
from bitcompiler.target import Target, backend_for


@dataclass(frozen=True)
class InputSpec:
    shape: tuple[int, ...]  # without the batch dimension
    dtype: str

    def describe(self, batch: str = "batch") -> str:
        return f"{self.dtype} tensor of shape ({', '.join([batch, *map(str, self.shape)])})"


class CompiledModel:
    """A model compiled for a target.

    ``cm(x)`` runs the compiled code; ``cm.reference(x)`` runs the rewritten
    graph in PyTorch (the numeric reference); ``cm.graph`` is that graph;
    ``cm.report()`` says what it costs; ``cm.export(dir)`` / ``bc.load(dir)``
    round-trip without the original model.
    """

    def __init__(
        self,
        runner: Runner,
        graph: fx.GraphModule,
        exported: Any,
        inputs: list[InputSpec],
        tuple_output: bool,
        report: Report,
        target: Target,
        dynamic_batch: bool,
        out_tree: str | None = None,
    ) -> None:
        self._runner = runner
        self._out_tree = out_tree  # pytree of a dict / nested output (None: a tensor or a flat tuple)
        self._out_spec = pytree.treespec_loads(out_tree) if out_tree else None
        self._runner_checks = bool(getattr(runner, "checks_inputs", False))
        self.graph = graph
        self._exported = exported
        self.inputs = inputs
        self._tuple_output = tuple_output
        self._report = report
        self.target = target
        self.dynamic_batch = dynamic_batch
        # what a valid call looks like, as torch objects: the per-call check is then a few compares
        self._expected = [(getattr(torch, s.dtype, None), len(s.shape) + 1, s.shape) for s in inputs]
        self._batch: int | None = None if dynamic_batch else self._static_batch
        # one input, one tensor out, a runner checking shapes itself (the CPU's Relax VM): the
        # call skips the general path's lists and loops (a few µs of a 40 µs layer)
        simple = len(inputs) == 1 and not tuple_output and out_tree is None and self._runner_checks
        self._call_one = getattr(runner, "call_one", None) if simple else None
        # the VM's entries themselves (any batch, batch 1), called from __call__ without a frame
        # between: a batch-1 layer of 25 µs spent 1 µs in the calls around it
        self._entries: Any = getattr(runner, "entries", None)
        # the compiled code raises on NaN or Inf itself (bitcompiler/kernels/finite.py): the short
        # path skips Python's pass over the input, and looks only when a call fails
        self._kernels_check_finite = bool(getattr(runner, "checks_finite", False))
        # where kernels check every value of the one input (NaN/Inf) and so take it, with their
        # own argument checks, the fastest path (__call__). One tuple, read with one attribute
        # lookup on the hot path: the entry for any batch, the batch-1 entry, and one sample's
        # number of values (a call with that many is a batch of 1; any other shape of as many
        # values fails in the entry, and the path below names it)
        self._fast: tuple | None = (
            (self._entries[0], self._entries[1], math.prod(inputs[0].shape))
            if self._call_one is not None and self._kernels_check_finite and self._entries is not None
            else None
        )

    def _valid(self, inputs: tuple) -> bool:
        if len(inputs) != len(self._expected):
            return False
        for x, (dtype, dim, shape) in zip(inputs, self._expected):
            if not isinstance(x, torch.Tensor) or x.dtype != dtype or x.dim() != dim or x.shape[1:] != shape:
                return False
            if self._batch is not None and x.shape[0] != self._batch:
                return False
        return True

    def _check(self, inputs: tuple) -> None:
        if self._valid(inputs):
            return
        if len(inputs) != len(self.inputs):
            raise InputError(
                f"expected {len(self.inputs)} input(s) ("
                + "; ".join(s.describe() for s in self.inputs)
                + f"), got {len(inputs)}"
            )
        for i, (x, spec) in enumerate(zip(inputs, self.inputs)):
            if not isinstance(x, torch.Tensor):
                raise InputTypeError(
                    f"input {i}: expected a torch.Tensor ({spec.describe()}), got {type(x).__name__}"
                )
            got = f"{str(x.dtype).removeprefix('torch.')} tensor of shape {tuple(x.shape)}"
            if x.dim() != len(spec.shape) + 1 or tuple(x.shape[1:]) != spec.shape:
                raise InputError(f"input {i}: expected {spec.describe()}, got {got}")
            if str(x.dtype).removeprefix("torch.") != spec.dtype:
                raise InputError(
                    f"input {i}: expected {spec.describe()}, got {got}; convert with .to(torch.{spec.dtype})"
                )
            if not self.dynamic_batch and x.shape[0] != self._static_batch:
                raise InputError(
                    f"input {i}: this model was compiled with a fixed batch of {self._static_batch} "
                    f"(its forward fixes the batch size), got batch {x.shape[0]}"
                )

    @property
    def _static_batch(self) -> int:
        return int(
            self._exported.graph_signature
            and next(
                n
                for n in self._exported.graph.nodes
                if n.op == "placeholder" and n.name in self._exported.graph_signature.user_inputs
            )
            .meta["val"]
            .shape[0]
        )

    def _check_values(self, inputs: tuple) -> None:
        """Inputs the compiled code cannot take: on the meta device (no data) or holding NaN/Inf
        (quantized kernels would turn them into arbitrary finite numbers). The same on every target
        and in :meth:`reference`; one float32 sum per input (a NaN or Inf makes it non-finite)."""
        for i, x in enumerate(inputs):
            if not isinstance(x, torch.Tensor):
                self._check(inputs)  # raises, naming the input
            if x.is_meta:
                raise InputError(f"input {i} is on the meta device and holds no data; pass a CPU tensor")
            if x.is_floating_point() and x.numel() and not _all_finite(x):
                bad = ~torch.isfinite(x)
                if bad.any():
                    sample = int(bad.flatten(1).any(1).nonzero()[0]) if x.dim() > 1 else 0
                    raise InputError(
                        f"input {i} holds NaN or Inf (first in sample {sample}); bitcompiler does not "
                        "define results for non-finite inputs: replace them (e.g. torch.nan_to_num(x))"
                    )

    def _structure(self, outs: list) -> Any:
        outs = [o if isinstance(o, torch.Tensor) else torch.as_tensor(o) for o in outs]
        if self._out_spec is not None:
            return pytree.tree_unflatten(outs, self._out_spec)
        return tuple(outs) if self._tuple_output else outs[0]

    def __call__(self, *inputs: torch.Tensor) -> Any:
        entries = self._fast
        if entries is not None and len(inputs) == 1:
            # the fewest Python steps around the entry: after a kernel that streamed megabytes of
            # weights each runs on cold caches (0.1-0.3 µs a step, on a 25 µs layer). The input
            # reaches a kernel (as a NaN/Inf check needs), and TVM's argument checks refuse another
            # device, dtype, shape or a strided layout; the kernels may assume 64-byte aligned data
            x = inputs[0]
            try:
                if not x.data_ptr() % 64:
                    out = entries[x.numel() == entries[2]](x)
                    return out if type(out) is _TENSOR else _first(out)
            except Exception:  # noqa: BLE001, S110 - the path below calls again and names the fault
                pass
        if self._call_one is not None and len(inputs) == 1:
            x = inputs[0]
            if isinstance(x, torch.Tensor) and x.is_cpu and not x.requires_grad:
                if (
                    not self._kernels_check_finite
                    and x.is_floating_point()
                    and x.numel()
                    and not _all_finite(x)
                ):
                    self._check_values(inputs)  # raises, naming the first bad sample
                try:
                    # TVM takes DLPack data only contiguous and 64-byte aligned: call_one copies others
                    if x.is_contiguous() and not x.data_ptr() % 64:
                        out = self._entries[x.shape[0] == 1](x)
                    else:
                        out = self._call_one(x)
                except Exception:
                    self._check(inputs)  # raises, naming what is wrong with the input
                    self._check_values(inputs)  # a kernel found NaN or Inf: name the sample
                    raise
                return out if isinstance(out, torch.Tensor) else _first(out)
        # a runner that checks count, dtypes and shapes itself (the Relax VM's entry does) is called
        # directly: only a failed call pays for the checks that turn its error into one naming the input
        if not self._runner_checks and not self._valid(inputs):
            self._check(inputs)  # raises, naming what is wrong
        self._check_values(inputs)
        try:
            outs = self._runner([_plain(inputs[0])] if len(inputs) == 1 else [_plain(x) for x in inputs])
        except Exception:
            if self._runner_checks:
                self._check(inputs)
            raise
        if not self._tuple_output and self._out_spec is None:
            return outs[0] if isinstance(outs[0], torch.Tensor) else torch.as_tensor(outs[0])
        return self._structure(outs)

    def reference(self, *inputs: torch.Tensor) -> Any:
        """The rewritten graph run in PyTorch: the numbers the compiled code must reproduce."""
        self._check(inputs)
        self._check_values(inputs)
        with torch.no_grad():
            return self.graph(*[_plain(x) for x in inputs])

    def report(self) -> Report:
        return self._report

    def profile(self, *inputs: torch.Tensor, repeat: int = 100) -> Any:
        """Where a call on ``inputs`` goes (CPU targets): each kernel's microseconds and share,
        and the time outside the kernels; ``print(cm.profile(x))`` shows the table."""
        from bitcompiler.backends.cpu.profile import profile

        self._check(inputs)
        self._check_values(inputs)
        if not hasattr(self._runner, "executable"):
            raise TargetError(
                f"profile() times the Relax VM's kernels of a CPU target; target {self.target.name!r} "
                "has none here: time cm(x) as a whole instead"
            )
        return profile(self._runner, self, [_plain(x) for x in inputs], int(inputs[0].shape[0]), repeat)

    def export(self, directory: str | os.PathLike) -> Path:
        """Write the compiled library, the reference graph and metadata into ``directory``.

        The bundle is written into a temporary directory beside it and renamed into place: a
        failed export leaves nothing half-written (:class:`~bitcompiler.errors.ExportError`).
        """

        def write(d: Path) -> None:
            files = [*self._runner.export(d), *artifact.save_reference(self._exported, d)]
            meta = {
                "format": FORMAT_VERSION,
                "target": self.target.name,
                "target_options": dict(self.target.options),
                "inputs": [{"shape": list(s.shape), "dtype": s.dtype} for s in self.inputs],
                "tuple_output": self._tuple_output,
                "output_tree": self._out_tree,
                "dynamic_batch": self.dynamic_batch,
                "files": files,
                "sha256": {name: artifact.sha256(d / name) for name in files},
                "report": self._report.to_dict(),
            }
            (d / "meta.json").write_text(json.dumps(meta, indent=2))

        return artifact.write_atomic(Path(directory), write)

    def export_onnx(self, path: str | os.PathLike, format: str = "qdq", batch: int | None = None) -> Path:
        """Write the model as ONNX: ``format="qdq"`` (QuantizeLinear/DequantizeLinear, runs in
        onnxruntime) or ``"qonnx"`` (``Quant``/``BipolarQuant`` nodes, for FINN); docs/onnx.md.
        ``batch``: a fixed batch size (default: dynamic for QDQ, 1 for QONNX)."""
        from bitcompiler.onnx.export import export_onnx

        return export_onnx(self, path, format, batch)

    def __repr__(self) -> str:
        ins = ", ".join(s.describe() for s in self.inputs)
        return f"CompiledModel(target={self.target}, inputs=[{ins}], bits/weight={self._report.bits_per_weight:.3f})"


# torch reduces a tensor of up to this many elements on the calling thread (at::internal::GRAIN_SIZE)
_TORCH_GRAIN = 32768
_TENSOR = torch.Tensor
_NUMPY_FLOATS = (torch.float32, torch.float64, torch.float16)


def _all_finite(x: torch.Tensor) -> bool:
    """Whether ``x`` holds no NaN or Inf (a sum that overflows says no too: the caller looks again).
    Never on torch's intra-op thread pool: waking it on every call (a 64x4096 input) made its
    threads spin against TVM's on the same cores, 2 threads 4x slower than one. Larger inputs go
    through numpy, which reduces on the calling thread."""
    if x.numel() <= _TORCH_GRAIN or x.dtype not in _NUMPY_FLOATS or not x.is_cpu:
        return math.isfinite((x.detach() if x.requires_grad else x).sum())
    return bool(np.isfinite(x.detach().numpy()).all())


def _first(out: Any) -> torch.Tensor:
    """The one tensor of a VM result that came back wrapped (a tuple of one, a TVM tensor)."""
    while not isinstance(out, torch.Tensor) and not hasattr(out, "numpy"):
        out = out[0]
    return out if isinstance(out, torch.Tensor) else torch.from_dlpack(out)


def _plain(x: torch.Tensor) -> torch.Tensor:
    """``x`` as the runners take it: detached, on the CPU, contiguous (``x`` itself when it already is)."""
    if x.requires_grad or not x.is_cpu or not x.is_contiguous():
        return x.detach().cpu().contiguous()
    return x


def load(directory: str | os.PathLike) -> CompiledModel:
    """Load what :meth:`CompiledModel.export` wrote; the original model is not needed.

    The bundle is validated first (format version, file list, the sha256 of every file recorded
    at export): a mismatch raises :class:`~bitcompiler.errors.LoadError` naming the file. Nothing
    is unpickled, but the bundle's native library is run: load bundles you trust.
    """
    d = Path(directory)
    meta = artifact.read_meta(d)
    try:
        target = Target(meta["target"], **meta.get("target_options", {}))
        inputs = [InputSpec(tuple(i["shape"]), i["dtype"]) for i in meta["inputs"]]
        report = Report.from_dict(meta["report"])
    except Exception as e:
        raise LoadError(f"{d / 'meta.json'} has invalid fields ({e}); export the model again") from e
    runner = backend_for(target).load(d, target)
    import bitcompiler.ops  # noqa: F401 - registers the bitc ops the reference graph calls

    exported = artifact.load_reference(d)
    graph = exported.module()
    return CompiledModel(
        runner,
        graph,
        exported,
        inputs,
        bool(meta.get("tuple_output")),
        report,
        target,
        bool(meta["dynamic_batch"]),
        meta.get("output_tree"),
    )
