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
