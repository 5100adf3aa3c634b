"""Model -> ``fx.GraphModule``: torch.fx symbolic trace, torch.export as fallback.

A model neither can capture raises :class:`CaptureError` naming the line of
the model's code that stopped tracing and what to change.
"""

from __future__ import annotations

import copy
import linecache
import logging
import os
import re
import traceback
import warnings

import torch
from torch import fx, nn

from bitcompiler.errors import CaptureError, LoweringError, ModelError, first_line
from bitcompiler.quant.bitlayers import BIT_LAYERS
from bitcompiler.quant.modules import QUANT_LAYERS


class _Tracer(fx.Tracer):
    """Keeps bitcompiler's quantized layers as single module calls."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (*QUANT_LAYERS, *BIT_LAYERS)) or super().is_leaf_module(m, qualname)


def symbolic_trace(model: nn.Module) -> fx.GraphModule:
    graph = _Tracer().trace(model)
    return fx.GraphModule(model, graph, type(model).__name__)


def _user_frame(exc: BaseException) -> str:
    """``file:line: code`` of the innermost frame outside torch and bitcompiler."""
    torch_dir = os.path.dirname(torch.__file__)
    own_dir = os.path.dirname(__file__)
    found = ""
    for frame in traceback.extract_tb(exc.__traceback__):
        if frame.filename.startswith((torch_dir, own_dir)) or frame.filename.startswith("<"):
            continue
        code = (frame.line or linecache.getline(frame.filename, frame.lineno or 0)).strip()
        found = f"{frame.filename}:{frame.lineno} in {frame.name}: `{code}`"
    return found


def export_dynamic(model: nn.Module, example_inputs: tuple) -> tuple[torch.export.ExportedProgram, str]:
    """``torch.export`` with dimension 0 of every input dynamic (the batch), else static.

    Returns the program and, when the batch had to be fixed, why (empty when it is dynamic).
    """
    batch = torch.export.Dim("batch", min=1)  # no upper bound: TVM would plan memory for it
    dynamic = tuple({0: batch} for _ in example_inputs)
    # torch.export specializes a dimension whose example size is 1: trace with a batch of 2
    traced_with = tuple(torch.cat([x[:1], x[:1]]) for x in example_inputs)
    fake_log = logging.getLogger("torch._subclasses.fake_tensor")
    level = fake_log.level
    fake_log.setLevel(logging.CRITICAL)  # a failed dynamic trace logs a full trace before raising
    try:
        with warnings.catch_warnings():  # torch's own pytree deprecation noise
            warnings.simplefilter("ignore", FutureWarning)
            try:
                ep = torch.export.export(model, traced_with, dynamic_shapes=dynamic, strict=False)
                reason = _computed_from_batch(ep)
                if not reason:
                    return ep, ""
            except Exception as e:  # noqa: BLE001 - e.g. x.view(1, -1): the model fixes the batch
                where = _user_frame(e)
                reason = first_line(e) + (f" (at {where})" if where else "")
            return torch.export.export(model, tuple(example_inputs), strict=False), reason
    finally:
        fake_log.setLevel(level)


def _computed_from_batch(ep: torch.export.ExportedProgram) -> str:
    """Why a dynamic-batch program cannot be compiled: a shape computed from the batch (a view
    that folds the batch into features gives ``16*batch``), or "" when there is none."""
    for node in ep.graph.nodes:
        val = node.meta.get("val")
        for d in getattr(val, "shape", ()):
            if isinstance(d, torch.SymInt) and not d.node.expr.is_symbol:
                shape = re.sub(r"\bs\d+\b", "batch", str(d.node.expr))
                return f"`{node.name}` has a dimension computed from the batch ({shape})"
    return ""


def _on_cpu_float32(model: nn.Module) -> nn.Module:
    """``model`` with its parameters and buffers on the CPU and its float ones in float32.

    A parameter on the meta device has no values: a :class:`ModelError` names it. Half, bfloat16
    and float64 weights are converted with a warning (bitcompiler quantizes from float32).
    """
    tensors = [*model.named_parameters(), *model.named_buffers()]
    for name, t in tensors:
        if t.is_meta:
            raise ModelError(
                f"parameter {name!r} is on the meta device and holds no values; load the weights "
                "first (e.g. model.to_empty(device='cpu') then load_state_dict)"
            )
    if any(not t.is_cpu for _, t in tensors):
        model = model.cpu()
    others = sorted(
        {str(t.dtype).removeprefix("torch.") for _, t in tensors if t.is_floating_point()} - {"float32"}
    )
    if others:
        warnings.warn(
            f"{type(model).__name__} has {', '.join(others)} weights: compiling a float32 copy "
            "(call model.float() to silence this)",
            stacklevel=3,
        )
        model = model.float()
    return model


def capture(model: nn.Module, example_inputs: tuple) -> fx.GraphModule:
    """Trace ``model`` (a copy, in eval mode) into a GraphModule.

    torch.fx comes first; a model it cannot trace goes through ``torch.export`` with a dynamic
    batch. When only a fixed batch exports, ``gm.meta["bitc_fixed_batch"]`` says why.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    model = _on_cpu_float32(copy.deepcopy(model).eval())
    try:
        return symbolic_trace(model)
    except Exception as fx_error:  # noqa: BLE001 - fall back to torch.export
        try:
            ep, fixed = export_dynamic(model, example_inputs)
            gm = ep.module(check_guards=False)  # no export-internal guard node in the graph
            gm = gm if isinstance(gm, fx.GraphModule) else symbolic_trace(gm)
            if fixed:
                gm.meta["bitc_fixed_batch"] = fixed
            return gm
        except Exception as export_error:  # noqa: BLE001
            where = _user_frame(fx_error) or _user_frame(export_error) or "(line unknown)"
            first = (
                str(fx_error).strip().splitlines()[0] if str(fx_error).strip() else type(fx_error).__name__
            )
            raise CaptureError(
                f"cannot capture {type(model).__name__}: neither torch.fx nor torch.export can trace it.\n"
                f"  at {where}\n"
                f"  torch.fx said: {first}\n"
                f"  torch.export said: {str(export_error).strip().splitlines()[0] if str(export_error).strip() else type(export_error).__name__}\n"
                "  fix: make control flow independent of tensor values (use torch.where or torch.cond), "
                "or move data-dependent branches out of forward()."
            ) from fx_error


def export_graph(gm: fx.GraphModule, example_inputs: tuple) -> torch.export.ExportedProgram:
    """``torch.export`` with dimension 0 of every input dynamic (the batch); static when the graph
    fixes the batch (``ep.bitc_fixed_batch`` then says why)."""
    try:
        ep, fixed = export_dynamic(gm, example_inputs)
    except Exception as e:
        raise LoweringError(f"torch.export of the rewritten graph failed: {first_line(e)}") from e
    ep.bitc_fixed_batch = fixed  # type: ignore[attr-defined]
    return ep
