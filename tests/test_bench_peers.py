"""The benchmark's peers run what their names say (an int8 peer computes in int8)."""

import pytest
import torch
from torch import nn

from bench import baselines


def test_torch_int8_peer_quantizes_a_bare_linear_root():
    # quantize_dynamic swaps only child modules: handed a bare Linear it returns fp32
    linear = nn.Linear(256, 256).eval()
    plain = torch.ao.quantization.quantize_dynamic(linear, {nn.Linear}, dtype=torch.qint8)
    with pytest.raises(RuntimeError, match="not int8"):
        baselines.assert_int8(plain)
    run = baselines.torch_int8_dynamic(linear)
    x = torch.randn(4, 256)
    got, fp32 = run(x), linear(x)
    assert not torch.equal(got, fp32)  # int8 rounding shows
    assert (got - fp32).abs().max() < 0.05 * fp32.abs().max()


def test_ort_int8_peer_uses_integer_ops(tmp_path):
    pytest.importorskip("onnxruntime")
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8)).eval()
    run = baselines.onnxruntime(model, torch.randn(1, 64), threads=1, int8=True)
    out = run(torch.randn(1, 64))[0]
    assert out.shape == (1, 8)


def test_lce_rows_say_when_lce_is_absent(tmp_path, monkeypatch):
    from bench import lce

    monkeypatch.setattr(lce, "LCE_PYTHON", tmp_path / "no-such-venv" / "bin" / "python")
    reason = lce.absent_reason()
    assert reason is not None and "make peers" in reason
    row = {"bench": "bconv", "batch": 1, "threads": 1, "bitc_ms": 0.2, "lce_absent": reason}
    assert reason in "\n".join(lce.markdown([row]))


@pytest.mark.slow
def test_lce_worker_runs_binary_ops():
    # where `make peers` built LCE: the converted model holds LCE's binary ops and times positive
    from bench import lce

    if lce.absent_reason():
        pytest.skip(lce.absent_reason())
    worker = lce.Worker(["dense"])
    try:
        ops = worker.ask("ops dense").split(",")
        assert "LceBconv2d" in ops and "LceQuantize" in ops and "FULLY_CONNECTED" not in ops
        assert float(worker.ask("time dense indirect 1 0.05")) > 0
        with pytest.raises(RuntimeError, match="error"):
            worker.ask("time nosuchmodel default 1 0.05")
    finally:
        worker.close()


def test_demo_cnn_peer_is_the_demos_float_model_and_ours_its_prepared_twin():
    from bench import models

    fp32, prepared = models.demo_models()
    # the torch fp32 peer holds plain float layers only (no quantizer modules), in eval mode
    assert {type(m).__name__ for m in fp32.modules()} <= {
        "Sequential", "Conv2d", "BatchNorm2d", "MaxPool2d", "Hardtanh", "Flatten", "Linear",
    }  # fmt: skip
    assert not fp32.training and not prepared.training
    assert any("Quant" in type(m).__name__ for m in prepared.modules())
    assert fp32(torch.randn(2, 1, 28, 28)).shape == prepared(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_threads_bench_calls_the_kernel_the_compiler_picks():
    """``bench threads`` times the whole call against the W1A1 kernel the lowering picks alone:
    the kernel it builds must be that one (AVX-512 ``vpop`` or AVX2 ``lanes``) and run."""
    from bench.threads import w1a1_kernel_call
    from bitcompiler.kernels.dense_avx2 import avx2_target

    if not avx2_target("llvm"):
        pytest.skip("the host has no AVX2 W1A1 dense kernel")
    w1a1_kernel_call(256)()


def test_threads_probe_runs_its_arithmetic_and_picks_free_core_rounds(monkeypatch):
    """The host probe of ``bench threads`` really computes its xorshift generators (LLVM cannot
    fold them away: its outputs are their values), and only rounds whose probe ran at least
    ``FREE_CORES`` faster at 2 threads, before and after the model, count as rounds with two
    free cores."""
    from bench import threads

    monkeypatch.setattr(threads, "PROBE_STEPS", 100)
    out = threads.probe_kernel()().numpy()
    mask = 2**64 - 1

    def chain(x):
        for _ in range(100):
            x ^= (x << 13) & mask
            x ^= x >> 7
            x ^= (x << 17) & mask
        return x

    chains = threads.PROBE_CHAINS
    want = [
        [[chain(88172645463325252 + (t * chains + c) * 8 + lane) for lane in range(8)] for c in range(chains)]
        for t in (0, 1)
    ]
    assert out.tolist() == want
    times = {"p1": [2.0] * 4, "p2": [1.0, 1.6, 1.1, 1.0], "q1": [2.0] * 4, "q2": [1.0, 1.0, 1.0, 1.5]}
    assert threads.free_core_rounds(times) == [0, 2]
