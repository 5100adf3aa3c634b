"""``compile()``, ``prepare()``, ``load()`` and ``CompiledModel``.

>>> import torch, bitcompiler as bc
>>> model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
>>> cm = bc.compile(model, (torch.randn(1, 64),), scheme="binary")
>>> cm(torch.randn(8, 64)).shape
torch.Size([8, 10])
"""

from __future__ import annotations

import copy
import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from bitcompiler import artifact
from bitcompiler.artifact import FORMAT_VERSION
from bitcompiler.backends.base import BuildInput, Runner
from bitcompiler.backends.lower import export_graph
from bitcompiler.capture import capture, symbolic_trace
from bitcompiler.errors import InputError, InputTypeError, LoadError, ModelError, ModelTypeError
from bitcompiler.passes.pipeline import PassContext, Pipeline
from bitcompiler.quant.modules import QUANT_LAYERS, quantizable, quantize_layer
from bitcompiler.quant.schemes import Scheme
from bitcompiler.report import Report, build_report
from bitcompiler.target import Target, backend_for

# torch's export internals warn about their own pytree API on every deepcopy of an exported graph
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*", category=FutureWarning)


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
            if x.is_floating_point() and x.numel() and not math.isfinite(x.detach().sum()):
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

    def __repr__(self) -> str:
        ins = ", ".join(s.describe() for s in self.inputs)
        return f"CompiledModel(target={self.target}, inputs=[{ins}], bits/weight={self._report.bits_per_weight:.3f})"


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


def _normalize_inputs(example_inputs: Any) -> tuple[torch.Tensor, ...]:
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if not isinstance(example_inputs, (tuple, list)) or not example_inputs:
        raise InputTypeError("example_inputs must be a tuple of tensors, e.g. (torch.randn(1, 3, 32, 32),)")
    for i, x in enumerate(example_inputs):
        if not isinstance(x, torch.Tensor):
            raise InputTypeError(
                f"example_inputs[{i}] is a {type(x).__name__}; every example input must be a tensor"
            )
        if x.dim() == 0:
            raise InputError(f"example_inputs[{i}] is a scalar; inputs need a batch dimension first")
        if x.numel() == 0:
            raise InputError(
                f"example_inputs[{i}] has shape {tuple(x.shape)}: a 0-size dimension; give an example "
                "with at least one sample and no empty dimension (calls may still use batch 0)"
            )
        if x.is_meta:
            raise InputError(
                f"example_inputs[{i}] is on the meta device and holds no data; pass a CPU tensor"
            )
    return tuple(x.detach().cpu() for x in example_inputs)


def is_prepared(model: nn.Module) -> bool:
    return any(isinstance(m, QUANT_LAYERS) for m in model.modules())


def compile(
    model: nn.Module,
    example_inputs: Any,
    target: str | Target = "cpu",
    scheme: str | Scheme | None = None,
    pipeline: Pipeline | None = None,
    tune: bool | TuneOptions = False,
    strict: bool = False,
    db: str | os.PathLike | Any | None = None,
) -> CompiledModel:
    """Compile ``model`` for ``target`` with weights quantized by ``scheme``.

    ``scheme=None`` uses a ``prepare``d model's own quantizers, else ``"binary"``.
    The batch dimension stays dynamic; other dimensions are fixed by the example.
    Kernels with a tuning record in ``db`` (default ``$BITC_CACHE/tuning``) use it; ``tune=True``
    first tunes the kernels that have none (see :func:`tune`).
    """
    if isinstance(model, (str, os.PathLike)):
        raise ModelError(
            f"{model!s}: compiling ONNX files is not supported yet; load the model in PyTorch and pass the nn.Module"
        )
    if not isinstance(model, nn.Module):
        raise ModelTypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    example_inputs = _normalize_inputs(example_inputs)
    target = Target.parse(target)
    prepared = is_prepared(model)
    if scheme is None:
        scheme = Scheme("none") if prepared else Scheme("binary")
    scheme = Scheme.parse(scheme)
    label = str(scheme) if scheme.quantizes or not prepared else "as prepared"
    tuning = TuneOptions() if tune is True else (tune or None)
    if tuning is not None and not isinstance(tuning, TuneOptions):
        raise TypeError(f"tune must be a bool or TuneOptions, got {type(tune).__name__}")
    backend = backend_for(target)
    if tuning is not None and not backend.tunable:
        warnings.warn(
            f"tuning supports target='cpu' only; compiling for {target} with bitcompiler's hand schedules",
            stacklevel=2,
        )
    gm = capture(model, example_inputs)
    fixed_by_capture = gm.meta.get("bitc_fixed_batch", "")
    ctx = PassContext(scheme=scheme, strict=strict, target=target, example_inputs=example_inputs)
    gm = (pipeline or Pipeline.default(target)).run(gm, ctx)
    with torch.no_grad():
        out = gm(*example_inputs)
    leaves, spec = pytree.tree_flatten(out)
    if not all(isinstance(t, torch.Tensor) for t in leaves) or not leaves:
        kinds = sorted({type(t).__name__ for t in leaves if not isinstance(t, torch.Tensor)}) or ["nothing"]
        raise ModelError(
            f"{type(model).__name__}.forward returns {', '.join(kinds)} besides tensors; bitcompiler "
            "returns tensors, tuples, lists and dicts of tensors: return only tensors from forward()"
        )
    flat = isinstance(out, torch.Tensor) or (
        isinstance(out, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in out)
    )
    out_tree = None if flat else pytree.treespec_dumps(spec)
    exported = export_graph(gm, example_inputs)
    dynamic = any(
        not isinstance(d, int)
        for n in exported.graph.nodes
        if n.op == "placeholder" and "val" in n.meta and hasattr(n.meta["val"], "shape")
        for d in n.meta["val"].shape
    )
    runner = backend.build(BuildInput(gm, exported, example_inputs, tuning, db), target)
    report = build_report(gm, target.name, label, ctx.notes)
    report.extra.update(getattr(runner, "report_extra", {}))
    if not dynamic:
        why = fixed_by_capture or getattr(exported, "bitc_fixed_batch", "") or "unknown"
        batch = example_inputs[0].shape[0]
        report.extra["batch"] = f"fixed at {batch}: {why}"
        warnings.warn(
            f"{type(model).__name__} compiled with a fixed batch of {batch}: the batch dimension could not "
            f"be kept dynamic ({why}). Calls must use batch {batch}; to get a dynamic batch, avoid "
            "shapes computed from the batch size in forward() (e.g. use x.flatten(1) or x.view(x.shape[0], -1)).",
            stacklevel=2,
        )
    inputs = [InputSpec(tuple(x.shape[1:]), str(x.dtype).removeprefix("torch.")) for x in example_inputs]
    return CompiledModel(
        runner, gm, exported, inputs, isinstance(out, (tuple, list)), report, target, dynamic, out_tree
    )


