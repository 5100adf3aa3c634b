"""The integer conv (int8 activations x k-bit codes, byte dot products) against the reference.

Each geometry runs with ``vpdpbusd`` (a VNNI host) and with ``vpmaddubsw`` (the same host asked
for an AVX2-only CPU); its integer sums must equal the reference's, so the float epilogue agrees
to float rounding and every layer that follows sees the same int8 codes.
"""

import re

import pytest
import torch
import tvm

from bitcompiler.backends.exact_float import FENCE, no_contraction
from bitcompiler.kernels import ConvSpec, conv2d_kernel, conv_int8
from bitcompiler.kernels.conv import _output
from bitcompiler.quant import numerics as nu
from tests.kernels._util import (
    act_inputs,
    assert_close,
    epilogue_params,
    every_choice,
    llvm_ir_beside_another,
    parallel_workspaces,
    random_codes,
)

pytestmark = pytest.mark.skipif(
    not conv_int8.fits(
        ConvSpec(16, 8, 4, 4, (3, 3), (1, 1), (1, 1), (1, 1), 1, 2, "uint", "int8", True, False)
    ),
    reason="needs an x86 CPU with AVX2",
)

# (C, O, H, W, kernel, stride, padding, dilation): 3 input channels (a stem), C not a multiple
# of 4, O padded to 8 or 16 lanes, stride 2, dilation, no padding, odd widths
GEOMETRIES = [
    (3, 16, 9, 8, (3, 3), (1, 1), (1, 1), (1, 1)),
    (6, 20, 7, 6, (3, 3), (2, 2), (1, 1), (1, 1)),
    (16, 32, 8, 8, (3, 3), (1, 1), (1, 1), (1, 1)),
    (70, 8, 5, 7, (2, 3), (1, 2), (0, 1), (2, 1)),
    (32, 24, 6, 5, (1, 1), (1, 1), (0, 0), (1, 1)),
    # whole vectors of 16 output pixels a row (stride 1 along it): the pixel-lanes schedule on a
    # VNNI host, 24 channels (six blocks of 4), a row stride and column dilation
    (3, 24, 8, 32, (3, 3), (1, 1), (1, 1), (1, 1)),
    (6, 16, 5, 36, (3, 3), (2, 1), (1, 0), (1, 2)),
]
PIXEL_LANES = GEOMETRIES[-2:]
TARGETS = {"avx2": "znver3", "host": None}


def _target(name):
    mcpu = TARGETS[name] or tvm.target.codegen.llvm_get_system_cpu()
    return tvm.target.Target({"kind": "llvm", "mcpu": mcpu})


@pytest.mark.parametrize("geom", GEOMETRIES, ids=lambda g: "c{}o{}_{}x{}".format(g[0], g[1], *g[4]))
@pytest.mark.parametrize("bits, has_offset", [(2, True), (4, False), (7, True), (8, False)])
@pytest.mark.parametrize("isa", sorted(TARGETS))
@pytest.mark.parametrize("stored", [False, True], ids=["planes", "stored"])
def test_int8_conv_matches_reference(geom, bits, has_offset, isa, stored):
    c, o, h, w, k, s, p, d = geom
    target = _target(isa)
    spec = ConvSpec(c, o, h, w, k, s, p, d, 1, bits, "uint", "int8", has_offset, False)
    vnni = conv_int8.uses_vnni(target)
    if bits == 8 and not vnni:  # a vpmaddubsw pair sum of 8-bit codes can pass 2^15
        assert not conv_int8.fits(spec, target)
        return
    assert conv_int8.fits(spec, target)
    if stored and 8 % bits:
        pytest.skip("codes are stored in bytes only for 1, 2 and 4 bits")
    func = _kernel(spec, target, stored)
    assert conv_int8.pixel_lanes(spec, target) == (vnni and geom in PIXEL_LANES)
    assert "vpdpbusd" in func.script() or "pmadd" in func.script()
    # 16-channel blocks, or 16 pixels, take one 512-bit vpdpbusd where the CPU has AVX-512 VNNI
    wide = conv_int8._vb(spec) == 16 or conv_int8.pixel_lanes(spec, target)
    assert ("vpdpbusd.512" in func.script()) == (vnni and wide)
    _check(spec, func, target, stored)


