"""1-bit pm1 conv weights stored as sign bytes (8 output channels a byte) for the float conv core:
the same numbers as the reference, and the rule that picks them depends on no image size."""

import pytest
import torch
import tvm

from bitcompiler.kernels import ConvSpec, conv_float, stored_codes_conv_kernel, stored_weights
from bitcompiler.quant import numerics as nu
from tests.kernels._util import act_inputs, assert_close, epilogue_params, host_target, random_codes

# (C, O, H, W, kernel, stride, padding): 16 lanes (O % 16 == 0, width % 4 == 0), 8 lanes, 24 outputs
GEOMETRIES = [
    (16, 32, 8, 8, (3, 3), (1, 1), (1, 1)),
    (8, 8, 7, 5, (3, 3), (2, 2), (1, 1)),
    (20, 24, 6, 6, (3, 3), (1, 1), (0, 0)),
]


@pytest.mark.parametrize("geom", GEOMETRIES, ids=lambda g: f"c{g[0]}o{g[1]}")
@pytest.mark.parametrize("act", ["float", "int8"])
def test_sign_bytes_match_reference(geom, act):
    c, o, h, w, k, s, p = geom
    spec = ConvSpec(c, o, h, w, k, s, p, (1, 1), 1, 1, "pm1", act, False, False)
    assert conv_float.stores_signs(spec)
    relayout, n_bytes, suffix = stored_weights(spec)
    assert suffix == "_signs"
    assert n_bytes == -(-o // 8) * c * k[0] * k[1]
    lib = tvm.compile(tvm.IRModule({"main": stored_codes_conv_kernel(spec)}), target=host_target())
    g = torch.Generator().manual_seed(c + o)
    planes = nu.conv_codes_to_planes(random_codes((o, c, *k), 1, "pm1", g), 1, "pm1")
    signs = relayout(spec, planes.numpy())
    assert signs.nbytes == n_bytes
    ep, kw = epilogue_params(o, False, g, False, spec.reduction)
    for m in (1, 3):
        x = torch.randn(m, c, h, w, generator=g)
        args = [*(t.numpy() for t in act_inputs(x, act)), signs, *(t.numpy() for t in ep)]
        y = tvm.runtime.tensor(torch.zeros(m, o, spec.out_h, spec.out_w).numpy())
        lib["main"](*[tvm.runtime.tensor(a) for a in args], y)
        ref = nu.bit_conv2d(x, planes, c, k, "pm1", act, stride=s, padding=p, dilation=(1, 1), groups=1, **kw)
        assert_close(y.numpy(), ref)


def test_padding_and_depthwise_keep_the_planes():
    # 12 outputs would pad to 16 (33%); a depthwise conv runs in width lanes
    assert not conv_float.stores_signs(
        ConvSpec(16, 12, 8, 8, (3, 3), (1, 1), (1, 1), (1, 1), 1, 1, "pm1", "float", False, False)
    )
    assert not conv_float.stores_signs(
        ConvSpec(16, 16, 8, 8, (3, 3), (1, 1), (1, 1), (1, 1), 16, 1, "pm1", "float", False, False)
    )
    # the decision reads no image size
    for hw in (4, 9, 32):
        assert conv_float.stores_signs(
            ConvSpec(16, 16, hw, hw, (3, 3), (1, 1), (1, 1), (1, 1), 1, 1, "pm1", "float", False, False)
        )
