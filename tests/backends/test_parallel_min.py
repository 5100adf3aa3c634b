"""SerialBelow: a float op too small for a parallel launch runs on one thread, scheduled otherwise alike."""

import numpy as np
import pytest
import torch
import tvm
from torch import nn
from tvm import te, tirx
from tvm.s_tir.dlight.base import ScheduleRule

import bitcompiler as bc
from bench import zoo
from bitcompiler.backends.injective import Injective
from bitcompiler.backends.parallel_min import SerialBelow, work
from bitcompiler.backends.reduction import LaneReduction
from bitcompiler.kernels._common import PARALLEL_MIN, loops_pay
from tests.backends.test_reduction import _layer_norm, _legalized, _run

TARGET = tvm.target.Target({"kind": "llvm"})


def _add_gelu(rows, cols):
    """``gelu(a + b)`` over ``(M, rows, cols)`` float32, M symbolic: two blocks."""
    m = te.var("M", "int64")
    full = (m, tirx.IntImm("int64", rows), tirx.IntImm("int64", cols))
    a, b = (te.placeholder(full, "float32", n) for n in "AB")
    s = te.compute(full, lambda *i: a(*i) + b(*i), name="sum")
    y = te.compute(full, lambda *i: 0.5 * s(*i) * (1.0 + tirx.erf(s(*i) * 0.7071067811865476)), name="gelu")
    return te.create_prim_func([a, b, y])


def test_work_counts_block_instances_with_the_batch_as_one():
    assert work(_add_gelu(64, 256)) == 2 * 64 * 256
    func = _legalized(_layer_norm, (64, 256))
    assert 64 * 256 < work(func) < 8 * 64 * 256  # sums, variance, the normalized output


@pytest.mark.parametrize(("rows", "cols"), [(64, 1024), (64, 1023), (3, 5)])
def test_a_scheduled_stage_pays_as_its_unscheduled_work_counts(rows, cols):
    """``loops_pay`` counts one stage's loop instances (the batch as one) on a schedule, split or not."""
    sch = tvm.s_tir.Schedule(_add_gelu(rows, cols))
    stage = sch.get_loops(sch.get_sblock("gelu"))
    assert loops_pay(sch, stage) == (rows * cols >= PARALLEL_MIN)
    sch.split(stage[2], [None, 8] if cols % 8 == 0 else [None, cols])
    assert loops_pay(sch, sch.get_loops(sch.get_sblock("gelu"))) == (rows * cols >= PARALLEL_MIN)


@pytest.mark.parametrize(("rows", "cols"), [(64, 256), (64, 1024), (3, 5)])
def test_small_ops_lose_only_their_parallel_loop(rows, cols):
    func = _add_gelu(rows, cols)
    parallel = Injective().apply(func, TARGET, False)
    sch = SerialBelow(Injective()).apply(func, TARGET, False)
    assert parallel is not None and sch is not None
    text, ref = sch.mod["main"].script(), parallel.mod["main"].script()
    assert "T.parallel(" in ref
    assert ("T.parallel(" in text) == (work(func) >= PARALLEL_MIN)

    # the same schedule otherwise: the producer inlined, the same vector loops
    def serial(script):  # reprinted: serial loop nests print as T.grid
        return tvm.script.from_source(script.replace("T.parallel(", "range(")).script()

    assert serial(text) == serial(ref)
    rng = np.random.default_rng(rows)
    a, b = (rng.normal(size=(2, rows, cols)).astype("float32") for _ in range(2))
    lib = tvm.compile(
        tvm.IRModule({"main": sch.mod["main"].with_attr("global_symbol", "main")}), target=TARGET
    )
    y = tvm.runtime.tensor(np.zeros((2, rows, cols), "float32"))
    lib["main"](tvm.runtime.tensor(a), tvm.runtime.tensor(b), y)
    want = torch.nn.functional.gelu(torch.from_numpy(a + b)).numpy()
    assert np.abs(y.numpy() - want).max() <= 1e-5 * np.abs(want).max()


def test_a_small_layer_norm_keeps_its_vector_partial_sums_on_one_thread():
    func = _legalized(_layer_norm, (64, 256))
    sch = SerialBelow(LaneReduction()).apply(func, TARGET, False)
    text = sch.mod["main"].script()
    assert "_rf_update" in text and "T.vectorized(" in text and "T.parallel(" not in text, text
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(2, 64, 256)) * 4 + 1).astype("float32")
    w, b = (rng.normal(size=256).astype("float32") for _ in range(2))
    want = torch.nn.functional.layer_norm(
        torch.from_numpy(x), (256,), torch.from_numpy(w), torch.from_numpy(b)
    )
    got = _run(sch.mod["main"], x, w, b)
    assert np.abs(got - want.numpy()).max() <= 1e-5 * want.abs().max().item()


def test_rules_that_do_not_match_still_do_not():
    m = te.var("M", "int64")
    a = te.placeholder((m, tirx.IntImm("int64", 8)), "float32", "A")
    k = te.reduce_axis((0, 8), "k")
    s = te.compute((m,), lambda i: te.sum(a[i, k], axis=k), name="s")
    assert SerialBelow(Injective()).apply(te.create_prim_func([a, s]), TARGET, False) is None


def test_a_compiled_mixer_runs_its_small_float_ops_on_one_thread(tmp_path, monkeypatch):
    """An MLP-Mixer block at batch 1: LayerNorm, transposes, residual adds and the token-mixing
    GELU (256 x 128) on the calling thread, the channel-mixing GELU (64 x 1024) in parallel; the
    outputs within the float bar of the reference at any batch. (Float activations: with binary
    ones only the GELUs' signs are read, and no GELU is computed; tests/test_gelu_sign.py.)"""
    monkeypatch.setenv("BITC_DUMP", str(tmp_path))
    monkeypatch.setenv("BITC_CACHE", "off")
    torch.manual_seed(0)
    model = zoo.MLPMixer(depth=1).eval()
    cm = bc.compile(model, (torch.randn(1, 3, 32, 32),), scheme="binary")
    for batch in (1, 3):
        x = torch.randn(batch, 3, 32, 32)
        want = cm.reference(x)
        assert ((cm(x) - want).abs().max() <= 1e-5 * want.abs().max()).item()
    tir = {p.stem: p.read_text() for p in (tmp_path / "tir").iterdir()}
    serial = [n for n in tir if n.startswith(("layer_norm", "add", "transpose", "fused_transpose", "mean"))]
    assert serial and all("T.parallel(" not in tir[n] for n in serial), serial
    assert "T.parallel(" in tir["gelu1"] or "T.parallel(" in tir["gelu"]


class _OneTokenAttention(nn.Module):
    """Self-attention over one token (a ViT's last stage at a small input): ``attn @ v`` is a
    float matmul with a reduction of length 1, which TVM's GEMV rule matches and then asserts on."""

    def __init__(self, d: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.heads, self.qkv, self.proj = heads, nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = (q @ k.transpose(-2, -1)).softmax(-1)
        return self.proj((a @ v).transpose(1, 2).reshape(b, n, d))


def test_a_rule_that_fails_on_a_function_does_not_apply():
    class Failing(ScheduleRule):
        def apply(self, func, target, tunable):
            raise AssertionError

    assert SerialBelow(Failing()).apply(_add_gelu(8, 8), TARGET, False) is None
    torch.manual_seed(0)
    cm = bc.compile(_OneTokenAttention().eval(), (torch.randn(1, 1, 32),), scheme="binary:act=binary")
    x = torch.randn(3, 1, 32)
    assert torch.equal(cm(x), cm.reference(x))
