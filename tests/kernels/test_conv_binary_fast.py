"""The register-blocked binary pm1 conv (CPU schedule) on ResNet-like shapes: int64 words, several
output-channel blocks, widths that are not a multiple of the pixel vector, stride 2, batch > 1,
pixel vectors away from the border, and the byte-lane reduction's uint8 chunks (on AVX2), for three
x86 kernel choices: the host's (AVX-512 ``vpopcntq`` on 8 or 16 pixels where it has them), AVX2's byte
lanes (znver3), and the plain word popcounts (x86-64)."""

import re

import numpy as np
import pytest
import torch
import tvm

from bitcompiler.kernels import ConvSpec, conv2d_kernel
from bitcompiler.kernels.conv_pm1 import fuses_residual, packs_output, packs_residual
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
)

# where the kernels are built for: the host, an AVX2 CPU without AVX-512, and x86-64 without AVX2
ISAS = ["llvm", {"kind": "llvm", "mcpu": "znver3"}, {"kind": "llvm", "mcpu": "x86-64"}]

CASES = [
    # c, o, h, w, stride, padding, groups
    (64, 16, 7, 7, 1, 1, 1),  # int64 words (CWg = 2), OW = 7 -> padded pixel vector
    (64, 24, 8, 6, 2, 1, 1),  # stride 2, 3 blocks of 8 channels
    (96, 8, 5, 9, 1, 0, 1),  # odd word count (int32 words, 8 pixels per vector), no padding
    (128, 8, 4, 4, 2, 1, 2),  # groups: 64 channels per group, 4 output channels per group
    (64, 16, 12, 12, 1, 1, 1),  # border vectors and interior ones (their short epilogue)
    (256, 8, 9, 9, 1, 1, 1),  # 36 steps per pixel: two uint8 chunks before widening
    (64, 16, 5, 14, 1, 1, 1),  # AVX-512: two 8-pixel vectors, the second overlapping the first
    (96, 8, 3, 19, 1, 1, 1),  # int32 words, AVX-512: 16-pixel vectors, the last overlapping
    (64, 8, 3, 3, 1, 1, 1),  # a row shorter than any vector: padded, stored pixel by pixel
]


