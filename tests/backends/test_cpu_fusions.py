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
from bitcompiler.backends.cpu.fusions import fuse_packed_output, fuse_residual_clip
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
    assert dumped[:2] == ["001_bitc.FusePackedOutput.py", "002_bitc.FuseResidualClip.py"], dumped
    final = (tmp_path / "relax" / dumped[-1]).read_text()
    assert "_thr_packed" in final and "_res" in final
    assert_close(cm(x), cm.reference(x))


def test_kernels_a_fusion_replaces_are_never_built(monkeypatch):
    """The CPU lowering defers the binary convs a fusion may replace: c1's plain threshold kernel
    and c2's plain affine kernel are never built (their fused variants are), c3's plain kernel is
    built once after the fusions left it; the result equals the reference."""
    from bitcompiler.kernels import conv as conv_module

    built = []
    real = conv_module.binary_pm1_func

    def counting(spec, **variant):
        built.append("packed" if variant.get("packed") else "res" if variant.get("clip") else "plain")
        return real(spec, **variant)

    monkeypatch.setattr(conv_module, "binary_pm1_func", counting)
    torch.manual_seed(1)
    model = randomize_bn(Fusible()).eval()
    x = torch.randn(2, 3, 11, 11)  # a size no other test builds (kernels are built once per spec)
    cm = bc.compile(model, (x,), scheme="binary:act=binary")
    assert sorted(built) == ["packed", "plain", "res"], built
    assert_close(cm(x), cm.reference(x))
