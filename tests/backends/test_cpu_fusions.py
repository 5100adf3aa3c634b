"""The CPU's fusion passes (backends/cpu/fusions.py): Before/Expected Relax modules, and compiled
models that take them against the reference."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
import tvm
from torch import nn
from tvm import relax

import bitcompiler as bc
from bitcompiler import kernels
from bitcompiler.backends.cpu.fusions import (
    fuse_packed_output,
    fuse_packed_pool,
    fuse_residual_clip,
)
from bitcompiler.backends.relax_emit import emit_kernel
from tests.conftest import assert_close, randomize_bn

TARGET = tvm.target.Target("llvm")
M, C, H = 2, 32, 6  # batch, channels, height = width
I32, F32 = "int32", "float32"


def conv_spec(threshold: bool, out_channels: int = C) -> kernels.ConvSpec:
    return kernels.ConvSpec(
        C, out_channels, H, H, (3, 3), (1, 1), (1, 1), (1, 1), 1, 1, "pm1", "binary", False, threshold
    )


def var(name: str, shape: tuple, dtype: str = F32) -> relax.Var:
    return relax.Var(name, relax.TensorType(shape, dtype))


def conv_params(spec: kernels.ConvSpec) -> list[relax.Var]:
    """XP, P and the epilogue buffers of a W1A1 conv, as function parameters."""
    epilogue = ["ts", "th"] if spec.threshold else ["sc", "of", "bi"]
    dtype = I32 if spec.threshold else F32
    return [
        var("xp", (M, H, H, 1, 1), I32),
        var("p", (1, spec.out_channels, 3, 3, 1), I32),
        *(var(n, (spec.out_channels,), dtype) for n in epilogue),
    ]


def conv_call(bb, spec: kernels.ConvSpec, args: list, **variant) -> relax.Var:
    """The call the converter emits (marked for the fusions), or with ``variant`` the fused kernel
    named as the pass names it."""
    name = f"bitc_conv2d_{spec.out_channels}"
    shape = (M, spec.out_channels, H, H)
    if not variant:
        about = {"op": "bit_conv2d", "name": name, "spec": dataclasses.asdict(spec)}
        return emit_kernel(
            bb, kernels.conv2d_kernel(spec, str(TARGET)), name, args, relax.TensorType(shape, F32), about
        )
    suffix, out = ("_packed", relax.TensorType((M, H, H, 1, spec.out_channels // 32), I32))
    if "residual_clip" in variant:
        suffix, out = "_res", relax.TensorType(shape, F32)
    prim = kernels.conv2d_kernel(spec, str(TARGET), **variant)
    return emit_kernel(bb, prim, name + suffix, args, out)


def pack_call(bb, y: relax.Var, groups: int = 1) -> relax.Var:
    """The packing of ``y`` for a binary conv of ``groups`` groups, as the converter emits it."""
    c = int(y.ty.shape[1])
    prim = kernels.pack_sign_nchw(c, H, H, groups, str(TARGET))
    out = relax.TensorType((M, H, H, groups, -(-c // groups // 32)), I32)
    return emit_kernel(bb, prim, "bitc_pack_sign_nchw", [y], out, {"op": "pack_sign_nchw", "groups": groups})


def module(params: list, body) -> tvm.IRModule:
    """``main(params)`` returning ``body(bb, params)``, in one dataflow block."""
    bb = relax.BlockBuilder()
    with bb.function("main", params):
        with bb.dataflow():
            out = bb.emit_output(body(bb, params))
        bb.emit_func_output(out)
    return bb.get()


def fused(pass_, mod: tvm.IRModule) -> tvm.IRModule:
    """``pass_`` then dead-code elimination, as in the CPU pipeline."""
    with TARGET:
        return relax.transform.DeadCodeElimination()(pass_(TARGET)(mod))


# --------------------------------------------------------------------------- packed output
def test_a_threshold_conv_writes_the_next_layers_packed_input():
    spec = conv_spec(threshold=True)
    params = conv_params(spec)
    before = module(params, lambda bb, p: pack_call(bb, conv_call(bb, spec, p)))
    expected = module(params, lambda bb, p: conv_call(bb, spec, p, packed_output=True))
    tvm.ir.assert_structural_equal(fused(fuse_packed_output, before), expected)


def unchanged(pass_, mod: tvm.IRModule) -> None:
    with TARGET:
        tvm.ir.assert_structural_equal(fused(pass_, mod), relax.transform.DeadCodeElimination()(mod))


@pytest.mark.parametrize("why", ["groups 2 read it", "an affine conv", "16 channels", "a clip between"])
def test_no_packed_output_where_the_kernel_has_none(why):
    spec = conv_spec(threshold=why != "an affine conv", out_channels=16 if why == "16 channels" else C)

    def body(bb, p):
        y = conv_call(bb, spec, p)
        if why == "a clip between":
            y = bb.emit(relax.op.clip(y, -1.0, 1.0))
        return pack_call(bb, y, groups=2 if why == "groups 2 read it" else 1)

    unchanged(fuse_packed_output, module(conv_params(spec), body))


# --------------------------------------------------------------------------- residual + clip
@pytest.mark.parametrize("order", ["conv + res", "res + conv"])
def test_a_residual_add_and_clip_go_into_the_conv_epilogue(order):
    spec = conv_spec(threshold=False)
    params = [*conv_params(spec), var("res", (M, C, H, H))]

    def body(bb, p):
        y = conv_call(bb, spec, p[:-1])
        total = bb.emit(relax.op.add(y, p[-1]) if order == "conv + res" else relax.op.add(p[-1], y))
        return bb.emit(relax.op.clip(total, -0.5, 2.0))

    before = module(params, body)
    expected = module(params, lambda bb, p: conv_call(bb, spec, p, residual_clip=(-0.5, 2.0)))
    tvm.ir.assert_structural_equal(fused(fuse_residual_clip, before), expected)


def test_a_residual_conv_read_packed_writes_its_signs_too():
    spec = conv_spec(threshold=False)
    params = [*conv_params(spec), var("res", (M, C, H, H))]

    def body(bb, p):
        y = conv_call(bb, spec, p[:-1])
        out = bb.emit(relax.op.clip(bb.emit(relax.op.add(y, p[-1])), -1.0, 1.0))
        return bb.emit(relax.Tuple([out, pack_call(bb, out)]))

    def expected_body(bb, p):
        prim = kernels.conv2d_kernel(spec, str(TARGET), packed_output=True, residual_clip=(-1.0, 1.0))
        tys = [relax.TensorType((M, C, H, H), F32), relax.TensorType((M, H, H, 1, C // 32), I32)]
        both = emit_kernel(bb, prim, f"bitc_conv2d_{C}_res_packed", p, tys)
        return bb.emit(
            relax.Tuple([bb.emit(relax.TupleGetItem(both, 0)), bb.emit(relax.TupleGetItem(both, 1))])
        )

    before = module(params, body)
    tvm.ir.assert_structural_equal(fused(fuse_residual_clip, before), module(params, expected_body))


@pytest.mark.parametrize("why", ["the sum is read again", "the conv is read again", "a threshold conv"])
def test_no_residual_epilogue_where_another_reader_needs_the_parts(why):
    spec = conv_spec(threshold=why == "a threshold conv")
    params = [*conv_params(spec), var("res", (M, C, H, H))]

    def body(bb, p):
        y = conv_call(bb, spec, p[:-1])
        total = bb.emit(relax.op.add(y, p[-1]))
        out = bb.emit(relax.op.clip(total, -1.0, 1.0))
        again = {"the sum is read again": total, "the conv is read again": y}.get(why)
        return out if again is None else bb.emit(relax.op.add(out, again))

    unchanged(fuse_residual_clip, module(params, body))


# --------------------------------------------------------------------------- packed max pool
def pool(bb, y: relax.Var, k: int = 2, padding: int = 0) -> relax.Var:
    return bb.emit(relax.op.nn.max_pool2d(y, (k, k), (k, k), padding=(padding, padding)))


def or_pooled(bb, y: relax.Var, k: int = 2, padding: int = 0) -> relax.Var:
    """``or_pool(pack_sign(y))`` as :func:`fuse_packed_pool` writes it."""
    c, h = int(y.ty.shape[1]), int(y.ty.shape[2])
    oh = (h + 2 * padding - k) // k + 1
    packed = packed_at(bb, y, "bitc_pack_sign_nchw1")  # the pass's name: the pooled one had the first
    window = kernels.PoolWindow(h, h, oh, oh, (k, k), (k, k), (padding, padding))
    prim = kernels.or_pool_packed_kernel(1, c // 32, window, str(TARGET))
    return emit_kernel(
        bb, prim, "bitc_or_pool_packed", [packed], relax.TensorType((M, oh, oh, 1, c // 32), I32)
    )


PACK = {"op": "pack_sign_nchw", "groups": 1}
BIG = 2 * H  # the pooled input's side: pooled by 2, it is the conv's H


def packed_at(bb, y: relax.Var, name: str = "bitc_pack_sign_nchw") -> relax.Var:
    c, h = int(y.ty.shape[1]), int(y.ty.shape[2])
    prim = kernels.pack_sign_nchw(c, h, h, 1, str(TARGET))
    return emit_kernel(bb, prim, name, [y], relax.TensorType((M, h, h, 1, c // 32), I32), PACK)


@pytest.mark.parametrize("clip", [None, (-1.0, 1.0), (-0.5, 0.0)])
def test_a_max_pool_before_a_sign_becomes_an_or_of_packed_bits(clip):
    x = var("x", (M, C, BIG, BIG))

    def before(bb, p):
        y = pool(bb, p[0])
        return packed_at(bb, y if clip is None else bb.emit(relax.op.clip(y, *clip)))

    expected = module([x], lambda bb, p: or_pooled(bb, p[0]))
    tvm.ir.assert_structural_equal(fused(fuse_packed_pool, module([x], before)), expected)


@pytest.mark.parametrize("why", ["a clip at 0", "the pool is read again", "no pool"])
def test_no_packed_pool_where_the_signs_could_differ_or_the_floats_stay(why):
    x = var("x", (M, C, BIG, BIG))

    def body(bb, p):
        y = p[0] if why == "no pool" else pool(bb, p[0])
        out = packed_at(bb, bb.emit(relax.op.clip(y, 0.0, 1.0)) if why == "a clip at 0" else y)
        return bb.emit(relax.Tuple([out, y])) if why == "the pool is read again" else out

    unchanged(fuse_packed_pool, module([x], body))


class PoolThenSign(nn.Module):
    """The demo CNN's blocks: conv, BN, max pool, hardtanh (an int8 first conv, then a threshold
    binary conv), and a padded 3x3 pool in ceil mode before the last binary conv."""

    def __init__(self):
        super().__init__()
        block = lambda cin, cout, pool: [
            nn.Conv2d(cin, cout, 3, padding=1),
            nn.BatchNorm2d(cout),
            pool,
            nn.Hardtanh(),
        ]
        self.body = nn.Sequential(
            *block(1, 32, nn.MaxPool2d(2)),
            *block(32, 64, nn.MaxPool2d(2)),
            *block(64, 64, nn.MaxPool2d(3, 2, padding=1, ceil_mode=True)),
            nn.Conv2d(64, 32, 3, padding=1),
            nn.MaxPool2d(2),
            nn.Hardtanh(),
            nn.Flatten(),
        )
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        return self.fc(self.body(x))


def test_packed_pool_model_equals_the_reference_bit_for_bit(tmp_path, monkeypatch):
    monkeypatch.setenv("BITC_DUMP", str(tmp_path))
    torch.manual_seed(0)
    model = randomize_bn(PoolThenSign()).eval()
    cm = bc.compile(model, (torch.randn(1, 1, 16, 16),), scheme="binary:act=binary")
    final = max((tmp_path / "relax").iterdir()).read_text()
    assert final.count("bitc_or_pool_packed") >= 2 * 3, "three pools should run on packed bits"
    assert "_thr_packed" in final and "bitc_max_pool2d" in final  # the last pool stays float
    for batch in (1, 3):
        x = torch.randn(batch, 1, 16, 16)
        assert torch.equal(cm(x), cm.reference(x))


# --------------------------------------------------------------------------- numerics
class Fusible(nn.Module):
    """A threshold conv read by two binary convs (one packed input for both), and a residual added
    on the left, clamped to other bounds than hardtanh's."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1, bias=False)
        self.c1, self.b1 = nn.Conv2d(32, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32)
        self.c2, self.b2 = nn.Conv2d(32, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32)
        self.c3, self.b3 = nn.Conv2d(32, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, 5)

    def forward(self, x):
        x = F.hardtanh(self.stem(x))
        t = F.hardtanh(self.b1(self.c1(x)))
        y = torch.clamp(x + self.b2(self.c2(t)), -0.5, 2.0) + self.b3(self.c3(t))
        return self.fc(y.mean((2, 3)))


