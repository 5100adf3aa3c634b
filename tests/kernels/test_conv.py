"""Conv kernels against numerics.bit_conv2d, one compiled kernel run at batch 1 and 5."""

import numpy as np
import pytest
import torch

from bitcompiler.kernels import ConvSpec, conv2d_kernel
from bitcompiler.quant import numerics as nu
from tests.kernels._util import act_inputs, assert_close, build, epilogue_params, random_codes

GEOMETRIES = {
    # C not a multiple of 32, padding
    "pad": {"c": 6, "o": 4, "h": 7, "w": 6, "k": (3, 3), "s": (1, 1), "p": (1, 1), "d": (1, 1), "g": 1},
    # stride 2, dilation, groups=2 with 20 channels per group, asymmetric kernel/padding
    "stride_dil_groups": {
        "c": 40,
        "o": 4,
        "h": 6,
        "w": 7,
        "k": (3, 2),
        "s": (2, 1),
        "p": (1, 0),
        "d": (1, 2),
        "g": 2,
    },
    # depthwise (cg = 1)
    "depthwise": {"c": 8, "o": 8, "h": 5, "w": 5, "k": (3, 3), "s": (1, 1), "p": (1, 1), "d": (1, 1), "g": 8},
    # several words per tap (70 channels = 3 words), stride 2 in both axes, no padding
    "wide": {"c": 70, "o": 3, "h": 5, "w": 5, "k": (2, 2), "s": (2, 2), "p": (0, 0), "d": (1, 1), "g": 1},
}
WEIGHTS = [("pm1", 1, False), ("uint", 2, True)]
MODES = [
    (act, w, thr)
    for act in ("binary", "int8", "float")
    for w in WEIGHTS
    for thr in (False, True)
    if not (thr and act == "float")
]


@pytest.mark.parametrize("geom", sorted(GEOMETRIES))
@pytest.mark.parametrize("act, weights, threshold", MODES)
def test_conv_matches_reference(geom, act, weights, threshold):
    cs = GEOMETRIES[geom]
    code, bits, has_offset = weights
    g = torch.Generator().manual_seed(len(geom))
    spec = ConvSpec(
        cs["c"],
        cs["o"],
        cs["h"],
        cs["w"],
        cs["k"],
        cs["s"],
        cs["p"],
        cs["d"],
        cs["g"],
        bits,
        code,
        act,
        has_offset,
        threshold,
    )
    run = build(conv2d_kernel(spec))
    codes = random_codes((cs["o"], spec.cg) + cs["k"], bits, code, g)
    planes = nu.conv_codes_to_planes(codes, bits, code)
    assert tuple(planes.shape) == (bits, cs["o"], *cs["k"], spec.words_per_group)
    ep, kw = epilogue_params(cs["o"], threshold, g, has_offset, spec.reduction)
    if threshold:
        kw.update(scale=torch.ones(cs["o"]), offset=torch.zeros(cs["o"]), bias=torch.zeros(cs["o"]))
    conv = {"stride": cs["s"], "padding": cs["p"], "dilation": cs["d"], "groups": cs["g"]}
    for m in (1, 5):
        x = torch.randn(m, cs["c"], cs["h"], cs["w"], generator=g)
        out = (m, cs["o"], spec.out_h, spec.out_w)
        (y,) = run(act_inputs(x, act, cs["g"]) + [planes] + ep, [(out, "float32")])
        ref = nu.bit_conv2d(x, planes, cs["c"], cs["k"], code, act, **conv, **kw)
        if threshold:
            assert np.array_equal(y, ref.numpy())
        else:
            assert_close(y, ref)
