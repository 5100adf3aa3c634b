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
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from bitcompiler import cache
from bitcompiler.backends.base import Runner, Target, backend_for
from bitcompiler.backends.lower import export_graph, to_relax
from bitcompiler.capture import capture, symbolic_trace
from bitcompiler.passes.pipeline import PassContext, Pipeline
from bitcompiler.quant.modules import QUANT_LAYERS, quantizable, quantize_layer
from bitcompiler.quant.schemes import Scheme
from bitcompiler.report import Report, build_report

FORMAT_VERSION = 1
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
    ) -> None:
        self._runner = runner
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
            raise ValueError(
                f"expected {len(self.inputs)} input(s) ("
                + "; ".join(s.describe() for s in self.inputs)
                + f"), got {len(inputs)}"
            )
        for i, (x, spec) in enumerate(zip(inputs, self.inputs)):
            if not isinstance(x, torch.Tensor):
                raise TypeError(
                    f"input {i}: expected a torch.Tensor ({spec.describe()}), got {type(x).__name__}"
                )
            got = f"{str(x.dtype).removeprefix('torch.')} tensor of shape {tuple(x.shape)}"
            if x.dim() != len(spec.shape) + 1 or tuple(x.shape[1:]) != spec.shape:
                raise ValueError(f"input {i}: expected {spec.describe()}, got {got}")
            if str(x.dtype).removeprefix("torch.") != spec.dtype:
                raise ValueError(
                    f"input {i}: expected {spec.describe()}, got {got}; convert with .to(torch.{spec.dtype})"
                )
            if not self.dynamic_batch and x.shape[0] != self._static_batch:
                raise ValueError(
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

    def __call__(self, *inputs: torch.Tensor) -> Any:
        # a runner that checks count, dtypes and shapes itself (the Relax VM's entry does) is called
        # directly: only a failed call pays for the checks that turn its error into one naming the input
        if not self._runner_checks and not self._valid(inputs):
            self._check(inputs)  # raises, naming what is wrong
        try:
            outs = self._runner([_plain(inputs[0])] if len(inputs) == 1 else [_plain(x) for x in inputs])
        except Exception:
            if self._runner_checks:
                self._check(inputs)
            raise
        if not self._tuple_output:
            return outs[0] if isinstance(outs[0], torch.Tensor) else torch.as_tensor(outs[0])
        return tuple(o if isinstance(o, torch.Tensor) else torch.as_tensor(o) for o in outs)

    def reference(self, *inputs: torch.Tensor) -> Any:
        """The rewritten graph run in PyTorch: the numbers the compiled code must reproduce."""
        self._check(inputs)
        with torch.no_grad():
            return self.graph(*inputs)

    def report(self) -> Report:
        return self._report

    def export(self, directory: str | os.PathLike) -> Path:
        """Write the compiled library, the reference graph and metadata into ``directory``."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        files = self._runner.export(d)
        torch.export.save(self._exported, str(d / "reference.pt2"))
        meta = {
            "format": FORMAT_VERSION,
            "target": self.target.name,
            "target_options": dict(self.target.options),
            "inputs": [{"shape": list(s.shape), "dtype": s.dtype} for s in self.inputs],
            "tuple_output": self._tuple_output,
            "dynamic_batch": self.dynamic_batch,
            "files": files + ["reference.pt2"],
            "report": self._report.to_dict(),
        }
        (d / "meta.json").write_text(json.dumps(meta, indent=2))
        return d

    def __repr__(self) -> str:
        ins = ", ".join(s.describe() for s in self.inputs)
        return f"CompiledModel(target={self.target}, inputs=[{ins}], bits/weight={self._report.bits_per_weight:.3f})"


def _plain(x: torch.Tensor) -> torch.Tensor:
    """``x`` as the runners take it: detached, on the CPU, contiguous (``x`` itself when it already is)."""
    if x.requires_grad or not x.is_cpu or not x.is_contiguous():
        return x.detach().cpu().contiguous()
    return x


def load(directory: str | os.PathLike) -> CompiledModel:
    """Load what :meth:`CompiledModel.export` wrote; the original model is not needed."""
    d = Path(directory)
    meta_path = d / "meta.json"
    if not meta_path.exists():
        raise FileNotFoundError(
            f"{meta_path} not found: {d} is not a directory written by CompiledModel.export"
        )
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT_VERSION:
        raise ValueError(
            f"{meta_path}: format {meta.get('format')} is not supported (expected {FORMAT_VERSION})"
        )
    target = Target(meta["target"], **meta.get("target_options", {}))
    runner = backend_for(target).load(d, target)
    import bitcompiler.ops  # noqa: F401 - registers the bitc ops the reference graph calls

    exported = torch.export.load(str(d / "reference.pt2"))
    graph = exported.module()
    inputs = [InputSpec(tuple(i["shape"]), i["dtype"]) for i in meta["inputs"]]
    return CompiledModel(
        runner,
        graph,
        exported,
        inputs,
        meta["tuple_output"],
        Report.from_dict(meta["report"]),
        target,
        meta["dynamic_batch"],
    )


def _normalize_inputs(example_inputs: Any) -> tuple[torch.Tensor, ...]:
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if not isinstance(example_inputs, (tuple, list)) or not example_inputs:
        raise TypeError("example_inputs must be a tuple of tensors, e.g. (torch.randn(1, 3, 32, 32),)")
    for i, x in enumerate(example_inputs):
        if not isinstance(x, torch.Tensor):
            raise TypeError(
                f"example_inputs[{i}] is a {type(x).__name__}; every example input must be a tensor"
            )
        if x.dim() == 0:
            raise ValueError(f"example_inputs[{i}] is a scalar; inputs need a batch dimension first")
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
        raise ValueError(  # noqa: TRY004 - a path is a valid kind of model, just not yet supported
            f"{model!s}: compiling ONNX files is not supported yet; load the model in PyTorch and pass the nn.Module"
        )
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
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
    if tuning is not None and target.family != "cpu":
        warnings.warn(
            f"tuning supports target='cpu' only; compiling for {target} with bitcompiler's hand schedules",
            stacklevel=2,
        )
    backend = backend_for(target)
    gm = capture(model, example_inputs)
    ctx = PassContext(scheme=scheme, strict=strict, target=target.name, example_inputs=example_inputs)
    gm = (pipeline or Pipeline.default(target)).run(gm, ctx)
    with torch.no_grad():
        out = gm(*example_inputs)
    exported = export_graph(gm, example_inputs)
    dynamic = any(
        not isinstance(d, int)
        for n in exported.graph.nodes
        if n.op == "placeholder" and "val" in n.meta and hasattr(n.meta["val"], "shape")
        for d in n.meta["val"].shape
    )
    if hasattr(backend, "build_from_graph"):
        # backends that generate their own code (cortex-m) walk the rewritten graph, not Relax
        runner = backend.build_from_graph(gm, exported, example_inputs, target)
    else:
        runner = _build_cached(backend, exported, target, tuning, db, example_inputs[0].shape[0])
    report = build_report(gm, target.name, label, ctx.notes)
    report.extra.update(getattr(runner, "report_extra", {}))
    inputs = [InputSpec(tuple(x.shape[1:]), str(x.dtype).removeprefix("torch.")) for x in example_inputs]
    return CompiledModel(
        runner, gm, exported, inputs, isinstance(out, (tuple, list)), report, target, dynamic
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
    if Target.parse(target).family != "cpu":
        raise ValueError(f"tuning supports target='cpu' only, got {target!r}")
    return compile(model, example_inputs, target, scheme, tune=options, db=db)


def _build_cached(
    backend: Any, exported: Any, target: Target, tuning: TuneOptions | None, db: Any, batch: int
) -> Runner:
    """Build through the compile cache: an unchanged graph on the same target (and with the same
    tuning records) is loaded, not rebuilt. Tunes first when ``tuning`` asks for it."""
    from bitcompiler import tuning as tuner

    tvm_target = target.tvm_target()
    database, where = tuner.open_database(db, create=tuning is not None)
    records = tuner.Records(database, tvm_target, batch)
    extra: dict[str, float] = {}
    if tuning is not None:
        kernels = tuner.kernels_of(lambda: to_relax(exported))
        extra["tuning s"] = tuner.tune_kernels(kernels, records, tuning, where)
    try:
        entry: str | None = cache.key(exported, str(target) + str(tvm_target) + records.fingerprint())
    except Exception as e:  # noqa: BLE001 - the cache is an optimization: never a reason to fail
        warnings.warn(
            f"compile cache skipped (could not hash the graph: {e}); compiling uncached", stacklevel=3
        )
        entry = None

    def load(path: Path) -> Runner:
        loaded = backend.load(path, target)
        loaded.report_extra = {**extra, **json.loads((path / "tuning.json").read_text())}
        return loaded  # type: ignore[no-any-return]

    runner = cache.lookup(entry, load) if entry is not None else None
    if runner is not None:
        runner.cache_hit = True  # type: ignore[attr-defined]
        return runner  # type: ignore[return-value]
    from bitcompiler.kernels.template import scheduling_with

    with scheduling_with(records):
        mod = to_relax(exported)
    runner = backend.build(mod, target)
    applied = {"tuned kernels": len(records.applied)}
    runner.report_extra = {**extra, **applied}  # type: ignore[attr-defined]

    def write(path: Path) -> None:
        runner.export(path)
        (path / "tuning.json").write_text(json.dumps(applied))

    if entry is not None:
        cache.store(entry, write)
    return runner


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