def _kernel(spec, target, stored):
    return (
        conv_int8.int8_conv_func(spec, _output, target, stored=True)
        if stored
        else conv2d_kernel(spec, target)
    )


def _check(spec, func, target, stored):
    """``func`` (the kernel of ``spec``) on random codes and inputs, batch 1 and 3, against the reference."""
    c, o, h, w, k, bits = spec.in_channels, spec.out_channels, spec.in_h, spec.in_w, spec.kernel, spec.bits
    s, p, d, has_offset = spec.stride, spec.padding, spec.dilation, spec.has_offset
    lib = tvm.compile(tvm.IRModule({"main": func}), target=target)
    g = torch.Generator().manual_seed(c * o + bits)
    codes = random_codes((o, c, *k), bits, "uint", g)
    planes = nu.conv_codes_to_planes(codes, bits, "uint")
    ep, kw = epilogue_params(o, False, g, has_offset, spec.reduction)
    for m in (1, 3):
        x = torch.randn(m, c, h, w, generator=g) * 3
        weights = conv_int8.relayout_codes(spec, planes.numpy()) if stored else planes.numpy()
        args = [
            tvm.runtime.tensor(a)
            for a in [*(t.numpy() for t in act_inputs(x, "int8")), weights, *(t.numpy() for t in ep)]
        ]
        y = tvm.runtime.tensor(torch.zeros(m, o, spec.out_h, spec.out_w).numpy())
        lib["main"](*args, y)
        ref = nu.bit_conv2d(x, planes, c, k, "uint", "int8", stride=s, padding=p, dilation=d, groups=1, **kw)
        assert_close(y.numpy(), ref)


@pytest.mark.parametrize("stored", [False, True], ids=["planes", "stored"])
@pytest.mark.parametrize(
    "c, o, h, k, parallel",
    [
        # a CIFAR stem: only the dot products are threads' work (the input copy, the decoded
        # codes and the window sums are a launch each for 1-2 us)
        (3, 64, 32, 3, {"Y"}),
        # an input and window sums of 65,536 or more: those in parallel too
        (3, 16, 128, 3, {"Y", "XZ", "XW", "sumx"}),
        # 64 x 128 x 3 x 3 codes (73,728) decoded in parallel
        (64, 128, 4, 3, {"Y", "WQ"}),
    ],
)
def test_parallel_stages_are_threads_work(c, o, h, k, parallel, stored):
    """Each stage runs in a parallel loop only when it is PARALLEL_MIN work (a batch row), and the
    kernel stays exact either way."""
    target = _target("host")
    spec = ConvSpec(c, o, h, h, (k, k), (1, 1), (1, 1), (1, 1), 1, 2, "uint", "int8", True, False)
    func = _kernel(spec, target, stored)
    sch = tvm.s_tir.Schedule(func)
    found = set()
    for name in ("Y", "XZ", "WQ", "XW", "sumx"):
        block = name if name in ("Y", "XZ", "WQ") else name + "_update"  # reductions: two blocks
        kinds = [sch.get(loop).kind for loop in sch.get_loops(sch.get_sblock(block))]
        if tvm.tirx.ForKind.PARALLEL in kinds:
            found.add(name)
    assert found == parallel
    _check(spec, func, target, stored)


def test_vnni_choice_follows_the_target():
    assert not conv_int8.uses_vnni(_target("avx2"))
    assert conv_int8.uses_vnni(tvm.target.Target({"kind": "llvm", "mcpu": "icelake-server"}))


@pytest.mark.parametrize(
    "c, o, k, bits, stores",
    [(64, 64, 3, 2, True), (16, 24, 3, 4, True), (3, 16, 3, 2, False), (64, 64, 3, 3, False)],
)
def test_stored_codes_only_without_padding(c, o, k, bits, stores):
    """Stored bytes hold B bits per code; a layout whose padding adds more than 5% keeps the planes."""
    spec = ConvSpec(c, o, 8, 8, (k, k), (1, 1), (1, 1), (1, 1), 1, bits, "uint", "int8", True, False)
    assert conv_int8.stores_codes(spec) == stores
    if stores:
        assert conv_int8.codes_bytes(spec) * 8 <= 1.05 * bits * o * c * k * k


