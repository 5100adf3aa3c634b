"""The flat-im2col W1A1 conv with AVX-512 vector popcounts (``conv_vpop``): bit-exact against the
numerics on borders (every padding class), stride 2, dilation 2, no padding, batch > 1, a map whose
pixel count is not a multiple of the vector, all four epilogues; shapes it does not fit fall back to
the register-blocked kernel, and CPUs without ``avx512vpopcntdq`` never get it."""

import dataclasses
import re

import numpy as np
import pytest
import torch
import tvm
import tvm_ffi

from bitcompiler.kernels import ConvSpec, conv2d_kernel, conv_vpop
from bitcompiler.kernels.dense_avx2 import popcnt512_target
from bitcompiler.quant import numerics as nu
from tests.kernels._util import (
    act_inputs,
    assert_close,
    build,
    epilogue_params,
    every_choice,
    host_target,
    random_codes,
    template_choices,
    with_choices,
)

needs_vpopcnt = pytest.mark.skipif(
    not popcnt512_target(host_target()), reason="the host CPU has no avx512vpopcntdq"
)
ICELAKE = {"kind": "llvm", "mcpu": "icelake-server"}

CASES = [
    # c, o, h, w, kernel, stride, padding, dilation
    (64, 16, 7, 7, 3, 1, 1, 1),  # 49 pixels: the last vector overlaps the one before
    (256, 32, 14, 14, 3, 1, 1, 1),  # the benchmark's map: 9 border classes
    (64, 24, 8, 6, 3, 2, 1, 1),  # stride 2, 3 blocks of 8 channels
    (128, 8, 9, 9, 3, 1, 0, 1),  # no padding: one class, no correction
    (64, 16, 10, 10, 3, 1, 2, 2),  # dilation 2, padding 2
    (64, 8, 4, 5, 1, 1, 0, 1),  # 1x1 kernel, 20 pixels
    (64, 16, 6, 6, 3, 2, 2, 1),  # padding wider than the stride: taps outside on both sides
]


def _spec(case, threshold):
    c, o, h, w, k, s, p, d = case
    return ConvSpec(c, o, h, w, (k, k), (s, s), (p, p), (d, d), 1, 1, "pm1", "binary", False, threshold)


def _reference(spec, x, planes, kw):
    return nu.bit_conv2d(
        x, planes, spec.in_channels, spec.kernel, "pm1", "binary",
        stride=spec.stride, padding=spec.padding, dilation=spec.dilation, groups=1, **kw,
    )  # fmt: skip


def _planes(spec, g):
    k = spec.kernel
    return nu.conv_codes_to_planes(random_codes((spec.out_channels, spec.cg, *k), 1, "pm1", g), 1, "pm1")


