"""canonicalize: one form for the float graph.

Values computed only from parameters and buffers (a masked weight ``w * mask``, weight
normalization, a reparametrization) are constant at inference: they are computed once and
stored as buffers. Functional and ATen linear/conv2d/batch_norm calls on constant weights
(``F.batch_norm`` after a conv2d: timm's ``BatchNormAct2d``)
then become module calls (``nn.Linear``, ``nn.Conv2d``, ``nn.BatchNorm2d``), so every later
pass matches one pattern; dropout, identity and assertions on shapes (``torch._assert(x.ndim == 4)``)
disappear. A functional linear/conv2d whose
weight depends on the input stays float and the report says why (``strict=True``: an error).

A conv2d's string padding (``padding="same"`` at stride 1, ``"valid"``) is written as the
integers it means, so the layer can be quantized (timm's ConvMixer: every depthwise conv).

A 1-d convolution (``nn.Conv1d`` or ``F.conv1d`` on a constant weight, zero padding) becomes a
2-d one over a map of height 1: ``conv2d(x.unsqueeze(2)).squeeze(2)`` with kernel, stride,
padding and dilation ``(1, k)``, the same sums. It is then quantized and compiled as any conv2d
(an MLP-Mixer written with ``Conv1d(kernel_size=1)`` token mixing: its token layers were float,
and TVM's default conv1d took 14.4 + 5.5 ms, profiled, of a 19.7 ms call where PyTorch takes 1.3 ms).
"""

from __future__ import annotations

import operator
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import fx, nn

from bitcompiler.passes.graph_utils import fresh_name, get_attr_value, is_call, module_of, set_module
from bitcompiler.passes.pipeline import PassError, fact_check, graph_pass

aten = torch.ops.aten
_LINEAR = (F.linear, torch._C._nn.linear, aten.linear.default)
_CONV = (F.conv2d, torch.conv2d, aten.conv2d.default)
_CONV1D = (F.conv1d, torch.conv1d, aten.conv1d.default)
_DROPOUT = (F.dropout, torch.dropout, aten.dropout.default)
_BN_EPS_ARG = {aten.batch_norm.default: 7, aten._native_batch_norm_legit_no_training.default: 6}


def _arg(node: fx.Node, i: int, name: str, default: Any) -> Any:
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _linear_module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    w, b = get_attr_value(gm, _arg(node, 1, "weight", None)), get_attr_value(gm, _arg(node, 2, "bias", None))
    if w is None or w.dim() != 2 or (_arg(node, 2, "bias", None) is not None and b is None):
        return None
    m = nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
    m.weight = nn.Parameter(w.detach().clone())
    if b is not None:
        m.bias = nn.Parameter(b.detach().clone())
    return m


