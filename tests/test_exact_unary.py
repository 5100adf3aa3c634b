"""Sigmoid and tanh between int8 layers (an LSTM-like attention, squeeze-excitation gates) are
bit-identical in the compiled code and the reference: both evaluate one formulation
(``numerics.sigmoid32``/``tanh32``, ``bitc::exact_unary``) instead of PyTorch's and TVM's own."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import bitcompiler as bc
from bitcompiler.backends.cortex_m.qemu import missing_tools
from bitcompiler.quant import numerics


def _sweep() -> torch.Tensor:
    """Every region of both functions: a dense grid over [-100, 100], tiny magnitudes, the polynomial
    / exp switch of tanh, the clamps of exp, zeros and infinities."""
    tiny = torch.logspace(-30, 0, 20_000)
    edges = torch.tensor([0.0, -0.0, 0.625, -0.625, 87.0, -87.0, 88.0, -88.0, 200.0, -200.0])
    return torch.cat([torch.linspace(-100, 100, 400_001), tiny, -tiny, edges]).float()


class Gates(nn.Module):
    """DIA-Net's attention cell in small: two Linears summed, sigmoid and tanh gates (function,
    method and module forms), their products, then a Linear reading the gated state."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(16, 64)
        self.x2h, self.h2h = nn.Linear(64, 128), nn.Linear(64, 128)
        self.act = nn.Sigmoid()
        self.out = nn.Linear(32, 10)

    def forward(self, x):
        h = torch.relu(self.inp(x))
        i, f, c, o = (self.x2h(h) + self.h2h(h * 0.5)).chunk(4, dim=1)
        c = torch.sigmoid(f) * h[:, :32] + self.act(i) * c.tanh()
        return self.out(o.sigmoid() * torch.tanh(c))


class PlainGates(nn.Module):
    """The gates with only the ops the Cortex-M C bundle lowers (no chunk, no slices)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.a, self.b, self.out = (
            nn.Linear(16, 32),
            nn.Linear(32, 32),
            nn.Linear(32, 32),
            nn.Linear(32, 10),
        )

    def forward(self, x):
        h = torch.relu(self.inp(x))
        return self.out(torch.sigmoid(self.a(h)) * torch.tanh(self.b(h)))


def _gates(cls: type = Gates) -> nn.Module:
    torch.manual_seed(0)
    return cls().eval()


def _inputs(n: int = 1000) -> torch.Tensor:
    return 3 * torch.randn(n, 16, generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize(("fn", "ref"), [("sigmoid", torch.sigmoid), ("tanh", torch.tanh)])
def test_formulation_is_as_accurate_as_torch(fn, ref):
    x = _sweep()
    exact = ref(x.double())
    got = numerics.exact_unary(x, fn).double()
    big = exact.abs() > 1e-30
    assert float(((got - exact).abs() / exact.abs())[big].max()) < 2.5e-7
    assert float((got - exact).abs().max()) < 1e-7


@pytest.mark.parametrize("fn", ["sigmoid", "tanh"])
def test_cpu_kernel_equals_reference_bit_for_bit(fn):
    """The TIR formulation, products fenced as in the CPU pipeline, on the whole sweep: every bit
    equal to the reference (without the fences, LLVM fuses the polynomial into FMAs)."""
    import tvm
    from tvm import te

    from bitcompiler.backends.exact_float import TirFloat32, fence_products

    x = _sweep()
    X = te.placeholder((x.numel(),), "float32", "X")
    Y = te.compute(X.shape, lambda i: numerics.EXACT_UNARY[fn](X[i], TirFloat32()), name="Y")
    func = fence_products(te.create_prim_func([X, Y]).with_attr("global_symbol", "main"))
    lib = tvm.compile(tvm.IRModule({"main": func}), target=bc.Target("cpu").tvm_target())
    out = tvm.runtime.tensor(torch.zeros_like(x).numpy())
    lib["main"](tvm.runtime.tensor(x.numpy()), out)
    assert torch.equal(torch.from_numpy(out.numpy()), numerics.exact_unary(x, fn))


def test_gates_between_int8_layers_are_bit_exact():
    """W2A8, 1,000 inputs: no output differs in any bit (PyTorch's sigmoid against TVM's moved
    int8 codes of the next layer)."""
    cm = bc.compile(_gates(), (torch.randn(1, 16),), scheme="uniform:bits=2,act=8")
    targets = [str(n.target) for n in cm.graph.graph.nodes]
    assert sum("exact_unary" in t for t in targets) == 5
    assert not any(t.endswith(("sigmoid", "tanh")) or "Sigmoid" in t for t in targets)
    assert cm.report().float_ops["sigmoid"] == 3 and cm.report().float_ops["tanh"] == 2
    x = _inputs()
    assert torch.equal(cm(x), cm.reference(x))


def test_float_activations_keep_torch_functions():
    """``act=float`` makes no exactness promise: the graph keeps PyTorch's sigmoid and tanh."""
    cm = bc.compile(_gates(), (torch.randn(1, 16),), scheme="binary")
    assert not any("exact_unary" in str(n.target) for n in cm.graph.graph.nodes)


@pytest.mark.slow
@pytest.mark.skipif(bool(missing_tools()), reason="arm-none-eabi-gcc / qemu-system-arm missing")
def test_cortex_m_gates_are_bit_exact():
    """The C emitter of the same formulation (built with -ffp-contract=off) on Cortex-M4."""
    target = bc.Target("cortex-m4", count_instructions=False)
    cm = bc.compile(_gates(PlainGates), (torch.randn(1, 16),), target=target, scheme="uniform:bits=2,act=8")
    assert sum("exact_unary" in str(n.target) for n in cm.graph.graph.nodes) == 2
    x = _inputs(16)
    assert torch.equal(cm(x), cm.reference(x))


def test_onnx_export_writes_sigmoid_and_tanh(tmp_path):
    """QDQ export writes ONNX's own Sigmoid and Tanh for ``bitc::exact_unary``."""
    pytest.importorskip("onnxruntime")
    import onnx

    from tests.test_onnx import run_ort

    cm = bc.compile(_gates(), (torch.randn(1, 16),), scheme="uniform:bits=2,act=8")
    path = cm.export_onnx(tmp_path / "g.onnx", format="qdq")
    kinds = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert kinds.count("Sigmoid") == 3 and kinds.count("Tanh") == 2
    x = _inputs(8)
    ref = cm.reference(x)
    assert float((run_ort(path, x) - ref).abs().max()) <= 1e-4 * float(ref.abs().max())


def test_opencl_gates_are_bit_exact():
    """The same TE formulation through the GPU lowering (OpenCL on pocl; batch 1, as GPU plans are)."""
    from tests.gpu.test_gpu import _NO_OPENCL

    if _NO_OPENCL:
        pytest.skip(_NO_OPENCL)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the GPU plan's fixed batch
        cm = bc.compile(_gates(), (torch.randn(1, 16),), target="opencl", scheme="uniform:bits=2,act=8")
    for x in _inputs(8).split(1):
        assert torch.equal(cm(x), cm.reference(x))