@needs_vpopcnt
@pytest.mark.parametrize("threshold", [False, True])
@pytest.mark.parametrize("case", CASES)
def test_vpop_conv_is_exact(case, threshold):
    spec = _spec(case, threshold)
    assert conv_vpop.fits(spec)
    g = torch.Generator().manual_seed(sum(case))
    run = build(conv_vpop.vpop_conv_func(spec))
    planes = _planes(spec, g)
    ep, kw = epilogue_params(spec.out_channels, threshold, g, False, spec.reduction // 4)
    if threshold:
        kw.update(
            scale=torch.ones(spec.out_channels),
            offset=torch.zeros(spec.out_channels),
            bias=torch.zeros(spec.out_channels),
        )
    for m in (1, 3):
        x = torch.randn(m, spec.in_channels, spec.in_h, spec.in_w, generator=g)
        x[0, :, 0, 0] = 0.0  # sign(0) = +1
        shape = (m, spec.out_channels, spec.out_h, spec.out_w)
        (y,) = run(act_inputs(x, "binary", 1) + [planes] + ep, [(shape, "float32")])
        ref = _reference(spec, x, planes, kw)
        if threshold:
            assert np.array_equal(y, ref.numpy())
        else:
            assert_close(y, ref)


@needs_vpopcnt
def test_vpop_conv_accumulators_are_exact_integers():
    """Unit scale, zero bias: the float output is the integer accumulator itself, bit for bit."""
    spec = _spec((256, 32, 14, 14, 3, 1, 1, 1), False)
    g = torch.Generator().manual_seed(3)
    planes = _planes(spec, g)
    o = spec.out_channels
    ep = [torch.ones(o), torch.zeros(o), torch.zeros(o)]
    x = torch.randn(2, spec.in_channels, 14, 14, generator=g)
    (y,) = build(conv_vpop.vpop_conv_func(spec))(
        act_inputs(x, "binary", 1) + [planes] + ep, [((2, o, 14, 14), "float32")]
    )
    ref = _reference(spec, x, planes, {"scale": ep[0], "offset": ep[1], "bias": ep[2]})
    assert np.array_equal(y, ref.numpy()) and np.all(y == np.round(y))


@needs_vpopcnt
@pytest.mark.parametrize("case", [(64, 32, 9, 9, 3, 1, 1, 1), (256, 64, 8, 8, 3, 2, 1, 1)])
def test_vpop_packed_output(case):
    spec = _spec(case, True)
    o = spec.out_channels
    g = torch.Generator().manual_seed(sum(case))
    planes = _planes(spec, g)
    ts = torch.randint(-1, 2, (o,), generator=g).to(torch.int32)
    th = torch.randint(-20, 21, (o,), generator=g).to(torch.int32)
    run = build(conv_vpop.vpop_conv_func(spec, packed=True))
    for m in (1, 2):
        x = torch.randn(m, spec.in_channels, spec.in_h, spec.in_w, generator=g)
        (y,) = run(
            act_inputs(x, "binary", 1) + [planes, ts, th],
            [((m, spec.out_h, spec.out_w, 1, o // 32), "int32")],
        )
        kw = {
            "scale": torch.ones(o),
            "offset": torch.zeros(o),
            "bias": torch.zeros(o),
            "thr_sign": ts,
            "thr": th,
        }
        assert np.array_equal(y, act_inputs(_reference(spec, x, planes, kw), "binary", 1)[0].numpy())


@needs_vpopcnt
def test_vpop_residual_epilogue():
    spec = _spec((64, 16, 9, 9, 3, 1, 1, 1), False)
    g = torch.Generator().manual_seed(5)
    planes = _planes(spec, g)
    ep, kw = epilogue_params(16, False, g, False, spec.reduction // 4)
    run = build(conv_vpop.vpop_conv_func(spec, clip=(-1.0, 1.0)))
    x = torch.randn(2, 64, 9, 9, generator=g)
    res = torch.randn(2, 16, 9, 9, generator=g)
    (y,) = run(act_inputs(x, "binary", 1) + [planes] + ep + [res], [((2, 16, 9, 9), "float32")])
    assert_close(y, torch.nn.functional.hardtanh(_reference(spec, x, planes, kw) + res, -1.0, 1.0))


@pytest.mark.parametrize(
    "case, why",
    [
        ((96, 8, 8, 8, 3, 1, 1, 1), "odd 32-bit words per tap"),
        ((64, 12, 8, 8, 3, 1, 1, 1), "output channels not a multiple of 8"),
        ((64, 8, 2, 3, 3, 1, 1, 1), "fewer pixels than a vector"),
        ((64, 8, 12, 12, 5, 1, 2, 1), "25 border classes"),
    ],
)
def test_shapes_it_does_not_fit_fall_back(case, why):
    spec = _spec(case, False)
    assert not conv_vpop.fits(spec), why
    with pytest.raises(ValueError, match="does not fit"):
        conv_vpop.vpop_conv_func(spec)
    asm = _asm(conv2d_kernel(spec, target=ICELAKE), ICELAKE)
    assert "vpermi2q" not in asm and "vpermt2q" not in asm  # the register-blocked kernel


def _asm(func, target):
    return tvm.compile(tvm.IRModule({"main": func}), target=tvm.target.Target(target)).mod.inspect_source("s")


def test_chosen_only_with_vector_popcounts():
    spec = _spec((256, 32, 14, 14, 3, 1, 1, 1), False)
    asm = _asm(conv2d_kernel(spec, target=ICELAKE), ICELAKE)
    assert re.search(r"vperm[it]2q", asm) and re.search(r"vpopcntq\s.*%zmm", asm)
    assert "vpternlog" not in asm.split("vpopcntq", 1)[0][-2000:]  # plain XOR before the popcounts
    znver3 = {"kind": "llvm", "mcpu": "znver3"}
    assert not re.search(r"vperm[it]2q", _asm(conv2d_kernel(spec, target=znver3), znver3))


SPLIT_CASES = [
    # c, o, h, w, kernel, stride, padding, dilation
    (64, 64, 32, 32, 3, 1, 1, 1),  # ResNet-18's first stage: 128 vectors in 16 chunks of 8
    (64, 16, 14, 14, 3, 1, 1, 1),  # 25 vectors: chunks of 2, the last one of 1 (overlapping)
    (64, 32, 16, 16, 3, 2, 1, 1),  # stride 2: 8 vectors
    (128, 8, 12, 12, 1, 1, 0, 1),  # 1x1, one channel block
]


def _split_outputs(spec, g, kind, split, inputs, m):
    o, oh, ow = spec.out_channels, spec.out_h, spec.out_w
    shapes = {
        "affine": [((m, o, oh, ow), "float32")],
        "threshold": [((m, o, oh, ow), "float32")],
        "packed": [((m, oh, ow, 1, o // 32), "int32")],
        "residual": [((m, o, oh, ow), "float32")],
        "signs": [((m, o, oh, ow), "float32"), ((m, oh, ow, 1, o // 32), "int32")],
    }[kind]
    func = conv_vpop.vpop_conv_func(
        spec, packed=kind in ("packed", "signs"), clip=(-1.0, 1.0) if kind in ("residual", "signs") else None,
        split=split,
    )  # fmt: skip
    run = build(func)
    first = run(inputs, shapes)
    for _ in range(20):  # many calls on the pool's threads: a task reading another's buffer would differ
        again = run(inputs, shapes)
        assert all(np.array_equal(a, b) for a, b in zip(first, again))
    return first


@needs_vpopcnt
@pytest.mark.parametrize("kind", ["affine", "threshold", "packed", "residual", "signs"])
@pytest.mark.parametrize("case", SPLIT_CASES)
def test_pixel_and_channel_splits_agree(case, kind):
    """Tasks that take chunks of pixels (each with its own im2col), tasks that take channel blocks
    (one shared im2col) and the calling thread alone write the same bits, batch 1 and 3, every epilogue; the residual epilogue's
    packed signs are those pack_sign_nchw makes of its output."""
    spec = _spec(case, kind in ("threshold", "packed"))
    if kind in ("packed", "signs") and spec.out_channels % 32:
        pytest.skip("packed outputs need 32k channels")
    g = torch.Generator().manual_seed(sum(case) + len(kind))
    planes = _planes(spec, g)
    o = spec.out_channels
    if spec.threshold:
        ep = [
            torch.randint(-1, 2, (o,), generator=g).to(torch.int32),
            torch.randint(-20, 21, (o,), generator=g).to(torch.int32),
        ]
    else:
        ep, _ = epilogue_params(o, False, g, False, spec.reduction // 4)
    for m in (1, 3):
        x = torch.randn(m, spec.in_channels, spec.in_h, spec.in_w, generator=g)
        inputs = act_inputs(x, "binary", 1) + [planes] + ep
        if kind in ("residual", "signs"):
            inputs.append(torch.randn(m, o, spec.out_h, spec.out_w, generator=g))
        pixels = _split_outputs(spec, g, kind, "pixels", inputs, m)
        for split in ("channels", "serial"):
            other = _split_outputs(spec, g, kind, split, inputs, m)
            assert all(np.array_equal(a, b) for a, b in zip(pixels, other)), split
        if kind == "signs":
            y, yp = pixels
            assert np.array_equal(yp, act_inputs(torch.from_numpy(y), "binary", 1)[0].numpy())


def test_split_must_be_named():
    with pytest.raises(ValueError, match="split must be 'pixels', 'channels' or 'serial'"):
        conv_vpop.vpop_conv_func(_spec(SPLIT_CASES[0], False), split="rows")


@needs_vpopcnt
def test_pixel_split_is_one_launch_with_one_barrier():
    """A large map's tasks share nothing but the blocks' tables: one parallel region, one barrier
    after the tables (the channel split of a small map builds one im2col together and meets
    twice); a kernel of little work has no parallel loop."""
    host = host_target()

    def count(spec, what):
        ll = tvm.compile(tvm.IRModule({"main": conv2d_kernel(spec, target=host)}), target=host).mod
        return ll.inspect_source("ll").count(f"load ptr, ptr @__TVMBackendParallel{what}")

    large = _spec((256, 256, 14, 14, 3, 1, 1, 1), True)
    small = _spec((256, 256, 7, 7, 3, 1, 1, 1), True)
    shortcut = _spec((64, 128, 32, 32, 1, 2, 0, 1), False)  # 128 x 256 x 1 word popcounts
    assert (count(large, "Launch"), count(large, "Barrier")) == (1, 1)
    assert (count(small, "Launch"), count(small, "Barrier")) == (1, 2)
    assert count(shortcut, "Launch") == 0  # below PARALLEL_MIN: on the calling thread


SHORTCUT_CASES = [
    # c, o, h (= w), stride: the block's 3x3 conv (padding 1) and its 1x1 shortcut (padding 0)
    (64, 128, 32, 2),  # ResNet-18's second stage: 32 pixel vectors, tasks take chunks of them
    (128, 256, 16, 2),  # 8 vectors: tasks take channel blocks of one shared im2col
    (64, 32, 9, 1),  # stride 1, 81 pixels: the last vector overlaps
    (64, 32, 7, 2),  # an odd map at stride 2: 16 pixels
]


def _shortcut_specs(case):
    c, o, h, s = case
    return _spec((c, o, h, h, 3, s, 1, 1), True), _spec((c, o, h, h, 1, s, 0, 1), False)


@needs_vpopcnt
@pytest.mark.parametrize("split", ["pixels", "channels", "serial"])
@pytest.mark.parametrize("case", SHORTCUT_CASES)
def test_a_packed_conv_computes_its_shortcut_too(case, split):
    """The block's first conv (packed output) with its 1x1 projection shortcut read from the
    centre tap of its im2col: the packed bits equal the packed conv's alone, the shortcut's floats
    equal the 1x1 conv's kernel alone bit for bit (and the reference within float rounding), in
    every task split, batch 1 and 3."""
    spec, short = _shortcut_specs(case)
    assert conv_vpop.fuses_shortcut(spec, short)
    o, oh, ow = spec.out_channels, spec.out_h, spec.out_w
    g = torch.Generator().manual_seed(sum(case))
    planes, s_planes = _planes(spec, g), _planes(short, g)
    ts = torch.randint(-1, 2, (o,), generator=g).to(torch.int32)
    th = torch.randint(-20, 21, (o,), generator=g).to(torch.int32)
    ep, kw = epilogue_params(o, False, g, False, short.reduction // 4)
    run = build(conv_vpop.vpop_conv_func(spec, packed=True, split=split, shortcut=short))
    alone, s_alone = (
        build(conv_vpop.vpop_conv_func(spec, packed=True)),
        build(conv_vpop.vpop_conv_func(short)),
    )
    for m in (1, 3):
        x = torch.randn(m, spec.in_channels, spec.in_h, spec.in_w, generator=g)
        xp = act_inputs(x, "binary", 1)
        packed_shape, float_shape = ((m, oh, ow, 1, o // 32), "int32"), ((m, o, oh, ow), "float32")
        for _ in range(5):  # repeated calls on the pool's threads
            y, sy = run(xp + [planes, ts, th, s_planes] + ep, [packed_shape, float_shape])
            assert np.array_equal(y, alone(xp + [planes, ts, th], [packed_shape])[0])
            assert np.array_equal(sy, s_alone(xp + [s_planes] + ep, [float_shape])[0])
        assert_close(sy, _reference(short, x, s_planes, kw))


@pytest.mark.parametrize(
    "why",
    [
        "padded shortcut",
        "other stride",
        "3x3 shortcut",
        "other channels",
        "threshold shortcut",
        "smaller map",
    ],
)
def test_no_shortcut_where_it_is_not_the_centre_tap(why):
    spec, short = _shortcut_specs((64, 128, 16, 2))
    change = {
        "padded shortcut": {"padding": (1, 1)},
        "other stride": {"stride": (1, 1)},
        "3x3 shortcut": {"kernel": (3, 3), "padding": (1, 1)},
        "other channels": {"out_channels": 64},
        "threshold shortcut": {"threshold": True},
        "smaller map": {},
    }[why]
    if why == "smaller map":  # a 3x3 without padding: 7x7 outputs against the 1x1 conv's 8x8
        spec = dataclasses.replace(spec, padding=(0, 0))
    short = dataclasses.replace(short, **change)
    assert not conv_vpop.fuses_shortcut(spec, short), why
    with pytest.raises(ValueError, match="no shortcut"):
        conv_vpop.vpop_conv_func(spec, packed=True, shortcut=short)


@needs_vpopcnt
@pytest.mark.parametrize("kind", ["threshold", "packed"])
def test_every_template_choice_is_exact(kind):
    """The tuning template's choices (how the tasks split the work, how many chunks of pixels)
    each give the reference's bits, batch 3: 14x14 is 25 pixel vectors, in chunks of 7, 4, 2 and 1."""
    spec = _spec((64, 32, 14, 14, 3, 1, 1, 1), True)
    template = conv_vpop.vpop_template(spec, packed=kind == "packed")
    choices = template_choices(template)
    assert choices == {
        "split": (tuple(range(len(conv_vpop.SPLITS))), conv_vpop.SPLITS.index(conv_vpop.default_split(spec))),
        "chunks": (conv_vpop.CHUNK_CHOICES, conv_vpop.CHUNKS),
    }
    hand = with_choices(template)
    assert tvm_ffi.structural_equal(hand, conv_vpop.vpop_conv_func(spec, packed=kind == "packed"))
    g = torch.Generator().manual_seed(7)
    planes = _planes(spec, g)
    o = spec.out_channels
    ep, kw = epilogue_params(o, True, g, False, spec.reduction // 4)
    x = torch.randn(3, spec.in_channels, spec.in_h, spec.in_w, generator=g)
    ref = _reference(
        spec, x, planes, {**kw, "scale": torch.ones(o), "offset": torch.zeros(o), "bias": torch.zeros(o)}
    )
    if kind == "packed":
        want, shape = (
            act_inputs(ref, "binary", 1)[0].numpy(),
            ((3, spec.out_h, spec.out_w, 1, o // 32), "int32"),
        )
    else:
        want, shape = ref.numpy(), (tuple(ref.shape), "float32")
    kernels = set()
    for values, func in every_choice(template):
        kernels.add(tvm_ffi.structural_hash(func))
        (y,) = build(func)(act_inputs(x, "binary", 1) + [planes] + ep, [shape])
        assert np.array_equal(y, want), values
    assert len(kernels) == 2 + 4  # serial, channels, and pixels in chunks of 7, 4, 2 and 1 vectors
