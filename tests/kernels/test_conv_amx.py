"""The W1A1 conv on AMX tiles (``conv_amx``): bit-exact against the numerics for every epilogue
(threshold, affine, the next layer's packed input, residual plus clip, its signs) on maps whose
rows fill a tile, part of one, an odd number of pixel tiles, several words per tap, dilation, no
padding, a height stride and batch > 1, with the tasks on TVM's pool; the shapes it does not fit
and targets without AMX keep the vector-popcount kernel; compiled models pick it and match their
reference."""

import numpy as np
import pytest
import torch

import bitcompiler as bc
from bitcompiler import amx
from bitcompiler.kernels import ConvSpec, amx_tiles, conv2d_kernel, conv_amx
from bitcompiler.quant import numerics as nu
from bitcompiler.target import Target, backend_for
from tests.kernels._util import act_inputs, assert_close, build, epilogue_params, random_codes

CPU = backend_for(Target("cpu")).tvm_target(Target("cpu"))
needs_amx = pytest.mark.skipif(not amx_tiles.amx_target(CPU), reason="the host has no AMX tiles it may use")

CASES = [
    # c, o, h, w, kernel, stride (h, w), padding, dilation
    (64, 64, 32, 32, 3, (1, 1), 1, 1),  # ResNet-18's first stage: two 16-pixel tiles a row
    (128, 64, 13, 13, 3, (1, 1), 1, 1),  # 13-pixel tiles, 13 of them (the last pair is one)
    (192, 64, 12, 11, 3, (1, 1), 1, 1),  # three words a tap, 11-pixel tiles
    (64, 64, 16, 16, 3, (1, 1), 0, 1),  # no padding: 14-pixel rows
    (64, 96, 16, 16, 3, (1, 1), 2, 2),  # dilation 2, three channel pairs
    (64, 64, 24, 14, 3, (2, 1), 1, 1),  # stride 2 down the height only
    (64, 64, 12, 12, 1, (1, 1), 0, 1),  # 1x1
    (64, 64, 28, 28, 3, (1, 1), 1, 1),  # rows in two 14-pixel tiles
    (128, 128, 8, 8, 3, (1, 1), 1, 1),  # im2col form: four 16-pixel tiles of the flat map
    (64, 128, 16, 16, 3, (2, 2), 1, 1),  # im2col form, stride 2 both ways
    (128, 128, 7, 7, 3, (1, 1), 1, 1),  # im2col form, 49 pixels: a last tile of one
]


def _spec(case, threshold):
    c, o, h, w, k, s, p, d = case
    return ConvSpec(c, o, h, w, (k, k), s, (p, p), (d, d), 1, 1, "pm1", "binary", False, threshold)


def _reference(spec, x, planes, kw):
    return nu.bit_conv2d(
        x, planes, spec.in_channels, spec.kernel, "pm1", "binary",
        stride=spec.stride, padding=spec.padding, dilation=spec.dilation, groups=1, **kw,
    )  # fmt: skip


def _build(func):
    """:func:`build` for the backend's AMX target; ``run(inputs, shapes, calls)`` repeats the call
    on the pool (a task reading another's buffer would differ) and returns the first outputs."""
    once = build(func, CPU)

    def run(inputs, shapes, calls=1):
        first = once(inputs, shapes)
        for _ in range(calls - 1):
            assert all(np.array_equal(a, b) for a, b in zip(first, once(inputs, shapes)))
        return first

    return run


KINDS = ["threshold", "affine", "packed", "residual", "signs"]