def _pair(v: Any) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _explicit_padding(padding: Any, kernel: Any, stride: Any, dilation: Any) -> Any:
    """``padding`` with ``"valid"`` as 0 and ``"same"`` as the symmetric padding it means at stride
    1 (``d * (k - 1) / 2`` per axis); unchanged where it is not a string or cannot be written so
    (an odd total pads one side more)."""
    if padding == "valid":
        return (0, 0)
    if padding != "same" or _pair(stride) != (1, 1):
        return padding
    totals = [d * (k - 1) for k, d in zip(_pair(kernel), _pair(dilation))]
    return padding if any(t % 2 for t in totals) else tuple(t // 2 for t in totals)


def _conv_module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    w, b = get_attr_value(gm, _arg(node, 1, "weight", None)), get_attr_value(gm, _arg(node, 2, "bias", None))
    if w is None or w.dim() != 4 or (_arg(node, 2, "bias", None) is not None and b is None):
        return None
    stride, padding = _arg(node, 3, "stride", 1), _arg(node, 4, "padding", 0)
    dilation, groups = _arg(node, 5, "dilation", 1), _arg(node, 6, "groups", 1)
    padding = _explicit_padding(padding, (w.shape[2], w.shape[3]), stride, dilation)
    return _conv2d(w, b, stride, padding, dilation, groups)


def _conv2d(
    w: torch.Tensor, b: torch.Tensor | None, stride: Any, padding: Any, dilation: Any, groups: int
) -> nn.Conv2d:
    """The ``nn.Conv2d`` holding copies of weight ``w (O, C/groups, KH, KW)`` and bias ``b``."""
    m = nn.Conv2d(
        w.shape[1] * groups,
        w.shape[0],
        (w.shape[2], w.shape[3]),
        stride,
        padding,
        dilation,
        groups,
        bias=b is not None,
    )
    m.weight = nn.Parameter(w.detach().clone())
    if b is not None:
        m.bias = nn.Parameter(b.detach().clone())
    return m


def _one(v: Any) -> int | None:
    """A 1-d conv's stride/padding/dilation argument as one int (an int or a 1-tuple), else None."""
    if isinstance(v, (tuple, list)) and len(v) == 1:
        v = v[0]
    return v if isinstance(v, int) else None


def _conv1d_as_2d(
    w: torch.Tensor, b: torch.Tensor | None, stride: Any, padding: Any, dilation: Any, groups: int
) -> nn.Conv2d | None:
    """The ``nn.Conv2d`` over ``(N, C, 1, L)`` that computes a 1-d conv's sums, or None for
    arguments it cannot take (``padding="same"`` with a stride or an odd total padding)."""
    s, d = _one(stride), _one(dilation)
    if s is None or d is None or w.dim() != 3:
        return None
    if isinstance(padding, str):  # the integers it means, as for a conv2d (None: cannot be)
        padding = _explicit_padding(padding, int(w.shape[2]), s, d)
        padding = None if isinstance(padding, str) else padding[0]
    p = _one(padding)
    if p is None:
        return None
    return _conv2d(w.unsqueeze(2), b, (1, s), (0, p), (1, d), groups)


def _conv1d_module(gm: fx.GraphModule, node: fx.Node) -> nn.Conv2d | None:
    """The 2-d form of a ``Conv1d`` module call or a functional conv1d on constant weights."""
    m = module_of(gm, node)
    if isinstance(m, nn.Conv1d):
        if m.padding_mode != "zeros" or len(node.args) != 1 or node.kwargs:
            return None
        return _conv1d_as_2d(m.weight, m.bias, m.stride, m.padding, m.dilation, m.groups)
    if not is_call(node, *_CONV1D):
        return None
    w, b = get_attr_value(gm, _arg(node, 1, "weight", None)), get_attr_value(gm, _arg(node, 2, "bias", None))
    if w is None or (_arg(node, 2, "bias", None) is not None and b is None):
        return None
    return _conv1d_as_2d(
        w,
        b,
        _arg(node, 3, "stride", 1),
        _arg(node, 4, "padding", 0),
        _arg(node, 5, "dilation", 1),
        int(_arg(node, 6, "groups", 1)),
    )


def _replace_conv1d(gm: fx.GraphModule, node: fx.Node, conv: nn.Conv2d) -> None:
    """``node`` (a 1-d conv) -> ``conv(x.unsqueeze(2)).squeeze(2)``; a module keeps its name."""
    x = _arg(node, 0, "input", None)
    if node.op == "call_module":
        name = str(node.target)
        set_module(gm, name, conv)
    else:
        name = fresh_name(gm, node.name)
        gm.add_submodule(name, conv)
    with gm.graph.inserting_before(node):
        x4 = gm.graph.call_method("unsqueeze", (x, 2))
        y4 = gm.graph.call_module(name, (x4,))
        y = gm.graph.call_method("squeeze", (y4, 2))
    node.replace_all_uses_with(y)
    gm.graph.erase_node(node)


def _functional_bn(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    """``F.batch_norm(x, running_mean, running_var, weight, bias, False, momentum, eps)`` on
    constant statistics after a conv2d (timm's ``BatchNormAct2d`` calls it so): the eval-mode
    ``nn.BatchNorm2d`` it computes, so fold_batchnorm can fold it into the conv."""
    x = _arg(node, 0, "input", None)
    if not isinstance(x, fx.Node) or not isinstance(module_of(gm, x), nn.Conv2d):
        return None  # only a conv's output is surely 4-d
    return functional_eval_bn(gm, node)


def functional_eval_bn(gm: fx.GraphModule, node: fx.Node) -> nn.BatchNorm2d | None:
    """The per-channel affine of an eval-mode ``F.batch_norm`` call on constant statistics, as an
    eval ``nn.BatchNorm2d`` (whatever the input's rank), or None (training mode, or statistics
    computed in the graph)."""
    if _arg(node, 5, "training", False) is not False:
        return None
    mean, var = (
        get_attr_value(gm, _arg(node, i, n, None)) for i, n in ((1, "running_mean"), (2, "running_var"))
    )
    w, b = (get_attr_value(gm, _arg(node, i, n, None)) for i, n in ((3, "weight"), (4, "bias")))
    if mean is None or var is None or (_arg(node, 3, "weight", None) is not None and w is None):
        return None
    if _arg(node, 4, "bias", None) is not None and b is None:
        return None
    return _eval_bn(mean, var, w, b, float(_arg(node, 7, "eps", 1e-5)))


def _eval_bn(
    mean: torch.Tensor, var: torch.Tensor, w: torch.Tensor | None, b: torch.Tensor | None, eps: float
) -> nn.BatchNorm2d:
    """The eval-mode ``nn.BatchNorm2d`` with these statistics and affine (none where ``w`` is None)."""
    m = nn.BatchNorm2d(mean.shape[0], eps=eps, affine=w is not None).eval()
    cast(torch.Tensor, m.running_mean).data = mean.detach().clone()
    cast(torch.Tensor, m.running_var).data = var.detach().clone()
    if w is not None:
        m.weight.data.copy_(w)
        m.bias.data.copy_(b if b is not None else torch.zeros_like(w))
    return m


_SHAPE_ATTRS = ("ndim", "shape")
_COMPARE = (
    operator.eq,
    operator.ne,
    operator.lt,
    operator.le,
    operator.gt,
    operator.ge,
    operator.and_,
    operator.or_,
    operator.not_,
    operator.getitem,
    len,
)


def _about_shapes(value: Any) -> bool:
    """Whether ``value`` is computed from tensors' ranks and shapes alone (``x.ndim == 4``)."""
    if not isinstance(value, fx.Node):
        return True
    if value.op == "call_function" and value.target is getattr:
        return value.args[1] in _SHAPE_ATTRS
    if value.op == "call_method" and value.target in ("dim", "size"):
        return True
    if value.op == "call_function" and value.target in _COMPARE:
        return all(_about_shapes(a) for a in value.args)
    return False


def _shape_assert(node: fx.Node) -> bool:
    """A ``torch._assert`` (or a library's ``_assert``) of a condition on shapes only: the rank
    check of timm's ``BatchNormAct2d``. ``cm(x)`` checks its input's shape itself, and the check
    would be one more reader of the conv's output (no BatchNorm folding)."""
    name = getattr(node.target, "__name__", "")
    return (
        node.op == "call_function" and name == "_assert" and bool(node.args) and _about_shapes(node.args[0])
    )


def _bn_module(gm: fx.GraphModule, node: Any) -> nn.Module | None:
    w, b, mean, var = (get_attr_value(gm, node.args[i]) for i in (1, 2, 3, 4))
    if mean is None or var is None or (node.target is aten.batch_norm.default and node.args[5]):
        return None  # a training-mode batch norm has no fixed affine
    return _eval_bn(mean, var, w, b, float(node.args[_BN_EPS_ARG[node.target]]))


def _to_module(gm: fx.GraphModule, node: fx.Node, module: nn.Module, base: str, x: fx.Node) -> fx.Node:
    name = fresh_name(gm, base)
    gm.add_submodule(name, module)
    with gm.graph.inserting_before(node):
        new = gm.graph.call_module(name, (x,))
    return new


# calls that are not pure functions of their inputs: never evaluated at compile time
_IMPURE = {"dropout", "rand", "randn", "randint", "bernoulli", "normal", "uniform", "rand_like", "randn_like"}


def _is_constant(node: fx.Node, constant: set[fx.Node]) -> bool:
    """Whether ``node`` is computed from parameters and buffers only (at least one of them)."""
    if node.op not in ("call_function", "call_method", "call_module"):
        return False
    name = str(getattr(node.target, "__name__", node.target)).split(".")[-1].rstrip("_")
    if name in _IMPURE or str(node.target).endswith("_"):  # random, or in place
        return False
    inputs = node.all_input_nodes
    return bool(inputs) and all(n in constant for n in inputs)


def fold_constants(gm: fx.GraphModule) -> int:
    """Replace each maximal parameter-only subgraph that feeds the rest of the graph by a buffer
    holding its value; returns how many were folded."""
    constant: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op == "get_attr" or _is_constant(node, constant):
            constant.add(node)
    folded = 0
    for node in list(gm.graph.nodes):
        if node.op == "get_attr" or node not in constant:
            continue
        if all(user in constant for user in node.users):
            continue  # an inner node of a larger constant: folded with it
        env = {n: _value(gm, n) for n in constant if n.op == "get_attr"}
        value = _evaluate(gm, node, env)
        if not isinstance(value, torch.Tensor):
            continue
        name = fresh_name(gm, f"{node.name}_folded")
        gm.register_buffer(name, value.detach().clone())
        with gm.graph.inserting_before(node):
            attr = gm.graph.get_attr(name)
        node.replace_all_uses_with(attr)
        folded += 1
    return folded


def _value(gm: fx.GraphModule, node: fx.Node) -> Any:
    obj: Any = gm
    for part in str(node.target).split("."):
        obj = getattr(obj, part)
    return obj


def _evaluate(gm: fx.GraphModule, node: fx.Node, env: dict[fx.Node, Any]) -> Any:
    """``node``'s value, computing its constant inputs first (memoized in ``env``)."""
    if node in env:
        return env[node]
    for inp in node.all_input_nodes:
        _evaluate(gm, inp, env)
    args = fx.node.map_arg(node.args, lambda n: env[n])
    kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n])
    with torch.no_grad():
        if node.op == "call_function":
            value = node.target(*args, **kwargs)  # type: ignore[operator]
        elif node.op == "call_method":
            value = getattr(args[0], str(node.target))(*args[1:], **kwargs)
        else:
            value = gm.get_submodule(str(node.target))(*args, **kwargs)
    env[node] = value
    return value


