"""Cortex-M memory: activations at their own precision, the arena plan, boards' RAM limits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bitcompiler as bc
from bitcompiler.backends.cortex_m import ModelTooLarge, dense_c
from bitcompiler.backends.cortex_m.aot import Program, build_program
from bitcompiler.backends.cortex_m.qemu import INSTALL, missing_tools
from bitcompiler.capture import capture
from bitcompiler.errors import TargetError
from bitcompiler.passes.pipeline import PassContext, Pipeline
from bitcompiler.quant.schemes import Scheme
from tests.conftest import assert_close, randomize_bn

needs_toolchain = pytest.mark.skipif(
    bool(missing_tools()), reason=f"{', '.join(missing_tools())} missing; install with: {INSTALL}"
)


class MixedCNN(nn.Module):
    """int8 stem (first layer) read through hardtanh by a threshold binary conv whose max pool
    feeds a binary conv (both write packed signs, pooled as an OR), float relu / residual add /
    mean, int8 classifier."""

    def __init__(self, c: int = 32) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.c3, self.b3 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.c4, self.b4 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.fc = nn.Linear(c, 10)

    def forward(self, x):
        x = F.hardtanh(self.b1(self.c1(x)))
        x = F.max_pool2d(self.b2(self.c2(x)), 2)  # only binary convs read it: packed, OR-pooled
        x = F.relu(self.b3(self.c3(x)))  # float, relu in place
        x = x + F.hardtanh(self.b4(self.c4(x)))  # float add, in place
        return self.fc(x.mean((2, 3)))


def mixed_cnn(size: int = 12) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    torch.manual_seed(0)
    return randomize_bn(MixedCNN()), (torch.randn(3, 1, size, size),)


def program_for(
    model: nn.Module, x: tuple, target: str = "cortex-m4", backend: bool = False, **options
) -> Program:
    """The AOT program of ``model`` (no gcc, no QEMU): the generic walker's, or (``backend``) the
    one the Cortex-M backend builds (its C kernels, the float ops fused into the convs)."""
    t = bc.Target(target, **options)
    ctx = PassContext(scheme=Scheme.parse("binary:act=binary"), strict=False, target=t, example_inputs=x)
    gm = Pipeline.default(t).run(capture(model, x), ctx)
    builder = (
        dense_c.builder_for(t.capabilities.features, options.get("recompute", True)) if backend else None
    )
    return build_program(gm, x, builder=builder)


def check_plan(program: Program) -> None:
    """Replay the steps over the plan's byte ranges: every tensor a step reads still holds the
    value its writer put there (no later write of another tensor overlapped it), and a step
    writes over its own inputs only when it is elementwise and in place."""
    plan, io = program.plan, {program.input.storage: "in", program.output.storage: "out"}

    def span(name: str) -> tuple[str, int, int]:
        t = program.tensors[name]
        if t.storage in io:
            return io[t.storage], 0, t.nbytes
        lo = plan.offsets[t.storage]
        assert lo % 8 == 0 and lo + t.nbytes <= plan.arena_bytes, (name, lo, t.nbytes, plan.arena_bytes)
        return "arena", lo, lo + t.nbytes

    held: list[tuple[str, int, int, str]] = [(*span(program.input.name), program.input.value)]
    for step in program.steps:
        for r in step.reads:
            mem, lo, hi = span(r)
            value = program.tensors[r].value
            covering = [h for h in held if h[0] == mem and h[1] < hi and lo < h[2]]
            assert covering and all(h[3] == value for h in covering), f"{step.label}: {r} was overwritten"
            assert sum(min(hi, h[2]) - max(lo, h[1]) for h in covering) == hi - lo, f"{r} never written"
        for w in step.writes:
            mem, lo, hi = span(w)
            for r in step.reads:
                rm, rlo, rhi = span(r)
                if rm == mem and rlo < hi and lo < rhi:
                    assert r in step.inplace and (rlo, rhi) == (lo, hi), f"{step.label} writes over {r}"
            held = [h for h in held if not (h[0] == mem and h[1] < hi and lo < h[2])]
            held.append((mem, lo, hi, program.tensors[w].value))
    assert plan.peak_bytes <= plan.arena_bytes <= plan.naive_bytes


def test_plan_never_overlaps_live_tensors_of_a_mixed_model():
    program = program_for(*mixed_cnn())
    check_plan(program)
    labels = [s.label for s in program.steps]
    assert any("max_pool2d on sign bits" in label for label in labels), labels
    assert not any("(max_pool2d.default)" in label for label in labels), labels  # no float max pool
    # c1 (float epilogue, read through hardtanh) and c2 (threshold) write their readers' sign words
    for layer in ("c1", "c2"):
        conv = next(s for s in program.steps if s.label.startswith(f"{layer} "))
        assert program.tensors[conv.writes[0]].dtype == "int32", conv
        float_out = conv.label.split("(")[1].rstrip(")")  # its float map: nothing reads it
        assert not any(float_out in s.reads for s in program.steps), labels
    assert labels.count("pack_sign") == 1, labels  # c4's input only (relu's output, also added)
    shared = [
        s
        for s in program.steps
        if program.tensors[s.writes[0]].storage in {program.tensors[r].storage for r in s.inplace}
    ]
    assert len(shared) >= 2, [s.label for s in program.steps]  # relu and the residual add in place
    assert program.peak_layer in labels


def test_replay_catches_an_overlapping_plan():
    program = program_for(*mixed_cnn())
    step = next(s for s in program.steps if s.label.startswith("c4"))
    victim = program.tensors[step.reads[0]].storage  # the conv's packed input, moved onto its output
    program.plan.offsets[victim] = program.plan.offsets[program.tensors[step.writes[0]].storage]
    with pytest.raises(AssertionError):
        check_plan(program)


@needs_toolchain
def test_model_over_the_boards_ram_names_sizes_and_the_peak_layer():
    program = program_for(*mixed_cnn(size=32), backend=True)
    model, x = mixed_cnn(size=32)
    with pytest.raises(ModelTooLarge, match=r"RAM") as e:
        bc.compile(model, x, target=bc.Target("cortex-m4", ram_kb=16), scheme="binary:act=binary")
    msg = str(e.value)
    assert "16,384 B" in msg and f"{program.plan.arena_bytes:,} B" in msg, msg
    assert f"layer {program.peak_layer}," in msg and f"{program.plan.peak_bytes:,} B" in msg, msg
    largest = max(
        (t for t in program.tensors.values() if t.storage in program.plan.offsets), key=lambda t: t.nbytes
    )
    assert f"largest activations: {largest.name} {largest.nbytes:,} B" in msg, msg


@needs_toolchain
@pytest.mark.slow
@pytest.mark.parametrize("core", ["cortex-m3", "cortex-m4", "cortex-m55"])
def test_mixed_precision_cnn_matches_reference(core):
    model, x = mixed_cnn()
    cm = bc.compile(model, x, target=core, scheme="binary:act=binary")
    assert_close(cm(x[0]), cm.reference(x[0]))
    extra = cm.report().extra
    assert extra["arena_peak_bytes"] <= extra["arena_bytes"] <= extra["ram_bytes"]
    assert extra["arena_peak_layer"]


def test_conv_codes_decode_the_planes_as_the_numerics_do():
    from bitcompiler.kernels import codes_from_planes
    from bitcompiler.quant.numerics import conv_codes_to_planes

    g = torch.Generator().manual_seed(0)
    for bits, cg in ((8, 1), (3, 40), (2, 64)):
        q = torch.randint(0, 2**bits, (5, cg, 3, 3), generator=g)
        codes = codes_from_planes(conv_codes_to_planes(q, bits, "uint").numpy(), cg)
        assert codes.dtype == np.uint8 and codes.shape == (5, 3, 3, cg)
        assert np.array_equal(codes, q.permute(0, 2, 3, 1).numpy())


def test_int8_conv_stores_one_byte_per_weight():
    program = program_for(*mixed_cnn())
    stem = [w for w in program.weights if w.layer == "c1"]
    assert any(w.array.dtype == np.uint8 and w.array.size == 8 * 9 for w in stem), stem
    assert not any(w.symbol == "bitc_w_c1_planes" for w in stem)


# cortex-m4 RAM (B) when the memory issue was filed: bench/results.json of that day's run
# (784-128-10 MLP; the 256x256 dense compiled at that commit with the same scheme), per
# (model, scheme, target options)
FILED_RAM = {
    ("mlp", "binary:act=binary,first_last=quantize", ()): 4416,
    ("mlp", "tiled:p=4,act=binary,first_last=quantize", ()): 4416,
    ("mlp", "uniform:bits=8,act=8,first_last=quantize", ()): 4664,
    ("dense", "uniform:bits=8,act=8,first_last=quantize", ()): 2484,
    ("dense", "tiled:p=4,act=binary,first_last=quantize", ()): 2452,
    ("dense", "binary:act=binary,first_last=quantize", ()): 2196,  # W1A1: words read in place
    ("dense", "binary:first_last=quantize", (("act_tables", False),)): 2144,  # W1, float activations
}


def test_int8_dense_reads_its_row_without_an_unpacked_copy():
    """DSP cores: an int8 dense layer with K % 4 == 0 keeps no 16-bit copy of its row (XU)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)).eval()
    t = bc.Target("cortex-m4")
    x = (torch.randn(1, 64),)
    ctx = PassContext(
        scheme=Scheme.parse("uniform:bits=8,act=8,first_last=quantize"),
        strict=False,
        target=t,
        example_inputs=x,
    )
    gm = Pipeline.default(t).run(capture(net, x), ctx)
    program = build_program(gm, x, builder=dense_c.builder_for(t.capabilities.features))
    names = [n for s in program.steps for n in s.writes]
    assert any("dense_int8_dsp" in k.symbol for k in program.kernels), [k.symbol for k in program.kernels]
    assert not any(n.endswith("_xu") for n in names), names


