"""ONNX in: :func:`from_onnx` reads an ``.onnx`` file into an ``nn.Module`` (onnx2torch).

Before converting, the file is normalized with onnx's and onnxslim's own tools:

1. the opset is upgraded to :data:`OPSET` (``onnx.version_converter``) when it is older, so that
   files from opset 9 on reach the converters onnx2torch has;
2. onnxslim folds constant subgraphs (weights computed by Constant, ConstantOfShape, reshapes or
   transposes of constants become initializers), removes dead nodes and infers shapes; its
   fusions are off, so the layers a scheme quantizes are those in the file;
3. ``onnx.shape_inference`` fills the shapes onnxslim left out.

Every node is then checked against onnx2torch's converters: an op without one raises
:class:`~bitcompiler.errors.UnsupportedOnnxOp` naming the op type and the node.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import fx, nn

from bitcompiler.errors import ModelError, UnsupportedOnnxOp, first_line
from bitcompiler.onnx.standin import onnx2torch, torchvision_loads

OPSET = 17  # the opset files are upgraded to (LayerNormalization's)
# ops onnx2torch converts through torchvision, which bitcompiler cannot compile either
NEEDS_TORCHVISION = ("NonMaxSuppression", "RoiAlign")


def load(path: str | os.PathLike) -> onnx.ModelProto:
    """The file at ``path`` read as an ONNX model; :class:`ModelError` naming it if it is not one."""
    p = Path(path)
    if not p.is_file():
        raise ModelError(f"{p}: no such ONNX file; give the path of an existing .onnx file")
    try:
        return onnx.load(str(p))
    except Exception as e:
        raise ModelError(f"{p}: not a readable ONNX model ({first_line(e)})") from e


def normalize(
    model: onnx.ModelProto, name: str = "model", input_shapes: list[tuple[int, ...]] | None = None
) -> onnx.ModelProto:
    """Upgrade the opset, fold constants, infer shapes (the steps in the module docstring).

    With ``input_shapes``, a graph that computes shapes from its inputs (``Shape`` nodes) gets
    those input shapes first, so that the computed shapes fold into constants too.
    """
    import onnxslim
    from onnxslim.core.pattern.registry import DEFAULT_FUSION_PATTERNS

    if _opset(model) < OPSET:
        try:
            model = onnx.version_converter.convert_version(model, OPSET)
        except Exception as e:
            raise ModelError(
                f"{name}: cannot upgrade opset {_opset(model)} to {OPSET} ({first_line(e)}); "
                f"re-export the model with opset_version={OPSET}"
            ) from e
    kwargs: dict[str, Any] = {"skip_fusion_patterns": list(DEFAULT_FUSION_PATTERNS)}
    if input_shapes and any(node.op_type == "Shape" for node in model.graph.node):
        inputs = [
            i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}
        ]
        kwargs["input_shapes"] = [f"{n}:{','.join(map(str, s))}" for n, s in zip(inputs, input_shapes)]
    try:
        model = onnxslim.slim(model, **kwargs)
    except Exception as e:
        raise ModelError(f"{name}: folding constants failed ({first_line(e)})") from e
    model = onnx.shape_inference.infer_shapes(model)
    if "input_shapes" in kwargs:
        keep_batch(model, input_shapes[0][0])  # type: ignore[index]
    return model


def keep_batch(model: onnx.ModelProto, batch: int) -> None:
    """Let Reshapes folded at the example's batch copy the batch dimension again.

    A Reshape to a constant shape whose first dimension is ``batch``, of a tensor whose first
    dimension is ``batch`` too, gets 0 there (ONNX: copy the input's dimension), so that the
    model keeps a dynamic batch.
    """
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    dims = {
        v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
        for v in [*graph.value_info, *graph.input]
    }
    for node in graph.node:
        if (
            node.op_type != "Reshape"
            or node.input[1] not in inits
            or (dims.get(node.input[0]) or [None])[0] != batch
        ):
            continue
        shape = onnx.numpy_helper.to_array(inits[node.input[1]]).copy()
        if shape.size and shape[0] == batch:
            shape[0] = 0
            name = f"{node.input[1]}/batch"
            graph.initializer.append(onnx.numpy_helper.from_array(shape, name))
            node.input[1] = name


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


def check_ops(model: onnx.ModelProto, name: str = "model") -> None:
    """Raise :class:`UnsupportedOnnxOp` for the first node onnx2torch cannot convert: an op it
    has no converter for, or one whose converter refuses the node's attributes."""
    o2t = onnx2torch()
    from onnx2torch.onnx_graph import OnnxGraph

    versions = {o.domain: o.version for o in model.opset_import}
    graph = OnnxGraph(model.graph)
    for node in graph.nodes.values():
        label = f"{name}: node {node.name!r}" if node.name else f"{name}: node {node.unique_name!r} (unnamed)"
        if node.operation_type in NEEDS_TORCHVISION and not torchvision_loads():
            raise UnsupportedOnnxOp(
                f"{label} is a {node.operation_type}, which bitcompiler does not compile (onnx2torch "
                "converts it through torchvision); export the model without its detection post-processing"
            )
        try:
            converter = o2t.node_converters.get_converter(
                operation_type=node.operation_type,
                version=versions.get(node.domain, OPSET),
                domain=node.domain,
            )
        except NotImplementedError:
            domain = f" (domain {node.domain!r})" if node.domain else ""
            raise UnsupportedOnnxOp(
                f"{label} is a {node.operation_type}{domain}, an op bitcompiler cannot import; "
                "replace it in the source model or export it with ops from the standard ONNX domain"
            ) from None
        try:
            converter(node, graph)
        except Exception as e:  # converters refuse attributes with their own exception types
            raise UnsupportedOnnxOp(
                f"{label} is a {node.operation_type} that bitcompiler cannot import as written "
                f"({first_line(e)}); change that node in the source model"
            ) from e


def static_reshapes(gm: fx.GraphModule) -> fx.GraphModule:
    """Each onnx2torch Reshape whose target shape is a constant as a reshape to that shape.

    onnx2torch's Reshape reads its shape tensor at run time, which neither torch.fx nor
    torch.export can trace; once constants are folded the shape is known when converting.
    """
    for node in list(gm.graph.nodes):
        module = gm.get_submodule(str(node.target)) if node.op == "call_module" else None
        if type(module).__name__ != "OnnxReshape" or len(node.args) != 2 or node.args[1].op != "get_attr":
            continue
        shape = tuple(int(d) for d in gm.get_buffer(str(node.args[1].target)).tolist())
        node.op, node.target, node.args = "call_function", reshape, (node.args[0], shape)
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm


def reshape(x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """ONNX Reshape to a constant shape (0 copies the input's dimension)."""
    return x.reshape([x.shape[i] if d == 0 else d for i, d in enumerate(shape)])


def from_onnx(
    path: str | os.PathLike | onnx.ModelProto, input_shapes: list[tuple[int, ...]] | None = None
) -> nn.Module:
    """The ONNX model at ``path`` as a ``torch.nn.Module`` (a ``torch.fx.GraphModule``) in eval mode.

    ``input_shapes`` (``compile`` passes its example inputs' shapes) fixes the inputs' shapes
    before folding a graph that computes shapes from its inputs; see :func:`normalize`.

    >>> import bitcompiler as bc
    >>> net = bc.from_onnx("model.onnx")  # doctest: +SKIP
    """
    name = "model" if isinstance(path, onnx.ModelProto) else str(path)
    model = path if isinstance(path, onnx.ModelProto) else load(path)
    model = normalize(model, name, input_shapes)
    check_ops(model, name)
    try:
        module: Any = onnx2torch().convert(model)
    except Exception as e:
        raise ModelError(f"{name}: onnx2torch could not convert the model ({first_line(e)})") from e
    return static_reshapes(module).eval()
