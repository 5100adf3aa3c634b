"""The bitc ops' schemas: one attributes dataclass per op, calls built and read by argument name."""

import pytest
import torch
from torch import nn

import bitcompiler as bc
from bitcompiler import ops
from bitcompiler.kernels import ConvSpec, DenseSpec


def _lowered(model: nn.Module, x: torch.Tensor, scheme: str) -> bc.CompiledModel:
    torch.manual_seed(0)
    return bc.compile(model.eval(), (x,), scheme=scheme)


def _calls(cm: bc.CompiledModel) -> list:
    return [n for n in cm.graph.graph.nodes if ops.op_name(n) in ops.ATTRS]


def test_every_layer_op_is_bound_back_to_the_attrs_it_was_built_from():
    model = nn.Sequential(
        nn.Conv2d(3, 32, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1, groups=2),
        nn.ReLU(), nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10),
    )  # fmt: skip
    cm = _lowered(model, torch.randn(1, 3, 8, 8), "tiled:p=4,act=binary,min_weights=800,first_last=quantize")
    calls = _calls(cm)
    assert {ops.op_name(n) for n in calls} == set(ops.ATTRS)
    for node in calls:
        call = ops.bind(node)
        layer = cm.graph.get_submodule(call.tensors[call.attrs.TENSORS[0]].target.rpartition(".")[0])
        assert call.attrs == layer.attrs()
        assert tuple(call.tensors) == type(call.attrs).TENSORS and call.x is node.args[0]
        # built back by name, the call is the node's own
        assert call.attrs.op_args(call.x, call.tensors) == tuple(node.args)
    xb = torch.randn(3, 3, 8, 8)
    assert torch.equal(cm(xb), cm.reference(xb))  # binary activations: bit-exact


def test_the_fake_kernel_the_spec_and_the_attrs_agree_on_the_conv_output_size():
    attrs = ops.BitConv2dAttrs(8, (3, 3), (2, 2), (1, 1), (2, 2), 2, "pm1", "binary", False, False)
    x = torch.randn(1, 8, 11, 9)
    planes = torch.zeros(1, 16, 3, 3, 1, dtype=torch.int32)
    tensors = {"planes": planes, **{t: torch.zeros(16) for t in ("scale", "offset", "bias")}}
    tensors |= {"thr_sign": torch.zeros(16, dtype=torch.int32), "thr": torch.zeros(16, dtype=torch.int32)}
    y = attrs.call(x, tensors)
    spec = ConvSpec.from_attrs(attrs, 16, 11, 9, 1)
    assert y.shape[2:] == attrs.out_hw(11, 9) == (spec.out_h, spec.out_w) == (5, 4)
    with torch._subclasses.FakeTensorMode() as mode:
        fake = attrs.call(mode.from_tensor(x), {k: mode.from_tensor(v) for k, v in tensors.items()})
    assert fake.shape == y.shape


def test_specs_come_from_attrs():
    a = ops.BitLinearAttrs(k=96, code="uint", act="int8", threshold=False, has_offset=True)
    assert DenseSpec.from_attrs(a, 10, 2) == DenseSpec(96, 10, 2, "uint", "int8", True, False)
    assert a.op_kwargs() == {"k": 96, "code": "uint", "act": "int8", "threshold": False, "has_offset": True}


def test_bind_refuses_other_nodes():
    gm = torch.fx.symbolic_trace(nn.ReLU())
    node = next(n for n in gm.graph.nodes if n.op == "call_function")
    assert ops.op_name(node) is None
    with pytest.raises(ValueError, match="is not a call of a bitc layer op"):
        ops.bind(node)
