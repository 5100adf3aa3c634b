"""The CPU's fusions into the integer stem conv and the AVX-512 popcount conv
(backends/cpu/fusions.py): a ReLU or clip in an int8 conv's epilogue, and a ResNet block's 1x1
projection shortcut computed in its first conv; Before/Expected modules and compiled models
against the reference."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
import tvm
from torch import nn
from tvm import relax

import bitcompiler as bc
from bitcompiler import kernels
from bitcompiler.backends.cpu.fusions import fuse_clamped_output
from bitcompiler.backends.relax_emit import emit_kernel
from bitcompiler.kernels.dense_avx2 import popcnt512_target
from tests.backends.test_cpu_fusions import (
    F32,
    I32,
    C,
    H,
    M,
    conv_call,
    conv_params,
    conv_spec,
    module,
    var,
)
from tests.conftest import randomize_bn

# --------------------------------------------------------------------------- clamped int8 conv
HOST = tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()})
STEM = kernels.ConvSpec(16, C, H, H, (3, 3), (1, 1), (1, 1), (1, 1), 1, 8, "uint", "int8", True, False)
needs_int8_conv = pytest.mark.skipif(
    not kernels.conv.clamps_output(STEM, HOST), reason="needs the x86 integer conv (AVX2)"
)


def int8_conv_call(bb, args: list, clip=None) -> relax.Var:
    """An int8-activation conv as the converter emits it (marked), or with ``clip`` the fused one."""
    name, out = "bitc_conv2d_int8", relax.TensorType((M, C, H, H), F32)
    if clip is None:
        about = {"op": "bit_conv2d", "name": name, "spec": dataclasses.asdict(STEM)}
        return emit_kernel(bb, kernels.conv2d_kernel(STEM, str(HOST)), name, args, out, about)
    return emit_kernel(bb, kernels.conv2d_kernel(STEM, str(HOST), clip=clip), name + "_clamped", args, out)


def int8_params() -> list[relax.Var]:
    return [
        var("xq", (M, 16, H, H), "int8"),
        var("xs", (M,)),
        var("p", (8, C, 3, 3, 1), I32),
        *(var(n, (C,)) for n in ("sc", "of", "bi")),
    ]


@needs_int8_conv
@pytest.mark.parametrize("op", ["relu", "clip"])
def test_a_relu_or_clip_of_an_int8_conv_goes_into_its_epilogue(op):
    params = int8_params()
    clamp = {"relu": lambda y: relax.op.nn.relu(y), "clip": lambda y: relax.op.clip(y, -1.0, 1.0)}[op]
    before = module(params, lambda bb, p: bb.emit(clamp(int8_conv_call(bb, p))))
    bounds = (0.0, None) if op == "relu" else (-1.0, 1.0)
    expected = module(params, lambda bb, p: int8_conv_call(bb, p, clip=bounds))
    with HOST:
        got = relax.transform.DeadCodeElimination()(fuse_clamped_output(HOST)(before))
    tvm.ir.assert_structural_equal(got, expected)


@needs_int8_conv
@pytest.mark.parametrize("why", ["the conv is read again", "a binary conv"])
def test_no_clamped_output_where_the_floats_stay_or_no_kernel_has_it(why):
    if why == "a binary conv":
        spec = conv_spec(threshold=False)
        mod = module(conv_params(spec), lambda bb, p: bb.emit(relax.op.nn.relu(conv_call(bb, spec, p))))
    else:

        def body(bb, p):
            y = int8_conv_call(bb, p)
            return bb.emit(relax.op.add(bb.emit(relax.op.nn.relu(y)), y))

        mod = module(int8_params(), body)
    with HOST:
        got = relax.transform.DeadCodeElimination()(fuse_clamped_output(HOST)(mod))
        tvm.ir.assert_structural_equal(got, relax.transform.DeadCodeElimination()(mod))


class ReluStem(nn.Module):
    """An ImageNet-style stem (conv, BN, ReLU, max pool) then a binary residual block; and a
    hardtanh stem (the CIFAR ResNets')."""

    def __init__(self, act: nn.Module):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 5, 2, 2, bias=False), nn.BatchNorm2d(32), act)
        self.pool = nn.MaxPool2d(3, 2, 1) if isinstance(act, nn.ReLU) else nn.Identity()
        self.c1, self.b1 = nn.Conv2d(32, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, 5)

    def forward(self, x):
        x = self.pool(self.stem(x))
        y = F.hardtanh(x + self.b1(self.c1(x)))
        return self.fc(y.mean((2, 3)))