@needs_amx
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", CASES)
def test_amx_conv_is_exact(case, kind):
    spec = _spec(case, kind in ("threshold", "packed"))
    assert conv_amx.fits(spec)
    o, oh, ow = spec.out_channels, spec.out_h, spec.out_w
    g = torch.Generator().manual_seed(sum(case[:4]) + len(kind))
    planes = nu.conv_codes_to_planes(random_codes((o, spec.cg, *spec.kernel), 1, "pm1", g), 1, "pm1")
    ep, kw = epilogue_params(o, spec.threshold, g, False, spec.reduction // 4)
    if spec.threshold:
        kw.update(scale=torch.ones(o), offset=torch.zeros(o), bias=torch.zeros(o))
    packed, clip = kind in ("packed", "signs"), (-1.0, 1.0) if kind in ("residual", "signs") else None
    run = _build(conv_amx.amx_conv_func(spec, packed=packed, clip=clip))
    for m in (1, 3):
        x = torch.randn(m, spec.in_channels, spec.in_h, spec.in_w, generator=g)
        x[0, :, 0, 0] = 0.0  # sign(0) = +1
        inputs = act_inputs(x, "binary", 1) + [planes] + ep
        ref = _reference(spec, x, planes, kw)
        if clip:
            res = torch.randn(m, o, oh, ow, generator=g)
            inputs.append(res)
            ref = torch.nn.functional.hardtanh(ref + res, *clip)
        float_out = ((m, o, oh, ow), "float32")
        packed_out = ((m, oh, ow, 1, o // 32), "int32")
        shapes = {"packed": [packed_out], "signs": [float_out, packed_out]}.get(kind, [float_out])
        outs = run(inputs, shapes, calls=5)
        if kind == "packed":
            assert np.array_equal(outs[0], act_inputs(ref, "binary", 1)[0].numpy())
        elif kind == "threshold":
            assert np.array_equal(outs[0], ref.numpy())
        else:
            assert_close(outs[0], ref)
        if kind == "signs":  # the next layer's input: the signs of the output it wrote
            assert np.array_equal(outs[1], act_inputs(torch.from_numpy(outs[0]), "binary", 1)[0].numpy())


@needs_amx
def test_accumulators_are_exact_integers():
    """Unit scale, zero bias: the float output is the integer dot product, bit for bit (a padding
    tap adds nothing, with no border correction)."""
    spec = _spec(CASES[1], False)
    g = torch.Generator().manual_seed(3)
    o = spec.out_channels
    planes = nu.conv_codes_to_planes(random_codes((o, spec.cg, 3, 3), 1, "pm1", g), 1, "pm1")
    ep = [torch.ones(o), torch.zeros(o), torch.zeros(o)]
    x = torch.randn(2, spec.in_channels, spec.in_h, spec.in_w, generator=g)
    (y,) = _build(conv_amx.amx_conv_func(spec))(
        act_inputs(x, "binary", 1) + [planes] + ep, [((2, o, spec.out_h, spec.out_w), "float32")]
    )
    ref = _reference(spec, x, planes, {"scale": ep[0], "offset": ep[1], "bias": ep[2]})
    assert np.array_equal(y, ref.numpy()) and np.all(y == np.round(y))


def test_each_case_takes_the_form_its_comment_says():
    forms = [("rows" if conv_amx.by_rows(_spec(c, False)) else "im2col") for c in CASES]
    assert forms == ["rows"] * 8 + ["im2col"] * 3
    assert conv_amx.row_tile(28) == 14 and conv_amx.row_tile(13) == 13 and conv_amx.row_tile(17) == 1


@pytest.mark.parametrize(
    ("case", "why"),
    [
        ((96, 64, 16, 16, 3, (1, 1), 1, 1), "96 input channels: a word with padding bits"),
        ((64, 48, 16, 16, 3, (1, 1), 1, 1), "48 output channels: not pairs of 16-channel tiles"),
        ((64, 64, 8, 8, 3, (1, 1), 1, 1), "64 output pixels, 64 channels: the expansions do not pay"),
        ((64, 64, 32, 32, 3, (2, 2), 1, 1), "stride 2 along the width, 64 channels"),
        ((64, 64, 17, 17, 3, (1, 1), 1, 1), "17-pixel rows: no tile of 8 to 16 pixels, 64 channels"),
        ((512, 512, 4, 4, 3, (1, 1), 1, 1), "16 output pixels: each expanded weight serves one tile"),
        ((128, 256, 16, 16, 1, (2, 2), 0, 1), "a 1x1 stride-2 shortcut: 2 words of reduction"),
    ],
)
def test_shapes_it_does_not_fit(case, why):
    spec = _spec(case, False)
    assert not conv_amx.fits(spec), why
    with pytest.raises(ValueError, match="does not fit"):
        conv_amx.amx_conv_func(spec)


def _uses_tiles(func) -> bool:
    return "tdpbssd" in func.script()


def test_chosen_only_for_amx_targets():
    spec = _spec(CASES[0], True)
    for target in ({"kind": "llvm", "mcpu": "icelake-server"}, {"kind": "llvm", "mcpu": "znver4"}, "llvm"):
        assert not _uses_tiles(conv2d_kernel(spec, target=target)), target
    sapphire = {"kind": "llvm", "mcpu": "sapphirerapids"}
    assert _uses_tiles(conv2d_kernel(spec, target=sapphire)) == amx.enable()


@needs_amx
def test_compiled_resnet_matches_its_reference():
    """Binary ResNet-18 (CIFAR) compiled for this host, whose first two stages' 3x3 convs (both
    fused epilogues: the next layer's packed input, residual plus its signs) the backend's target
    puts on the tiles: its outputs equal the reference's."""
    from bench import zoo

    target = str(CPU)
    stage1 = _spec((64, 64, 32, 32, 3, (1, 1), 1, 1), True)
    stage2 = _spec((128, 128, 16, 16, 3, (1, 1), 1, 1), False)
    assert _uses_tiles(conv2d_kernel(stage1, target, packed_output=True))
    assert _uses_tiles(conv2d_kernel(stage2, target, packed_output=True, residual_clip=(-1.0, 1.0)))
    torch.manual_seed(0)
    model = zoo.randomized(zoo.ResNet18()).eval()
    cm = bc.compile(model, (torch.randn(1, 3, 32, 32),), scheme="binary:act=binary")
    x = torch.randn(3, 3, 32, 32)
    assert torch.equal(cm(x), cm.reference(x))


@needs_amx
@pytest.mark.parametrize("kind", ["affine", "signs"])
def test_task_counts_agree(kind):
    """Split into 1, 2 or 3 tasks (chunks of channel pairs for a float output, of all batch rows'
    pixel pairs for a packed one, the last chunk short), batch 3: the same bits."""
    spec = _spec((64, 96, 16, 16, 3, (1, 1), 1, 1), False)
    g = torch.Generator().manual_seed(11)
    o = spec.out_channels
    planes = nu.conv_codes_to_planes(random_codes((o, spec.cg, 3, 3), 1, "pm1", g), 1, "pm1")
    ep, _ = epilogue_params(o, False, g, False, spec.reduction // 4)
    x = torch.randn(3, spec.in_channels, 16, 16, generator=g)
    inputs = act_inputs(x, "binary", 1) + [planes] + ep + [torch.randn(3, o, 16, 16, generator=g)]
    shapes = [((3, o, 16, 16), "float32")] + ([((3, 16, 16, 1, o // 32), "int32")] if kind == "signs" else [])
    clip = (-1.0, 1.0)
    outs = [
        _build(conv_amx.amx_conv_func(spec, packed=kind == "signs", clip=clip, cores=n))(
            inputs, shapes, calls=3
        )
        for n in (1, 2, 3)
    ]
    for other in outs[1:]:
        assert all(np.array_equal(a, b) for a, b in zip(outs[0], other))