@pytest.mark.parametrize("isa", ISAS, ids=["host", "avx2", "x86-64"])
@pytest.mark.parametrize("threshold", [False, True])
@pytest.mark.parametrize("case", CASES)
def test_binary_pm1_conv(case, threshold, isa):
    c, o, h, w, s, p, groups = case
    g = torch.Generator().manual_seed(c + o + h)
    spec = ConvSpec(c, o, h, w, (3, 3), (s, s), (p, p), (1, 1), groups, 1, "pm1", "binary", False, threshold)
    run = build(conv2d_kernel(spec, target=isa))
    planes = nu.conv_codes_to_planes(random_codes((o, spec.cg, 3, 3), 1, "pm1", g), 1, "pm1")
    ep, kw = epilogue_params(o, threshold, g, False, spec.reduction // 4)
    if threshold:
        kw.update(scale=torch.ones(o), offset=torch.zeros(o), bias=torch.zeros(o))
    conv = {"stride": (s, s), "padding": (p, p), "dilation": (1, 1), "groups": groups}
    for m in (1, 3):
        x = torch.randn(m, c, h, w, generator=g)
        x[0, :, 0, 0] = 0.0  # sign(0) = +1
        (y,) = run(
            act_inputs(x, "binary", groups) + [planes] + ep, [((m, o, spec.out_h, spec.out_w), "float32")]
        )
        ref = nu.bit_conv2d(x, planes, c, (3, 3), "pm1", "binary", **conv, **kw)
        if threshold:
            assert np.array_equal(y, ref.numpy())
        else:
            assert_close(y, ref)


def test_avx512_kernel_uses_vector_popcounts():
    spec = ConvSpec(64, 16, 8, 8, (3, 3), (1, 1), (1, 1), (1, 1), 1, 1, "pm1", "binary", False, False)
    target = {"kind": "llvm", "mcpu": "icelake-server"}
    assert popcnt512_target(target) and not popcnt512_target({"kind": "llvm", "mcpu": "znver3"})
    func = conv2d_kernel(spec, target=target)
    asm = tvm.compile(tvm.IRModule({"main": func}), target=tvm.target.Target(target)).mod.inspect_source("s")
    assert (
        re.search(r"vpopcntq\s.*%zmm", asm) and "vpshufb" not in asm
    )  # 8 pixels a vector, no nibble lookups
    assert "vpgather" not in asm and "vpscatter" not in asm  # the weight tables: scalar popcounts


def test_other_targets_unscheduled():
    spec = ConvSpec(64, 8, 6, 6, (3, 3), (1, 1), (1, 1), (1, 1), 1, 1, "pm1", "binary", False, False)
    text = conv2d_kernel(spec, target="c").script()
    assert "T.parallel" not in text and "T.vectorized" not in text


@pytest.mark.parametrize("c, o, hw, s", [(64, 32, 9, 1), (64, 64, 8, 2), (96, 32, 12, 1)])
def test_packed_output_is_the_packed_threshold_output(c, o, hw, s):
    g = torch.Generator().manual_seed(c + o + hw)
    spec = ConvSpec(c, o, hw, hw, (3, 3), (s, s), (1, 1), (1, 1), 1, 1, "pm1", "binary", False, True)
    assert packs_output(spec)
    planes = nu.conv_codes_to_planes(random_codes((o, c, 3, 3), 1, "pm1", g), 1, "pm1")
    ts = torch.randint(-1, 2, (o,), generator=g).to(torch.int32)
    th = torch.randint(-20, 21, (o,), generator=g).to(torch.int32)
    run = build(conv2d_kernel(spec, packed_output=True))
    for m in (1, 2):
        x = torch.randn(m, c, hw, hw, generator=g)
        (y,) = run(
            act_inputs(x, "binary", 1) + [planes, ts, th],
            [((m, spec.out_h, spec.out_w, 1, o // 32), "int32")],
        )
        ref = nu.bit_conv2d(
            x, planes, c, (3, 3), "pm1", "binary", torch.ones(o), torch.zeros(o), torch.zeros(o),
            stride=(s, s), padding=(1, 1), thr_sign=ts, thr=th,
        )  # fmt: skip
        assert np.array_equal(y, act_inputs(ref, "binary", 1)[0].numpy())


def test_packed_output_needs_a_threshold_layer():
    spec = ConvSpec(64, 32, 8, 8, (3, 3), (1, 1), (1, 1), (1, 1), 1, 1, "pm1", "binary", False, False)
    assert not packs_output(spec)
    with pytest.raises(ValueError, match="packed-output"):
        conv2d_kernel(spec, packed_output=True)


@pytest.mark.parametrize(
    "c, o, hw, s, clip",
    [(64, 16, 9, 1, (-1.0, 1.0)), (64, 24, 8, 2, (-0.5, 2.0)), (96, 8, 7, 1, (-100.0, 100.0))],
)
def test_residual_epilogue_is_hardtanh_of_conv_plus_residual(c, o, hw, s, clip):
    g = torch.Generator().manual_seed(c + o + hw)
    spec = ConvSpec(c, o, hw, hw, (3, 3), (s, s), (1, 1), (1, 1), 1, 1, "pm1", "binary", False, False)
    assert fuses_residual(spec)
    planes = nu.conv_codes_to_planes(random_codes((o, c, 3, 3), 1, "pm1", g), 1, "pm1")
    ep, kw = epilogue_params(o, False, g, False, spec.reduction // 4)
    run = build(conv2d_kernel(spec, residual_clip=clip))
    for m in (1, 2):
        x = torch.randn(m, c, hw, hw, generator=g)
        res = torch.randn(m, o, spec.out_h, spec.out_w, generator=g)
        (y,) = run(
            act_inputs(x, "binary", 1) + [planes] + ep + [res], [((m, o, spec.out_h, spec.out_w), "float32")]
        )
        conv = nu.bit_conv2d(x, planes, c, (3, 3), "pm1", "binary", stride=(s, s), padding=(1, 1), **kw)
        assert_close(y, torch.nn.functional.hardtanh(conv + res, *clip))


@pytest.mark.parametrize("isa", ISAS, ids=["host", "avx2", "x86-64"])
@pytest.mark.parametrize(
    "c, o, hw, s, clip",
    [
        (64, 32, 9, 1, (-1.0, 1.0)),
        (64, 64, 8, 2, (0.0, 2.0)),
        (96, 32, 3, 1, (-1.0, 1.0)),
        (64, 32, 16, 1, (-1.0, 1.0)),
    ],
)
def test_residual_epilogue_packs_its_signs(c, o, hw, s, clip, isa):
    # Y as the residual epilogue alone writes it (bit for bit), then Y's signs packed as
    # pack_sign_nchw packs them: rows with padded pixel vectors, a row shorter than a vector,
    # stride 2, a clip at 0 (exact zeros count as +1), batch 1 and 2
    g = torch.Generator().manual_seed(c + o + hw + s)
    spec = ConvSpec(c, o, hw, hw, (3, 3), (s, s), (1, 1), (1, 1), 1, 1, "pm1", "binary", False, False)
    assert packs_residual(spec)
    planes = nu.conv_codes_to_planes(random_codes((o, c, 3, 3), 1, "pm1", g), 1, "pm1")
    ep, _ = epilogue_params(o, False, g, False, spec.reduction // 4)
    both = build(conv2d_kernel(spec, isa, packed_output=True, residual_clip=clip))
    alone = build(conv2d_kernel(spec, isa, residual_clip=clip))
    oh, ow = spec.out_h, spec.out_w
    for m in (1, 2):
        x = torch.randn(m, c, hw, hw, generator=g)
        res = torch.randn(m, o, oh, ow, generator=g)
        inputs = act_inputs(x, "binary", 1) + [planes] + ep + [res]
        y, yp = both(inputs, [((m, o, oh, ow), "float32"), ((m, oh, ow, 1, o // 32), "int32")])
        (expected,) = alone(inputs, [((m, o, oh, ow), "float32")])
        assert np.array_equal(y, expected)
        assert np.array_equal(yp, act_inputs(torch.from_numpy(y), "binary", 1)[0].numpy())


def test_packed_residual_needs_32k_channels():
    spec = ConvSpec(64, 24, 8, 8, (3, 3), (1, 1), (1, 1), (1, 1), 1, 1, "pm1", "binary", False, False)
    assert fuses_residual(spec) and not packs_residual(spec)
    with pytest.raises(ValueError, match="packed-output"):
        conv2d_kernel(spec, packed_output=True, residual_clip=(-1.0, 1.0))


def test_residual_epilogue_needs_a_float_output():
    spec = ConvSpec(64, 32, 8, 8, (3, 3), (1, 1), (1, 1), (1, 1), 1, 1, "pm1", "binary", False, True)
    assert not fuses_residual(spec)
    with pytest.raises(ValueError, match="residual"):
        conv2d_kernel(spec, residual_clip=(-1.0, 1.0))


def _barriers_and_launches(spec: ConvSpec) -> tuple[int, int]:
    ll = tvm.compile(tvm.IRModule({"main": conv2d_kernel(spec)}), target=host_target()).mod.inspect_source(
        "ll"
    )
    return ll.count("load ptr, ptr @__TVMBackendParallelBarrier"), ll.count(
        "load ptr, ptr @__TVMBackendParallelLaunch"
    )


def test_im2col_and_channel_blocks_are_one_parallel_region():
    """The im2col is split over the tasks of the channel loop's region (one launch, a barrier after
    each part); with one channel block the kernel keeps its plain parallel loop (a one-iteration
    loop in a region would run on every task)."""
    spec = ConvSpec(256, 256, 7, 7, (3, 3), (1, 1), (1, 1), (1, 1), 1, 1, "pm1", "binary", False, True)
    assert _barriers_and_launches(spec) == (2, 1)
    one_block = ConvSpec(96, 8, 5, 9, (3, 3), (1, 1), (0, 0), (1, 1), 1, 1, "pm1", "binary", False, True)
    assert _barriers_and_launches(one_block)[0] == 0


@pytest.mark.parametrize("case", [(96, 8, 5, 9, 1, 0), (96, 16, 5, 9, 1, 0), (64, 24, 8, 6, 2, 1)])
def test_repeated_calls_on_the_pool_are_exact(case):
    """Many calls on every thread of the pool (tests run with 2 unless TVM_NUM_THREADS says
    otherwise), batch 1 to 3: tasks that shared a table or raced past a barrier would differ."""
    c, o, h, w, s, p = case
    g = torch.Generator().manual_seed(7)
    spec = ConvSpec(c, o, h, w, (3, 3), (s, s), (p, p), (1, 1), 1, 1, "pm1", "binary", False, True)
    run = build(conv2d_kernel(spec))
    planes = nu.conv_codes_to_planes(random_codes((o, c, 3, 3), 1, "pm1", g), 1, "pm1")
    ep, kw = epilogue_params(o, True, g, False, spec.reduction // 4)
    kw.update(scale=torch.ones(o), offset=torch.zeros(o), bias=torch.zeros(o))
    for i in range(150):
        x = torch.randn(1 + i % 3, c, h, w, generator=g)
        (y,) = run(
            act_inputs(x, "binary", 1) + [planes] + ep, [((x.shape[0], o, spec.out_h, spec.out_w), "float32")]
        )
        ref = nu.bit_conv2d(x, planes, c, (3, 3), "pm1", "binary", stride=(s, s), padding=(p, p), **kw)
        assert np.array_equal(y, ref.numpy()), f"call {i}"


@pytest.mark.parametrize("isa", ISAS[:2], ids=["host", "avx2"])
@pytest.mark.parametrize("kind", ["threshold", "packed"])
def test_every_template_choice_is_exact(kind, isa):
    """The tuning template's choices (channels per register block, one parallel region or a loop
    per stage, 512- or 256-bit vectors where the CPU has vpopcntq) each give the reference's
    bits, batch 1 and 3; the hand choices build the kernel the function's defaults build."""
    import itertools

    import tvm_ffi

    from bitcompiler.kernels.conv_binary import binary_pm1_func, binary_template
    from bitcompiler.kernels.dense_avx2 import avx2_target

    c, o, h, w = 32, 32, 6, 20  # one 32-bit word a pixel (int32 lanes), 16-pixel rows on AVX-512
    spec = ConvSpec(c, o, h, w, (3, 3), (1, 1), (1, 1), (1, 1), 1, 1, "pm1", "binary", False, True)
    packed = kind == "packed"
    flags = {"byte_lanes": avx2_target(isa), "packed": packed, "popcnt512": popcnt512_target(isa)}
    template = binary_template(spec, **flags)
    found = template_choices(template)
    assert list(found) == ["block", "region", "lanes512"]
    assert found["block"][0] == ((8,) if packed else (8, 4, 2))
    g = torch.Generator().manual_seed(5)
    planes = nu.conv_codes_to_planes(random_codes((o, c, 3, 3), 1, "pm1", g), 1, "pm1")
    ep, kw = epilogue_params(o, True, g, False, spec.reduction // 4)
    kw.update(scale=torch.ones(o), offset=torch.zeros(o), bias=torch.zeros(o))
    x = torch.randn(3, c, h, w, generator=g)
    ref = nu.bit_conv2d(
        x, planes, c, (3, 3), "pm1", "binary", stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=1, **kw
    )
    want = act_inputs(ref, "binary", 1)[0].numpy() if packed else ref.numpy()
    shape = ((3, h, w, 1, o // 32), "int32") if packed else ((3, o, h, w), "float32")
    kernels = set()
    for i, (values, func) in enumerate(every_choice(template)):
        if i == 0:  # the hand schedule
            assert tvm_ffi.structural_equal(func, binary_pm1_func(spec, **flags))
        kernels.add(tvm_ffi.structural_hash(func))
        (y,) = build(func)(act_inputs(x, "binary", 1) + [planes] + ep, [shape])
        assert np.array_equal(y, want), values
    assert len(kernels) == len(list(itertools.product(*(cands for cands, _ in found.values()))))