@dataclass(frozen=True)
class TuneOptions:
    """What ``compile(tune=...)`` does: ``trials`` schedules per kernel within ``time_budget`` s.

    ``retune=False`` (``compile(tune=True)``) tunes only kernels without a record.
    """

    trials: int = 64
    time_budget: float | None = None
    retune: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.trials, bool) or not isinstance(self.trials, int) or self.trials <= 0:
            raise ValueError(
                f"trials must be a positive int (schedules measured per kernel), got {self.trials!r}"
            )
        if self.time_budget is not None and not self.time_budget > 0:
            raise ValueError(
                f"time_budget must be a positive number of seconds or None, got {self.time_budget!r}"
            )


def tune(
    model: torch.nn.Module,
    example_inputs: Any,
    target: Any = "cpu",
    scheme: Any = None,
    trials: int = 64,
    time_budget: float | None = None,
    db: str | os.PathLike | Any | None = None,
) -> CompiledModel:
    """Tune every bit kernel of ``model``, store the records in ``db``, return the compiled model.

    ``trials`` schedules are measured per kernel (fewer when ``time_budget`` seconds run out);
    ``db`` is a directory (default ``$BITC_CACHE/tuning``) or a MetaSchedule database. Later
    ``compile()`` calls with the same ``db`` apply the records without tuning again::

        >>> import torch, bitcompiler as bc
        >>> model = torch.nn.Sequential(torch.nn.Linear(256, 256))
        >>> cm = bc.tune(model, (torch.randn(1, 256),), scheme="binary:act=binary", trials=8)  # doctest: +SKIP
        >>> cm.report().extra["tuned kernels"]  # doctest: +SKIP
        1.0

    How it works: :mod:`bitcompiler.tuning`.
    """
    options = TuneOptions(trials, time_budget, retune=True)  # validates before any work
    if not backend_for(Target.parse(target)).tunable:
        raise ValueError(f"tuning supports target='cpu' only, got {target!r}")
    return compile(model, example_inputs, target, scheme, tune=options, db=db)


def prepare(model: nn.Module, scheme: str | Scheme = "binary") -> nn.Module:
    """A copy of ``model`` with trainable quantizer modules in place of its Linear/Conv2d layers.

    Train it in any PyTorch loop; ``compile()`` of it uses what was learned::

        >>> import torch, bitcompiler as bc
        >>> net = bc.prepare(torch.nn.Sequential(torch.nn.Linear(8, 4)), "binary")
        >>> type(net[0]).__name__
        'QuantLinear'
    """
    scheme = Scheme.parse(scheme)
    model = copy.deepcopy(model)
    if not scheme.quantizes:
        return model
    order = _layer_order(model)
    first_last = {order[0], order[-1]} if order else set()
    for name in order:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = getattr(parent, leaf)
        if quantizable(layer) is None:
            setattr(parent, leaf, quantize_layer(layer, scheme, name in first_last))
    return model


def _layer_order(model: nn.Module) -> list[str]:
    """Linear/Conv2d module names in the order forward() calls them (module order if untraceable)."""
    kinds = (nn.Linear, nn.Conv2d)
    try:
        gm = symbolic_trace(model)
        names = [
            str(n.target)
            for n in gm.graph.nodes
            if n.op == "call_module" and isinstance(gm.get_submodule(str(n.target)), kinds)
        ]
    except Exception:  # noqa: BLE001 - tracing is only used for the order
        names = [n for n, m in model.named_modules() if isinstance(m, kinds)]
    return list(dict.fromkeys(names))
