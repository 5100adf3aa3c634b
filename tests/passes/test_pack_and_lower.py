import torch
from torch import nn

from bitcompiler.passes import fold_scales, insert_quantizers, lower_bit_ops, pack_weights
from bitcompiler.quant import numerics
from tests.passes.conftest import ctx, structure, trace


def folded(model, scheme, x):
    return fold_scales.run(insert_quantizers.run(trace(model), ctx(scheme, x)))


def model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 40, 3, stride=2, groups=2),
        nn.Flatten(),
        nn.Linear(40 * 16, 70),
        nn.ReLU(),
        nn.Linear(70, 3),
    )


def test_pack_weights_writes_planes_in_the_kernel_layout():
    x = torch.randn(2, 3, 10, 10)
    gm = folded(model(), "uniform:bits=2", x)
    codes = {n: gm.get_submodule(n).codes.clone() for n in ("2", "4")}
    want = gm(x)
    gm = pack_weights.run(gm)
    conv, lin = gm.get_submodule("2"), gm.get_submodule("4")
    assert conv.packed and conv.codes is None and conv.planes.shape == (2, 40, 3, 3, 1)
    assert lin.planes.shape == (2, 70, 20) and lin.planes.dtype == torch.int32
    assert torch.equal(numerics.conv_planes_to_codes(conv.planes, 4, "uint"), codes["2"].long())
    assert torch.equal(numerics.planes_to_code(lin.planes, 640, "uint"), codes["4"].long())
    assert torch.equal(gm(x), want)  # packing changes no number


def test_lower_bit_ops_calls_custom_ops_with_same_numbers():
    x = torch.randn(2, 3, 10, 10)
    gm = pack_weights.run(folded(model(), "binary:act=binary", x))
    want = gm(x)
    gm = lower_bit_ops.run(gm)
    calls = [k for op, k in structure(gm) if op == "call_function"]
    assert calls.count("bit_conv2d.default") == 2 and calls.count("bit_linear.default") == 2
    assert not any(op == "call_module" and k.startswith("Bit") for op, k in structure(gm))
    assert torch.equal(gm(x), want)
    exported = torch.export.export(gm, (x,))
    assert any("bitc.bit_linear" in str(n.target) for n in exported.graph.nodes)