@pytest.mark.parametrize("geom", GEOMETRIES, ids=lambda g: "c{}o{}_{}x{}".format(g[0], g[1], *g[4]))
@pytest.mark.parametrize("has_offset", [True, False])
@pytest.mark.parametrize("isa", sorted(TARGETS))
def test_no_heap_workspace_for_the_sums(geom, has_offset, isa):
    """The register block's sums stay in registers: no parallel task allocates a heap workspace
    (a "local" block, or a value the dot intrinsic binds to a name, is one, and LLVM then stores
    every sum), built as the VM builds it; the input copy and the decoded codes are allocated
    once, outside the tasks."""
    c, o, h, w, k, s, p, d = geom
    target = _target(isa)
    spec = ConvSpec(c, o, h, w, k, s, p, d, 1, 2, "uint", "int8", has_offset, False)
    ll = llvm_ir_beside_another(conv2d_kernel(spec, target), target)
    tasks = parallel_workspaces(ll)
    assert tasks and tasks == [0] * len(tasks)


@pytest.mark.parametrize("geom", GEOMETRIES[:3], ids=lambda g: "c{}o{}_{}x{}".format(g[0], g[1], *g[4]))
def test_epilogue_in_vectors_with_fenced_products(geom):
    """The epilogue's float products are vector instructions in the IR TVM emits: the backend fences
    them (``exact_float.no_contraction``), and a fence stops LLVM's SLP vectorizer, which left the
    unrolled epilogue scalar (the CIFAR stem took twice as long: 58 us against 29)."""
    c, o, h, w, k, s, p, d = geom
    target = _target("host")
    spec = ConvSpec(c, o, h, w, k, s, p, d, 1, 8, "uint", "int8", True, False)
    fenced = no_contraction()(tvm.IRModule({"main": conv2d_kernel(spec, target)}))["main"]
    ll = llvm_ir_beside_another(fenced, target)
    assert FENCE in ll
    vector = len(re.findall(r"fmul (?:\w+ )*<", ll))
    scalar = len(re.findall(r"fmul (?:\w+ )*float ", ll))
    # scalars only for the per-channel scale of a 16-channel block (unvectorized: 512 against 0)
    assert vector > 0 and scalar <= 32, (vector, scalar)


@pytest.mark.skipif(not conv_int8.uses_vnni(_target("host")), reason="the pixel lanes need AVX-512 VNNI")
def test_a_model_with_pixel_lanes_stems_is_bit_exact():
    """A CIFAR-shaped W2A8 net whose 3 -> 16 and 16 -> 16 convs take the pixel lanes, compiled
    whole: its outputs equal the numeric reference's, batch 1 and 5."""
    from torch import nn

    import bitcompiler as bc

    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    ).eval()  # fmt: skip
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    for spec in (
        ConvSpec(3, 16, 32, 32, (3, 3), (1, 1), (1, 1), (1, 1), 1, 2, "uint", "int8", True, False),
        ConvSpec(16, 16, 32, 32, (3, 3), (1, 1), (1, 1), (1, 1), 1, 2, "uint", "int8", True, False),
    ):
        assert conv_int8.pixel_lanes(spec, _target("host"))
    cm = bc.compile(net, (torch.randn(1, 3, 32, 32),), scheme="uniform:bits=2,act=8")
    for batch in (1, 5):
        x = torch.randn(batch, 3, 32, 32) * 2
        assert torch.equal(cm(x), cm.reference(x))


@pytest.mark.parametrize(
    "geom", [GEOMETRIES[0], *PIXEL_LANES], ids=["channel-lanes", "pixel-lanes", "pixel-lanes-strided"]
)
def test_every_template_choice_is_exact(geom):
    """The tuning template's choices (register block width; pixel lanes: channels and vectors of
    pixels a block) each compute the reference, batch 1 and 3, on the host's instruction set."""
    c, o, h, w, k, s, p, d = geom
    target = _target("host")
    spec = ConvSpec(c, o, h, w, k, s, p, d, 1, 2, "uint", "int8", True, False)
    template = conv_int8.int8_conv_template(spec, _output, target)
    seen = []
    for values, func in every_choice(template):
        seen.append(values)
        _check(spec, func, target, False)
    assert len(seen) > 2, seen  # the hand schedule and at least two others
