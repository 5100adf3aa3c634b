"""ONNX out: :func:`export_onnx` writes a compiled model as QDQ ONNX or QONNX.

The float parts of ``cm.graph`` go through torch's TorchScript ONNX exporter; each bitc layer
call is first replaced by a placeholder node (an ``autograd.Function`` whose ONNX symbolic is
one ``bitc_export::Layer`` node), and the placeholders are then replaced by the nodes
:mod:`bitcompiler.onnx.emit` builds from the layer's codes and scales.
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import warnings
from pathlib import Path
from typing import Any

import onnx
import torch
import torch.nn.functional as F
from torch import fx, nn

from bitcompiler import ops
from bitcompiler.errors import ExportError, UnsupportedExport, first_line
from bitcompiler.onnx.emit import FORMATS, QONNX_DOMAIN, Builder
from bitcompiler.onnx.layers import QuantLayer, constant_tensors, read_layer
from bitcompiler.quant import numerics

OPSET = 17
_DOMAIN = "bitc_export"


class _Placeholder(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, index: int, call: _LayerCall) -> torch.Tensor:  # type: ignore[override]
        return call.run(x)

    @staticmethod
    def symbolic(g: Any, x: Any, index: int, call: _LayerCall) -> Any:
        out = g.op(f"{_DOMAIN}::Layer", x, index_i=index)
        out.setType(x.type().with_sizes(list(call.out_shape)))  # what the traced call returned
        return out


class _LayerCall(nn.Module):
    """A bitc layer call in the graph to export: runs the op, exports as a placeholder."""

    def __init__(self, index: int, node: fx.Node, gm: fx.GraphModule) -> None:
        super().__init__()
        self.index = index
        call = ops.bind(node)
        self._attrs = call.attrs
        self._tensors = constant_tensors(gm, call)

        self.out_shape: tuple[int, ...] = ()

    def run(self, x: torch.Tensor) -> torch.Tensor:
        y = self._attrs.call(x, self._tensors)
        self.out_shape = tuple(y.shape)
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Placeholder.apply(x, self.index, self)


def _avg_pool(x: torch.Tensor, kernel: list, stride: list, padding: list, count_include_pad: bool) -> Any:
    return F.avg_pool2d(x, kernel, stride, padding, count_include_pad=count_include_pad)


def _exact_unary(x: torch.Tensor, fn: str) -> Any:
    if fn == "gelu_sign":  # the rule's own formulation: comparisons and Where
        return numerics.exact_unary(x, fn)
    return torch.sigmoid(x) if fn == "sigmoid" else torch.tanh(x)


def placeholder_graph(gm: fx.GraphModule) -> tuple[fx.GraphModule, list[QuantLayer]]:
    """A copy of ``gm`` with each bitc layer call a placeholder, and the layers in index order."""
    gm = copy.deepcopy(gm)
    layers: list[QuantLayer] = []
    for node in list(gm.graph.nodes):
        name = ops.op_name(node)
        if name == "window_mean":
            node.target = _avg_pool
        elif name == "exact_unary":  # ONNX's own Sigmoid / Tanh; GELU's sign rule
            node.target = _exact_unary
        elif name in ops.ATTRS:
            layers.append(read_layer(gm, node))
            call = _LayerCall(len(layers) - 1, node, gm)
            target = f"bitc_layer_{call.index}"
            gm.add_module(target, call)
            with gm.graph.inserting_before(node):
                new = gm.graph.call_module(target, (ops.bind(node).x,))
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
        elif name is not None:
            raise UnsupportedExport(
                f"node {node.name!r} calls bitc::{name}, which ONNX export cannot write yet; "
                "compile the model with a scheme that does not produce it to export it"
            )
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm, layers


class _Wrapped(nn.Module):
    """The graph as a plain module (the exporter reads a ``.graph`` attribute as TorchScript's)."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__()
        self.inner = gm

    def forward(self, *inputs: torch.Tensor) -> Any:
        return self.inner(*inputs)


def _torch_export(gm: fx.GraphModule, examples: tuple, dynamic: bool) -> onnx.ModelProto:
    names = [f"input_{i}" for i in range(len(examples))]
    with torch.no_grad():
        outs = gm(*examples)
    n_out = 1 if isinstance(outs, torch.Tensor) else len(torch.utils._pytree.tree_leaves(outs))
    out_names = [f"output_{i}" for i in range(n_out)]
    axes = {n: {0: "batch"} for n in [*names, *out_names]} if dynamic else None
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(
            _Wrapped(gm),
            examples,
            f,  # type: ignore[arg-type]  # a file object works too
            dynamo=False,
            opset_version=OPSET,
            input_names=names,
            output_names=out_names,
            dynamic_axes=axes,
        )
    return onnx.load_from_string(f.getvalue())


def splice(model: onnx.ModelProto, layers: list[QuantLayer], fmt: str) -> onnx.ModelProto:
    """Replace each placeholder node of ``model`` by the nodes of its layer in format ``fmt``."""
    graph = model.graph
    out = []
    for node in graph.node:
        if node.domain != _DOMAIN:
            out.append(node)
            continue
        index = next(a.i for a in node.attribute if a.name == "index")
        b = Builder(f"bitc{index}")
        FORMATS[fmt](b).layer(node.input[0], node.output[0], layers[index])
        out.extend(b.nodes)
        graph.initializer.extend(b.initializers)
    del graph.node[:]
    graph.node.extend(out)
    del graph.value_info[:]  # shapes traced at the example's batch; onnxruntime infers its own
    kept = [o for o in model.opset_import if o.domain != _DOMAIN]
    del model.opset_import[:]
    model.opset_import.extend(kept)
    if fmt == "qonnx":
        model.opset_import.append(onnx.helper.make_opsetid(QONNX_DOMAIN, 1))
    return model


def export_onnx(cm: Any, path: str | os.PathLike, format: str = "qdq", batch: int | None = None) -> Path:
    """Write ``cm`` (a :class:`~bitcompiler.CompiledModel`) to ``path`` as ``"qdq"`` or ``"qonnx"``.

    ``batch=None`` keeps the batch dimension dynamic for QDQ where ``cm`` has one, and fixes it at
    1 for QONNX (FINN and the qonnx executor take static shapes); an int fixes it.
    """
    if format not in FORMATS:
        raise UnsupportedExport(f"format={format!r}: ONNX export writes {' or '.join(map(repr, FORMATS))}")
    if not cm.dynamic_batch:
        if batch not in (None, cm._static_batch):
            raise UnsupportedExport(
                f"batch={batch}: this model was compiled with a fixed batch of {cm._static_batch}; "
                f"export it with batch={cm._static_batch} or None"
            )
        batch = cm._static_batch
    dynamic = batch is None and format == "qdq"
    size = 1 if batch is None else int(batch)
    examples = tuple(torch.zeros((size, *s.shape), dtype=getattr(torch, s.dtype)) for s in cm.inputs)
    gm, layers = placeholder_graph(cm.graph)
    try:
        model = _torch_export(gm, examples, dynamic)
    except Exception as e:
        raise ExportError(f"{path}: torch's ONNX exporter failed on the float part ({first_line(e)})") from e
    model = splice(model, layers, format)
    if format == "qdq":
        onnx.checker.check_model(model)
    p = Path(path)
    partial = p.with_name(f".{p.name}.partial")
    try:  # written beside and renamed into place: a failed write leaves nothing half-written
        p.parent.mkdir(parents=True, exist_ok=True)
        onnx.save(model, str(partial))
        os.replace(partial, p)
    except OSError as e:
        with contextlib.suppress(OSError):
            partial.unlink(missing_ok=True)
        raise ExportError(f"{p}: cannot write the ONNX file ({e.strerror or e})") from e
    return p