@needs_toolchain
@pytest.mark.slow
@pytest.mark.parametrize(("model", "scheme", "options"), list(FILED_RAM))
def test_ram_no_larger_than_when_the_issue_was_filed(model, scheme, options):
    torch.manual_seed(0)
    if model == "mlp":
        net = nn.Sequential(nn.Flatten(), nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 10)).eval()
        x = torch.randn(1, 1, 28, 28)
    else:
        net, x = nn.Linear(256, 256), torch.randn(1, 256)
    cm = bc.compile(net, (x,), target=bc.Target("cortex-m4", **dict(options)), scheme=scheme)
    assert torch.allclose(cm(x), cm.reference(x), rtol=1e-5, atol=1e-5)
    assert cm.report().extra["ram_bytes"] <= FILED_RAM[(model, scheme, options)], cm.report().extra


DENSE_PATHS = {  # the 256x256 dense's two paths that keep to the filing-time RAM
    "w1a1": ("binary:act=binary,first_last=quantize", {}),
    "w1_float_no_tables": ("binary:first_last=quantize", {"act_tables": False}),
}


@needs_toolchain
@pytest.mark.slow
@pytest.mark.parametrize("path", list(DENSE_PATHS))
@pytest.mark.parametrize("core", ["cortex-m3", "cortex-m4", "cortex-m55"])
def test_dense_paths_without_extra_ram_match_the_reference(core, path):
    """W1A1 (M3/M4: the asm reading the packed words in place; bit for bit) and 1-bit weights x
    float activations without the partial-sum tables (float: within 1e-5)."""
    scheme, options = DENSE_PATHS[path]
    torch.manual_seed(0)
    net, x = nn.Linear(256, 256), torch.randn(1, 256)
    cm = bc.compile(net, (x,), target=bc.Target(core, **options), scheme=scheme)
    xs = torch.randn(3, 256) * 2
    extra = cm.report().extra
    (kernel,) = [k for label, k in extra["kernels"].items() if "bit_linear" in label]
    if path == "w1a1":
        assert "dense_binary" in kernel, kernel
        assert torch.equal(cm(xs), cm.reference(xs))
    else:
        assert "float_table" not in kernel and extra["act_tables"] is False, extra
        assert extra["arena_bytes"] == 0, extra
        assert_close(cm(xs), cm.reference(xs))


