"""``compile()``, ``tune()`` and ``prepare()``; what they return: :mod:`bitcompiler.compiled`.

>>> import torch, bitcompiler as bc
>>> model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
>>> cm = bc.compile(model, (torch.randn(1, 64),), scheme="binary")
>>> cm(torch.randn(8, 64)).shape
torch.Size([8, 10])
"""

from __future__ import annotations

import copy
import os
import warnings
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from bitcompiler.backends.base import BuildInput
from bitcompiler.capture import capture, export_graph, symbolic_trace
from bitcompiler.compiled import CompiledModel, InputSpec
from bitcompiler.errors import InputError, InputTypeError, ModelError, ModelTypeError
from bitcompiler.passes.pipeline import PassContext, Pipeline
from bitcompiler.quant.modules import QUANT_LAYERS, quantizable, quantize_layer
from bitcompiler.quant.schemes import Scheme
from bitcompiler.report import build_report
from bitcompiler.target import Target, backend_for
from bitcompiler.tuning import TuneOptions

# torch's export internals warn about their own pytree API on every deepcopy of an exported graph
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*", category=FutureWarning)


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


def _output_structure(model_name: str, gm: Any, example_inputs: tuple) -> tuple[Any, str | None]:
    """The rewritten graph's output on the example (fake tensors where it runs on them), and its
    pytree spec when it is not a tensor or a flat tuple/list of tensors (``None`` then)."""
    out = _fake_output(gm, example_inputs)
    if out is None:  # an op fake tensors cannot run (a value read in Python): the real run
        with torch.no_grad():
            out = gm(*example_inputs)
    leaves, spec = pytree.tree_flatten(out)
    if not all(isinstance(t, torch.Tensor) for t in leaves) or not leaves:
        kinds = sorted({type(t).__name__ for t in leaves if not isinstance(t, torch.Tensor)}) or ["nothing"]
        raise ModelError(
            f"{model_name}.forward returns {', '.join(kinds)} besides tensors; bitcompiler "
            "returns tensors, tuples, lists and dicts of tensors: return only tensors from forward()"
        )
    flat = isinstance(out, torch.Tensor) or (
        isinstance(out, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in out)
    )
    return out, None if flat else pytree.treespec_dumps(spec)


def _fake_output(gm: Any, example_inputs: tuple) -> Any:
    """The graph's output on fake tensors: its structure, shapes and dtypes without the arithmetic
    (the real run of the bit layers' reference numerics took 1.2 s of a 224x224 ResNet-18's
    compile), or None where an op cannot run on them."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    try:
        with torch.no_grad(), FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fake = [mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in example_inputs]
            return gm(*fake)
    except Exception:  # noqa: BLE001 - any failure: the caller runs the graph for real
        return None


def compile(
    model: nn.Module | str | os.PathLike,
    example_inputs: Any,
    target: str | Target = "cpu",
    scheme: str | Scheme | None = None,
    pipeline: Pipeline | None = None,
    tune: bool | TuneOptions = False,
    strict: bool = False,
    db: str | os.PathLike | Any | None = None,
) -> CompiledModel:
    """Compile ``model`` (an ``nn.Module``, or the path of an ``.onnx`` file: docs/onnx.md) for
    ``target`` with weights quantized by ``scheme``.

    ``scheme=None`` uses a ``prepare``d model's own quantizers, else ``"binary"``.
    The batch dimension stays dynamic; other dimensions are fixed by the example.
    Kernels with a tuning record in ``db`` (default ``$BITC_CACHE/tuning``) use it; ``tune=True``
    first tunes the kernels that have none (see :func:`tune`).
    """
    if isinstance(model, (str, os.PathLike)):
        from bitcompiler.onnx import from_onnx

        model = from_onnx(model, [tuple(x.shape) for x in _normalize_inputs(example_inputs)])
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
    out, out_tree = _output_structure(type(model).__name__, gm, example_inputs)
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


def tune(
    model: torch.nn.Module,
    example_inputs: Any,
    target: Any = "cpu",
    scheme: Any = None,
    trials: int = 64,
    time_budget: float | None = None,
    db: str | os.PathLike | Any | None = None,
    runner: str | None = None,
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

    ``runner="rpc://host:port/key"`` measures the schedules on a server of that TVM RPC tracker
    (a device farm; the model is compiled for ``target``, which should describe that machine).
    How it works: :mod:`bitcompiler.tuning`.
    """
    options = TuneOptions(trials, time_budget, retune=True, runner=runner)  # validates before any work
    if runner is not None:
        from bitcompiler import rpc

        rpc.check(rpc.parse(runner))  # a tracker that is down fails now, naming its address
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
    model.bitc_scheme = str(scheme)  # type: ignore[assignment]  # train.fit picks the scheme's recipe by it
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
