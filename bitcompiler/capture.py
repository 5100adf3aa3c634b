"""Model -> ``fx.GraphModule``: torch.fx symbolic trace, torch.export as fallback.

A model neither can capture raises :class:`CaptureError` naming the line of
the model's code that stopped tracing and what to change.
"""

from __future__ import annotations

import copy
import linecache
import os
import traceback

import torch
from torch import fx, nn

from bitcompiler.quant.bitlayers import BIT_LAYERS
from bitcompiler.quant.modules import QUANT_LAYERS


class CaptureError(RuntimeError):
    """The model could not be turned into a graph."""


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


def capture(model: nn.Module, example_inputs: tuple) -> fx.GraphModule:
    """Trace ``model`` (a copy, in eval mode) into a GraphModule."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    model = copy.deepcopy(model).eval()
    try:
        return symbolic_trace(model)
    except Exception as fx_error:  # noqa: BLE001 - fall back to torch.export
        try:
            ep = torch.export.export(model, example_inputs, strict=False)
            gm = ep.module()
            return gm if isinstance(gm, fx.GraphModule) else symbolic_trace(gm)
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