def test_fused_model_equals_the_reference(tmp_path, monkeypatch):
    monkeypatch.setenv("BITC_DUMP", str(tmp_path))
    torch.manual_seed(0)
    model = randomize_bn(Fusible()).eval()
    x = torch.randn(2, 3, 10, 10)
    cm = bc.compile(model, (x,), scheme="binary:act=binary")
    dumped = sorted(p.name for p in (tmp_path / "relax").iterdir())
    assert dumped[:5] == [
        "001_CanonicalizeBindings.py",
        "002_DeadCodeElimination.py",
        "003_bitc.FusePackedPool.py",
        "004_bitc.FusePackedOutput.py",
        "005_bitc.FuseResidualClip.py",
    ], dumped
    final = (tmp_path / "relax" / dumped[-1]).read_text()
    assert "_thr_packed" in final and "_res" in final
    assert_close(cm(x), cm.reference(x))


def test_kernels_a_fusion_replaces_are_never_built(monkeypatch):
    """The CPU lowering defers the binary convs a fusion may replace: c1's plain threshold kernel
    and c2's plain affine kernel are never built (their fused variants are), c3's plain kernel is
    built once after the fusions left it; the result equals the reference."""
    from bitcompiler.kernels import conv as conv_module

    built = []
    real = conv_module.binary_template

    def counting(spec, **variant):
        built.append("packed" if variant.get("packed") else "res" if variant.get("clip") else "plain")
        return real(spec, **variant)

    monkeypatch.setattr(conv_module, "binary_template", counting)
    torch.manual_seed(1)
    model = randomize_bn(Fusible()).eval()
    x = torch.randn(2, 3, 11, 11)  # a size no other test builds (kernels are built once per spec)
    cm = bc.compile(model, (x,), scheme="binary:act=binary")
    assert sorted(built) == ["packed", "plain", "res"], built
    assert_close(cm(x), cm.reference(x))
