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
        self.graph = graph
        self._exported = exported
        self.inputs = inputs
        self._tuple_output = tuple_output
        self._report = report
        self.target = target
        self.dynamic_batch = dynamic_batch

    def _check(self, inputs: tuple) -> None:
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
        self._check(inputs)
        outs = self._runner([x.detach().cpu().contiguous() for x in inputs])
        tensors = tuple(torch.as_tensor(o) for o in outs)
        return tensors if self._tuple_output else tensors[0]

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
    tune: bool = False,
    strict: bool = False,
) -> CompiledModel:
    """Compile ``model`` for ``target`` with weights quantized by ``scheme``.

    ``scheme=None`` uses a ``prepare``d model's own quantizers, else ``"binary"``.
    The batch dimension stays dynamic; other dimensions are fixed by the example.
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
    if tune:
        warnings.warn(
            "tuning is not available in this version; compiling with bitcompiler's hand schedules",
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
        runner = _build_cached(backend, exported, target)
    report = build_report(gm, target.name, label, ctx.notes)
    report.extra.update(getattr(runner, "report_extra", {}))
    inputs = [InputSpec(tuple(x.shape[1:]), str(x.dtype).removeprefix("torch.")) for x in example_inputs]
    return CompiledModel(
        runner, gm, exported, inputs, isinstance(out, (tuple, list)), report, target, dynamic
    )


def _build_cached(backend: Any, exported: Any, target: Target) -> Runner:
    """Build through the compile cache: an unchanged graph on the same target is loaded, not rebuilt."""
    entry = cache.key(exported, str(target) + str(target.tvm_target()))
    runner = cache.lookup(entry, lambda path: backend.load(path, target))
    if runner is not None:
        runner.cache_hit = True  # type: ignore[attr-defined]
        return runner  # type: ignore[return-value]
    runner = backend.build(to_relax(exported), target)
    cache.store(entry, runner.export)
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