@needs_int8_conv
@pytest.mark.parametrize("act", [nn.ReLU(), nn.Hardtanh()], ids=["relu", "hardtanh"])
def test_clamped_stem_model_equals_the_reference_bit_for_bit(act, tmp_path, monkeypatch):
    monkeypatch.setenv("BITC_DUMP", str(tmp_path))
    torch.manual_seed(0)
    model = randomize_bn(ReluStem(act)).eval()
    cm = bc.compile(model, (torch.randn(1, 3, 20, 20),), scheme="binary:act=binary")
    final = max((tmp_path / "relax").iterdir()).read_text()
    assert "_clamped" in final, "the stem's activation should be in its epilogue"
    for batch in (1, 3):
        x = torch.randn(batch, 3, 20, 20) * 2
        assert torch.equal(cm(x), cm.reference(x))


# --------------------------------------------------------------------------- projection shortcut
class Downsample(nn.Module):
    """A binary ResNet block that halves the map, with a 1x1 projection shortcut computed after its
    convs (as the CIFAR ResNets write it) or before them (``identity = self.downsample(x)`` first,
    as torchvision's and pytorchcv's blocks do)."""

    def __init__(self, shortcut_first: bool, size: int):
        super().__init__()
        self.first = shortcut_first
        self.stem = nn.Conv2d(3, 64, 3, padding=1, bias=False)
        self.c1, self.b1 = nn.Conv2d(64, 128, 3, 2, 1, bias=False), nn.BatchNorm2d(128)
        self.c2, self.b2 = nn.Conv2d(128, 128, 3, padding=1, bias=False), nn.BatchNorm2d(128)
        self.sc = nn.Sequential(nn.Conv2d(64, 128, 1, 2, bias=False), nn.BatchNorm2d(128))
        self.fc = nn.Linear(128, 5)

    def forward(self, x):
        x = F.hardtanh(self.stem(x))
        s = self.sc(x) if self.first else None
        y = self.b2(self.c2(F.hardtanh(self.b1(self.c1(x)))))
        y = F.hardtanh(y + (s if self.first else self.sc(x)))
        return self.fc(y.mean((2, 3)))


@pytest.mark.parametrize("size", [32, 16], ids=["pixel-chunks", "channel-blocks"])
@pytest.mark.parametrize("shortcut_first", [False, True], ids=["shortcut-last", "shortcut-first"])
def test_a_projection_shortcut_is_computed_in_the_blocks_first_conv(
    shortcut_first, size, tmp_path, monkeypatch
):
    """On a CPU with vector popcounts the block's first conv writes the shortcut's output too (one
    call, two outputs), whichever of the two the model computes first; the outputs equal the
    reference's bit for bit."""
    monkeypatch.setenv("BITC_DUMP", str(tmp_path))
    torch.manual_seed(2)
    model = randomize_bn(Downsample(shortcut_first, size)).eval()
    cm = bc.compile(model, (torch.randn(1, 3, size, size),), scheme="binary:act=binary")
    final = max((tmp_path / "relax").iterdir()).read_text()
    fused_here = popcnt512_target(HOST)
    assert ("_thr_packed_shortcut" in final) == fused_here
    assert ("_1x1" in final) != fused_here  # the shortcut's own kernel is not built where fused
    for batch in (1, 3):
        x = torch.randn(batch, 3, size, size)
        assert torch.equal(cm(x), cm.reference(x))