def _computed_weight_reason(node: fx.Node) -> str:
    w = _arg(node, 1, "weight", None)
    what = "conv2d" if is_call(node, *_CONV) else "linear"
    src = w.name if isinstance(w, fx.Node) else repr(w)
    return (
        f"functional {what} `{node.name}` stays float: its weight `{src}` depends on the input, "
        "so it is not constant at inference and cannot be quantized"
    )


def run(gm: fx.GraphModule, ctx: Any = None) -> fx.GraphModule:
    fold_constants(gm)
    for node in list(gm.graph.nodes):
        m = module_of(gm, node)
        if isinstance(m, (nn.Dropout, nn.Identity)) or is_call(node, *_DROPOUT):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
        elif _shape_assert(node) and not node.users:
            gm.graph.erase_node(node)
        elif is_call(node, *_LINEAR) and (lin := _linear_module(gm, node)) is not None:
            node.replace_all_uses_with(_to_module(gm, node, lin, "linear", _arg(node, 0, "input", None)))
            gm.graph.erase_node(node)
        elif is_call(node, *_CONV) and (conv := _conv_module(gm, node)) is not None:
            node.replace_all_uses_with(_to_module(gm, node, conv, "conv", _arg(node, 0, "input", None)))
            gm.graph.erase_node(node)
        elif (conv2d := _conv1d_module(gm, node)) is not None:
            _replace_conv1d(gm, node, conv2d)
        elif isinstance(m, nn.Conv2d) and isinstance(m.padding, str) and m.padding_mode == "zeros":
            padding = _explicit_padding(m.padding, m.kernel_size, m.stride, m.dilation)
            if not isinstance(padding, str):  # "same" / "valid" written as the integers they mean
                conv = _conv2d(m.weight, m.bias, _pair(m.stride), padding, _pair(m.dilation), m.groups)
                set_module(gm, str(node.target), conv.train(m.training))
        elif is_call(node, *_LINEAR, *_CONV) and ctx is not None and ctx.scheme.quantizes:
            reason = _computed_weight_reason(node)
            if ctx.strict:
                raise PassError("canonicalize", reason + "; pass strict=False to keep it in float", node.name)
            ctx.notes.append((node.name, f"kept float: {reason}"))
        elif is_call(node, F.batch_norm) and (bn := _functional_bn(gm, node)) is not None:
            node.replace_all_uses_with(_to_module(gm, node, bn, "batchnorm", node.args[0]))
            gm.graph.erase_node(node)
        elif is_call(node, *_BN_EPS_ARG) and (bn := _bn_module(gm, node)) is not None:
            new = _to_module(gm, node, bn, "batchnorm", node.args[0])
            if node.target is aten.batch_norm.default:
                node.replace_all_uses_with(new)
            for user in list(node.users):  # the legit op returns (out, mean, rstd); eval uses only out
                if user.target.__name__ == "getitem" and user.args[1] == 0:
                    user.replace_all_uses_with(new)
                    gm.graph.erase_node(user)
            if not node.users:
                gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


@fact_check("canonical")
def _canonical(gm: fx.GraphModule) -> str | None:
    """No dropout or identity left, and no functional linear/conv2d on a constant weight."""
    for node in gm.graph.nodes:
        if isinstance(module_of(gm, node), (nn.Dropout, nn.Identity)) or is_call(node, *_DROPOUT):
            return f"`{node.name}` (dropout or identity) is left"
        weight = _arg(node, 1, "weight", None) if is_call(node, *_LINEAR, *_CONV) else None
        if isinstance(weight, fx.Node) and weight.op == "get_attr":
            return f"`{node.name}` is a functional linear/conv2d on the constant `{weight.target}`"
    return None


canonicalize = graph_pass("canonicalize", requires={"traced"}, ensures={"canonical"})(run)