@needs_toolchain
@pytest.mark.slow
def test_act_tables_only_where_the_boards_ram_holds_them():
    """Default ``act_tables="auto"``: the tables (8 KiB for 256x256) on the QEMU board; on a board
    whose RAM cannot hold them with the stack, built again without them instead of failing."""
    torch.manual_seed(0)
    net, x = nn.Linear(256, 256), torch.randn(1, 256)
    scheme = "binary:first_last=quantize"
    big = bc.compile(net, (x,), target="cortex-m4", scheme=scheme).report().extra
    assert big["act_tables"] is True and big["arena_bytes"] >= 8192, big
    assert any("float_table" in k for k in big["kernels"].values()), big["kernels"]
    cm = bc.compile(net, (x,), target=bc.Target("cortex-m4", ram_kb=20), scheme=scheme)
    small = cm.report().extra
    assert small["act_tables"] is False and small["ram_bytes"] <= 2144, small
    assert_close(cm(x), cm.reference(x))
    assert big["instructions"] * 10 < small["instructions"], (big["instructions"], small["instructions"])
    with pytest.raises(ModelTooLarge, match="RAM"):  # forced tables: no fallback
        bc.compile(net, (x,), target=bc.Target("cortex-m4", ram_kb=20, act_tables=True), scheme=scheme)
    with pytest.raises(TargetError, match=r"act_tables='yes': use 'auto'"):
        bc.compile(net, (x,), target=bc.Target("cortex-m4", act_tables="yes"), scheme=scheme)
