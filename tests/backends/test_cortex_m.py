"""Cortex-M backend: C codegen + static AOT model + memory planner, run under QEMU."""

from __future__ import annotations

import re
import shutil
import subprocess

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bitcompiler as bc
from bitcompiler.backends import qemu_count
from bitcompiler.backends.cortex_m import CortexMLoweringError, ModelTooLarge, qemu
from bitcompiler.backends.cortex_m.memory_plan import Buffer, plan_arena
from bitcompiler.backends.cortex_m.qemu import INSTALL, missing_tools
from tests.conftest import assert_close, make_model, randomize_bn

needs_toolchain = pytest.mark.skipif(
    bool(missing_tools()), reason=f"{', '.join(missing_tools())} missing; install with: {INSTALL}"
)


class SmallCNN(nn.Module):
    """conv + BN (folded) + relu + max pool, binary conv + BN + avg pool, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.b1(self.c1(x))), 2)
        x = F.hardtanh(self.b2(self.c2(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def small_cnn() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    torch.manual_seed(0)
    return randomize_bn(SmallCNN()), (torch.randn(1, 1, 8, 8),)


def _bit_ops(cm) -> int:
    """Bit layers (bit_linear, bit_conv2d, tiled_*); bitc::window_mean is a float op."""
    return sum(
        1 for n in cm.graph.graph.nodes if "bitc" in str(n.target) and "window_mean" not in str(n.target)
    )


# --------------------------------------------------------------------------- memory planner
def test_planner_never_shares_bytes_between_live_tensors():
    rng = np.random.default_rng(0)
    buffers = []
    for i in range(60):
        first = int(rng.integers(0, 40))
        buffers.append(Buffer(f"t{i}", int(rng.integers(1, 3000)), first, first + int(rng.integers(0, 6))))
    plan = plan_arena(buffers)
    for a in buffers:
        for b in buffers:
            if a is b or not a.overlaps(b):
                continue
            oa, ob = plan.offsets[a.name], plan.offsets[b.name]
            assert oa + a.size <= ob or ob + b.size <= oa, (a, b)
    assert plan.arena_bytes <= plan.naive_bytes
    assert plan.arena_bytes < plan.naive_bytes  # 60 short lifetimes over 40 steps must reuse memory
    assert plan.arena_bytes >= max(b.size for b in buffers)


def test_planner_reuses_a_chain():
    plan = plan_arena([Buffer("a", 100, 0, 1), Buffer("b", 100, 1, 2), Buffer("c", 100, 2, 3)])
    assert plan.offsets["a"] == plan.offsets["c"] != plan.offsets["b"]
    assert (plan.arena_bytes, plan.naive_bytes) == (208, 312)  # 8-byte aligned


# --------------------------------------------------------------------------- end to end
@needs_toolchain
def test_binary_mlp_on_cortex_m4_matches_reference():
    model, x = make_model("mlp")
    cm = bc.compile(model, x, target="cortex-m4", scheme="binary:act=binary")
    assert _bit_ops(cm) == 3
    xs = torch.randn(3, *x[0].shape[1:])
    assert_close(cm(xs), cm.reference(xs))
    extra = cm.report().extra
    assert extra["board"] == "mps2-an386"
    assert extra["instructions"] > 0
    assert 0 < extra["arena_bytes"] <= extra["arena_naive_bytes"]
    assert extra["flash_bytes"] > extra["weights_flash_bytes"] > 0
    assert extra["ram_bytes"] >= extra["arena_bytes"]
    assert "instructions:" in str(cm.report())
    # deterministic: the same sample counts the same instructions again
    again = cm._runner.instructions(x[0][:1].numpy())
    assert again == extra["instructions"]


@needs_toolchain
def test_block_counter_equals_one_instruction_per_block(tmp_path):
    """The counter sums QEMU's translated blocks; stepping one instruction at a time (a log line
    per instruction) agrees, on a model with a conv, a binary conv, pooling and a float epilogue."""
    model, x = small_cnn()
    cm = bc.compile(model, x, target="cortex-m4", scheme="binary:act=binary")
    elf = cm._runner.exe
    (tmp_path / "bitc_in.bin").write_bytes(x[0][:1].numpy().astype("<f4").tobytes())
    log = tmp_path / "trace.log"
    cmd = [*qemu._qemu_cmd(cm._runner.device, elf), "-singlestep", "-d", "exec,nochain", "-D", str(log)]
    subprocess.run(cmd, cwd=tmp_path, check=True, capture_output=True, timeout=300)
    begin, end = (qemu.symbol_address(elf, s) for s in ("bitc_marker_begin", "bitc_marker_end"))
    pcs = [int(m.group(1), 16) for m in map(qemu_count._TRACE.match, log.read_text().splitlines()) if m]
    i, j = pcs.index(begin), pcs.index(end)
    assert cm.report().extra["instructions"] == j - i - 1 > 1000


@needs_toolchain
def test_binary_cnn_on_cortex_m4_matches_reference(tmp_path):
    model, x = small_cnn()
    cm = bc.compile(
        model, x, target=bc.Target("cortex-m4", count_instructions=False), scheme="binary:act=binary"
    )
    assert _bit_ops(cm) == 3
    assert not any("batch_norm" in str(n.target) for n in cm.graph.graph.nodes)  # BN folded
    xs = torch.randn(2, 1, 8, 8)
    assert_close(cm(xs), cm.reference(xs))

    # the exported bundle builds by itself with its own Makefile and runs to the same numbers
    out = cm.export(tmp_path / "bundle")
    for name in ("model.h", "model.c", "kernels.c", "weights.c", "Makefile", "README.md", "linker.ld"):
        assert (out / name).exists()
    assert "int bitc_run(const float *in, float *out);" in (out / "model.h").read_text()
    assert "malloc" not in (out / "model.c").read_text() + (out / "kernels.c").read_text()
    (out / "app.elf").unlink()
    subprocess.run(["make", "-s", "-C", str(out)], check=True, capture_output=True)
    (out / "bitc_in.bin").write_bytes(xs[:1].numpy().astype("<f4").tobytes())
    run = subprocess.run(["make", "-s", "-C", str(out), "run"], capture_output=True, timeout=120, check=False)
    assert run.returncode == 0, run.stderr
    got = np.frombuffer((out / "bitc_out.bin").read_bytes(), dtype="<f4").reshape(1, -1)
    assert_close(torch.from_numpy(got.copy()), cm.reference(xs[:1]))


@needs_toolchain
def test_tiled_mlp_on_cortex_m4_matches_reference():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 10))
    x = (torch.randn(1, 1, 28, 28),)
    cm = bc.compile(net, x, target="cortex-m4", scheme="tiled:p=4,act=binary,first_last=quantize")
    ops = [str(n.target) for n in cm.graph.graph.nodes if "bitc" in str(n.target)]
    assert ops == ["bitc.tiled_linear.default", "bitc.bit_linear.default"]  # fc1 tiled, fc2 binary
    kernels_c = (cm._runner.bundle / "kernels.c").read_text()
    assert "_tiled_rows_binary_784x128_p4" in kernels_c and "bitc_tiled_expand" in kernels_c
    # the tile (R = 32 distinct rows of 25 words) is stored once, not the 128 rows
    assert re.search(r"const int32_t bitc_w_\w*tile\[800\]", (cm._runner.bundle / "weights.c").read_text())
    xs = torch.randn(2, 1, 28, 28)
    assert torch.equal(cm(xs), cm.reference(xs))  # binary activations: integer sums, exact


@needs_toolchain
@pytest.mark.parametrize("core", ["cortex-m3", "cortex-m4"])
def test_popcount_sums_fuse_three_words_per_fold(core):
    """Two rows a pass: per row two carry-save groups of three words and one single word; the
    nibble counts summed by USADA8 (M4) or folded to bytes (M3)."""
    torch.manual_seed(0)
    x = (torch.randn(1, 224),)
    cm = bc.compile(nn.Linear(224, 8), x, target=core, scheme="binary:act=binary,first_last=quantize")
    asm = (cm._runner.bundle / "kernels.c").read_text().split("dense_binary_pm11_224x8")[-1].split("#else")[0]
    assert asm.count("bic r5, r5, r4") == 4 and asm.count("ldr r4, [r12], #4") == 2
    assert asm.count("usada8") == (12 if core == "cortex-m4" else 0)
    xs = torch.randn(3, 224)
    assert torch.equal(cm(xs), cm.reference(xs))


@needs_toolchain
def test_model_too_big_for_flash_names_sizes_and_layers():
    model, x = make_model("mlp")
    with pytest.raises(ModelTooLarge, match=r"flash.*fc1") as e:
        bc.compile(model, x, target=bc.Target("cortex-m4", flash_kb=4), scheme="binary")
    assert "4,096 B" in str(e.value)


@needs_toolchain
def test_unsupported_op_is_a_clear_error():
    model, x = make_model("transformer")
    with pytest.raises(CortexMLoweringError, match=r"op aten\.\w+.*no Cortex-M lowering"):
        bc.compile(model, x, target="cortex-m4", scheme="binary")


def test_board_must_match_core():
    from bitcompiler.backends.cortex_m.boards import board_for

    assert board_for(bc.Target("cortex-m55")).name == "mps3-an547"
    with pytest.raises(ValueError, match="mps2-an385 has a cortex-m3"):
        board_for(bc.Target("cortex-m4", board="mps2-an385"))


@needs_toolchain
@pytest.mark.slow
@pytest.mark.parametrize("core", ["cortex-m3", "cortex-m4", "cortex-m7", "cortex-m55"])
def test_cnn_on_every_board(core):
    model, x = small_cnn()
    cm = bc.compile(model, x, target=core, scheme="binary:act=binary")
    assert_close(cm(x[0]), cm.reference(x[0]))
    assert cm.report().extra["instructions"] > 0


def test_missing_toolchain_message_has_install_command(monkeypatch):
    from bitcompiler.backends.cortex_m import qemu

    monkeypatch.setattr(shutil, "which", lambda _name: None)
    with pytest.raises(qemu.ToolchainMissing, match="apt-get install gcc-arm-none-eabi"):
        qemu.require_toolchain()
