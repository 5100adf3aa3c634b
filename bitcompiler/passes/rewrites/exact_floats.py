"""Part of lower_bit_ops: the float ops between quantized layers in one order every backend repeats.

An int8 quantizer rounds ``x / s``, so a float that feeds one must be the same to the last bit
in the compiled code and in the reference (docs/guide.md, "Exactness"). Two kinds of op are
not, as PyTorch runs them, and are rewritten here:

* average pooling (``AvgPool2d``, ``AdaptiveAvgPool2d`` with whole windows, ``mean`` over H and W)
  sums in an order of PyTorch's choosing: it becomes ``bitc::window_mean`` (serial row-major sum,
  then one division), which the CPU kernel and the Cortex-M C loop compute the same way;
* a BatchNorm that no layer absorbed runs ATen's kernel (its own formula, possibly fused
  multiply-adds): it becomes ``x * a + b``, a multiply then an add with ``a``, ``b`` per channel
  (``BatchNorm2d`` and ``BatchNorm1d`` modules, and eval ``F.batch_norm`` calls on constant
  statistics, as timm's ``BatchNormAct2d`` makes them);
* sigmoid and tanh (squeeze-excitation gates, LSTM attention) are approximated differently by
  PyTorch and by TVM: they become ``bitc::exact_unary``, one formulation of basic float32
  operations (``numerics.sigmoid32``, ``numerics.tanh32``) that the reference and the kernels
  evaluate alike;
* a GELU whose every reader is a layer with binary activations (an MLP block's hidden layer)
  only has its sign read: it becomes ``bitc::exact_unary(x, "gelu_sign")``, two comparisons
  (``numerics.gelu_sign32``) instead of an erf per element.

Ops this pass does not match (other pools, ceil mode, other transcendental functions) keep their
PyTorch form and are outside the contract.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from bitcompiler.passes.graph_utils import REARRANGING_FUNCS, finish, fresh_name, module_of
from bitcompiler.passes.pipeline import PassContext
from bitcompiler.passes.rewrites.canonicalize import functional_eval_bn
from bitcompiler.passes.rewrites.fold_batchnorm import bn_affine
from bitcompiler.passes.rewrites.fold_scales import feeds_only_binary_layers

aten = torch.ops.aten
_AVG = (F.avg_pool2d, aten.avg_pool2d.default)
_ADAPTIVE = (F.adaptive_avg_pool2d, aten.adaptive_avg_pool2d.default)
_MEAN = (torch.mean, aten.mean.dim)
_UNARY: dict[Any, str] = {
    torch.sigmoid: "sigmoid",
    F.sigmoid: "sigmoid",
    aten.sigmoid.default: "sigmoid",
    torch.tanh: "tanh",
    F.tanh: "tanh",
    aten.tanh.default: "tanh",
}
_UNARY_MODULES: dict[type, str] = {nn.Sigmoid: "sigmoid", nn.Tanh: "tanh"}
_GELU = (F.gelu, torch._C._nn.gelu, aten.gelu.default)


def _unary(node: fx.Node, m: nn.Module | None) -> str | None:
    """``"sigmoid"`` / ``"tanh"`` for an out-of-place call of either (module, function or method)."""
    if m is not None:
        return _UNARY_MODULES.get(type(m))
    if node.op == "call_method":
        return str(node.target) if node.target in ("sigmoid", "tanh") else None
    return _UNARY.get(node.target) if node.op == "call_function" else None


def _exact_gelu(node: fx.Node, m: nn.Module | None) -> bool:
    """An out-of-place exact (erf) GELU, module or function."""
    if isinstance(m, nn.GELU):
        return m.approximate == "none"
    if node.op != "call_function" or node.target not in _GELU or len(node.args) != 1:
        return False
    return set(node.kwargs) <= {"approximate"} and node.kwargs.get("approximate", "none") == "none"


def _pair(v: object) -> tuple[int, int] | None:
    if isinstance(v, int):
        return v, v
    if isinstance(v, (tuple, list)) and len(v) == 2 and all(isinstance(i, int) for i in v):
        return int(v[0]), int(v[1])
    return None


def _window(node: fx.Node, m: nn.Module | None, hw: tuple[int, int]) -> tuple | None:
    """``(kernel, stride, padding, count_include_pad, keepdim)`` of an average pool / mean, else None."""
    h, w = hw
    if isinstance(m, nn.AvgPool2d) or (node.op == "call_function" and node.target in _AVG):
        opts: dict[str, Any]
        if isinstance(m, nn.AvgPool2d):
            opts = {
                "kernel_size": m.kernel_size,
                "stride": m.stride,
                "padding": m.padding,
                "ceil_mode": m.ceil_mode,
                "count_include_pad": m.count_include_pad,
                "divisor_override": m.divisor_override,
            }
        else:
            names = ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override")
            opts = {"stride": None, "padding": 0, "ceil_mode": False, "count_include_pad": True}
            opts.update(zip(names, node.args[1:], strict=False))
            opts.update(node.kwargs)
        k = _pair(opts["kernel_size"])
        s = _pair(opts["stride"]) if opts.get("stride") not in (None, [], ()) else k
        p = _pair(opts.get("padding", 0))
        if k is None or s is None or p is None or opts.get("ceil_mode") or opts.get("divisor_override"):
            return None
        return k, s, p, bool(opts.get("count_include_pad", True)), True
    if isinstance(m, nn.AdaptiveAvgPool2d) or (node.op == "call_function" and node.target in _ADAPTIVE):
        size = m.output_size if isinstance(m, nn.AdaptiveAvgPool2d) else node.args[1]
        o = _pair(size)
        if o is None or h % o[0] or w % o[1]:
            return None
        k = (h // o[0], w // o[1])
        return k, k, (0, 0), True, True
    if (node.op == "call_method" and node.target == "mean") or (
        node.op == "call_function" and node.target in _MEAN
    ):
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        keep = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
        if node.kwargs.get("dtype") is not None or not isinstance(dims, (tuple, list)):
            return None
        if sorted(d % 4 for d in dims) != [2, 3]:
            return None
        return (h, w), (1, 1), (0, 0), True, bool(keep)
    return None


def run(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    """Average pools -> ``bitc::window_mean``, leftover BatchNorm -> multiply then add, sigmoid and
    tanh -> ``bitc::exact_unary``, a GELU only binary layers read -> its sign rule."""
    if ctx.example_inputs:
        _propagate_shapes(gm, ctx.example_inputs)
    for node in list(gm.graph.nodes):
        m = module_of(gm, node)
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) and m.running_mean is not None and not m.training:
            _affine(gm, node, m)
            continue
        if node.op == "call_function" and node.target is F.batch_norm:
            # timm's BatchNormAct2d on a map no conv made (RepVGG's identity branch)
            if (bn := functional_eval_bn(gm, node)) is not None:
                _affine(gm, node, bn)
            continue
        if node.op not in ("call_module", "call_function", "call_method") or not node.args:
            continue
        x = node.args[0]
        meta: Any = x.meta.get("tensor_meta") if isinstance(x, fx.Node) else None
        # a tuple-valued input (split's outputs) has a list of metas: not a pooled tensor
        if getattr(meta, "dtype", None) != torch.float32:
            continue
        fn = _unary(node, m)
        if fn is None and _exact_gelu(node, m) and feeds_only_binary_layers(gm, node, REARRANGING_FUNCS):
            fn = "gelu_sign"
            node.kwargs = {}
        if fn is not None and len(node.args) == 1 and not node.kwargs:
            with gm.graph.inserting_before(node):
                y = gm.graph.call_function(torch.ops.bitc.exact_unary.default, (x, fn))
            y.meta = dict(node.meta)
            node.replace_all_uses_with(y)
            gm.graph.erase_node(node)
            continue
        if getattr(meta, "shape", None) is None or len(meta.shape) != 4:
            continue
        found = _window(node, m, (int(meta.shape[2]), int(meta.shape[3])))
        if found is None:
            continue
        k, s, p, include_pad, keep = found
        with gm.graph.inserting_before(node):
            y = gm.graph.call_function(
                torch.ops.bitc.window_mean.default, (x, list(k), list(s), list(p), include_pad)
            )
            if not keep:
                y = gm.graph.call_function(torch.flatten, (y, 2))
                y = gm.graph.call_function(torch.flatten, (y, 1))
        node.replace_all_uses_with(y)
        gm.graph.erase_node(node)
    return finish(gm)


def _propagate_shapes(gm: fx.GraphModule, inputs: tuple) -> None:
    """``tensor_meta`` on every node, from fake tensors (shapes only: running the bit layers' reference
    numerics took a fifth of a ResNet-18 compile's CPU time), or by running the graph where an op
    has no fake implementation."""
    with torch.no_grad():  # shapes only: an in-place op on a custom op's output needs no autograd
        try:
            _FakeShapes(gm).propagate(*inputs)
        except Exception:  # noqa: BLE001 - an op fake tensors cannot run: the real run gives the shapes
            ShapeProp(gm).propagate(*inputs)


class _FakeShapes(ShapeProp):
    """ShapeProp on fake tensors. A bit layer's op attributes are read from its real buffers first
    (``has_offset`` looks at the offsets' values, which fake tensors do not have); its call is then
    ``attrs.call(x, tensors)``, as its ``forward`` is, on fake tensors."""

    def __init__(self, gm: fx.GraphModule) -> None:
        from torch._subclasses.fake_tensor import FakeTensorMode

        layers: dict[Any, Any] = {
            n.target: gm.get_submodule(str(n.target)) for n in gm.graph.nodes if n.op == "call_module"
        }
        self._attrs = {t: m.attrs() for t, m in layers.items() if hasattr(m, "op_tensors")}
        super().__init__(gm, fake_mode=FakeTensorMode(allow_non_fake_inputs=True))

    def call_module(self, target: Any, args: Any, kwargs: Any) -> Any:
        attrs = self._attrs.get(target)
        if attrs is None:
            return super().call_module(target, args, kwargs)
        layer: Any = self.module.get_submodule(target)
        return attrs.call(args[0], layer.op_tensors())


def _affine(gm: fx.GraphModule, node: fx.Node, bn: nn.BatchNorm1d | nn.BatchNorm2d) -> None:
    """``bn(x)`` -> ``x * a + b``, ``a`` and ``b`` shaped to broadcast over ``x``'s channel axis
    (1: ``(C, 1, 1)`` on a map, ``(C, 1)`` on ``(N, C, L)`` and ``(C,)`` on ``(N, C)``: LeViT's
    BatchNorm1d over flattened tokens); left as is where the rank is not known (a BatchNorm2d
    module's input is a map)."""
    meta: Any = node.args[0].meta.get("tensor_meta") if isinstance(node.args[0], fx.Node) else None
    shape = getattr(meta, "shape", None)
    if shape is not None:
        rank = len(shape)
    elif isinstance(bn, nn.BatchNorm2d) and node.op == "call_module":
        rank = 4
    else:
        return
    if rank not in (2, 3, 4):
        return
    scale, shift = bn_affine(bn)
    names = []
    for t in (scale, shift):
        name = fresh_name(gm, f"{node.name}_affine")
        gm.register_buffer(name, t.detach().float().reshape(-1, *[1] * (rank - 2)).clone())
        names.append(name)
    with gm.graph.inserting_before(node):
        a, b = (gm.graph.get_attr(n) for n in names)
        y = gm.graph.call_function(torch.mul, (node.args[0], a))
        y = gm.graph.call_function(torch.add, (y, b))
    node.replace_all_uses_with(y)
    gm.graph.erase_node(node)
