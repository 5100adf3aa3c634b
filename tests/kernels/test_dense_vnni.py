"""The AVX-512 VNNI W2A8 dense kernel against numerics.bit_linear, and its choice per target."""

import numpy as np
import pytest
import torch

from bitcompiler.kernels import DenseSpec, dense_int8, dense_vnni, relaid_dense_kernel
from bitcompiler.quant import numerics as nu
from tests.kernels._util import (
    act_inputs,
    assert_close,
    build,
    epilogue_params,
    llvm_ir_beside_another,
    parallel_workspaces,
    random_codes,
)

host = pytest.mark.skipif(not dense_vnni.vnni_target("llvm"), reason="host CPU has no AVX-512 VNNI")

ZNVER4 = {"kind": "llvm", "mcpu": "znver4"}
ICELAKE = {"kind": "llvm", "mcpu": "icelake-server"}
HASWELL = {"kind": "llvm", "mcpu": "haswell"}  # AVX2, no AVX-512
SKYLAKE = {"kind": "llvm", "mcpu": "skylake-avx512"}  # AVX-512 without VNNI
PLAIN = {"kind": "llvm", "mcpu": "x86-64"}


def _planes(q: torch.Tensor) -> torch.Tensor:
    return nu.code_to_planes(q, 2, "uint")


def _run(spec, q, x, ep, float_input):
    planes = _planes(q)
    w = dense_vnni.vnni_w2_layout(dense_int8.weight_codes(planes.numpy(), spec.in_features))
    run = build(dense_vnni.vnni_w2_dense_func(spec, float_input))
    inputs = [x] if float_input else act_inputs(x, "int8")
    (y,) = run(inputs + [w] + ep, [((x.shape[0], spec.out_features), "float32")])
    return y


def _edge_codes(n: int, k: int, g: torch.Generator) -> torch.Tensor:
    """Random codes, then rows of all 3, all 0, and 0..3 cycling through every byte position."""
    q = random_codes((n, k), 2, "uint", g)
    q[0], q[1], q[2] = 3, 0, torch.arange(k) % 4
    return q


def test_layout_holds_the_codes():
    g = torch.Generator().manual_seed(1)
    q = _edge_codes(5, 512, g)
    w = dense_vnni.vnni_w2_layout(dense_int8.weight_codes(_planes(q).numpy(), 512))
    assert w.shape == (5, 128) and w.dtype == np.uint8
    # byte L of chunk c, bits 2j..2j+1: the code of k = 256c + 64j + L
    back = np.stack([(w.reshape(5, 2, 64) >> (2 * j)) & 3 for j in range(4)], axis=2).reshape(5, 512)
    assert np.array_equal(back, q.numpy())


@host
@pytest.mark.parametrize("k, n", [(256, 8), (768, 7), (4096, 4)])
@pytest.mark.parametrize("float_input", [True, False])
def test_accumulators_exact(k, n, float_input):
    """Integer x with max|x| = 127 in each row quantize to themselves with scale 1.0, so
    ``Y = 1.0 * acc + 1.0 * sumx + 0`` is the integer sum: it must equal the int64 product bit for bit,
    with every code at every position of a byte (a wrong mask, shift or layout changes it)."""
    g = torch.Generator().manual_seed(k + n)
    q = _edge_codes(n, k, g)
    x = torch.randint(-127, 128, (3, k), generator=g).float()
    x[:, 5] = torch.tensor([127.0, -127.0, 127.0])
    x[1] = -127.0  # the largest negative products
    spec = DenseSpec(k, n, 2, "uint", "int8", True, False)
    ep = [torch.ones(n), torch.ones(n), torch.zeros(n)]
    y = _run(spec, q, x, ep, float_input)
    xi = x.numpy().astype(np.int64)
    want = xi @ q.numpy().astype(np.int64).T + xi.sum(1, keepdims=True)
    assert np.array_equal(y, want.astype(np.float32))
    ref = nu.bit_linear(x, _planes(q), k, "uint", "int8", *ep)
    assert torch.equal(torch.from_numpy(y), ref)


@host
@pytest.mark.parametrize("k, n", [(256, 6), (1024, 12)])
@pytest.mark.parametrize("has_offset, threshold", [(True, False), (False, True), (False, False)])
@pytest.mark.parametrize("float_input", [True, False])
def test_matches_reference(k, n, has_offset, threshold, float_input):
    spec = DenseSpec(k, n, 2, "uint", "int8", has_offset, threshold)
    g = torch.Generator().manual_seed(k + n + 2 * has_offset + threshold)
    q = _edge_codes(n, k, g)
    ep, kw = epilogue_params(n, threshold, g, has_offset, k * 4)
    if threshold:
        kw.update(scale=torch.ones(n), offset=torch.zeros(n), bias=torch.zeros(n))
    for m in (1, 5):
        x = torch.randn(m, k, generator=g)
        x[0, 3] = 0.0
        y = _run(spec, q, x, ep, float_input)
        ref = nu.bit_linear(x, _planes(q), k, "uint", "int8", **kw)
        if threshold:  # decisions on the exact integer sums
            assert np.array_equal(y, ref.numpy())
        else:
            assert_close(y, ref)


@host
def test_threshold_edges_exact():
    """Thresholds at the exact sum, one above and one below, with every code 3 against x = -127."""
    k, n = 4096, 4
    spec = DenseSpec(k, n, 2, "uint", "int8", False, True)
    acc = -3 * 127 * k
    ts, th = torch.ones(n, dtype=torch.int32), torch.tensor([acc, acc + 1, acc - 1, 0], dtype=torch.int32)
    for float_input in (True, False):
        y = _run(spec, torch.full((n, k), 3), -torch.ones(2, k), [ts, th], float_input)
        assert y.tolist() == [[1.0, -1.0, 1.0, -1.0]] * 2


def test_choice_per_target():
    spec = DenseSpec(512, 64, 2, "uint", "int8", True, False)
    planes = _planes(torch.randint(0, 4, (64, 512))).numpy()
    for target in (ZNVER4, ICELAKE):
        relaid = relaid_dense_kernel(spec, planes, target)
        assert relaid is not None and relaid.suffix == "vnni" and relaid.float_input
        assert "vpdpbusd.512" in relaid.func.script()
        quantized = relaid_dense_kernel(spec, planes, target, fuse_quantizer=False)
        assert quantized is not None and quantized.suffix == "vnni" and not quantized.float_input
    for target in (HASWELL, SKYLAKE):  # the portable fallback: the AVX2 vpmaddubsw kernel
        relaid = relaid_dense_kernel(spec, planes, target)
        assert relaid is not None and relaid.suffix == "il" and "vpdpbusd" not in relaid.func.script()
    assert relaid_dense_kernel(spec, planes, PLAIN) is None
    assert relaid_dense_kernel(spec, planes, "c") is None
    assert not dense_vnni.vnni_target({"kind": "llvm", "mtriple": "aarch64-linux-gnu"})


def test_refuses_other_layers():
    for spec in (
        DenseSpec(300, 4, 2, "uint", "int8", True, False),  # K % 256
        DenseSpec(256, 4, 3, "uint", "int8", True, False),  # 3 bits
        DenseSpec(256, 4, 2, "uint", "float", True, False),
    ):
        assert not dense_vnni.fits(spec)
        with pytest.raises(ValueError, match="VNNI W2A8"):
            dense_vnni.vnni_w2_dense_func(spec)
    planes = _planes(torch.randint(0, 4, (4, 300))).numpy()
    relaid = relaid_dense_kernel(DenseSpec(300, 4, 2, "uint", "int8", True, False), planes, ZNVER4)
    assert relaid is None  # K % 256: the planes kernel


@pytest.mark.parametrize("float_input", [True, False])
def test_no_heap_workspace_in_parallel_tasks(float_input):
    """The 16 accumulators stay stack arrays (registers): none is a heap workspace per task."""
    import tvm

    spec = DenseSpec(512, 64, 2, "uint", "int8", True, False)
    ll = llvm_ir_beside_another(dense_vnni.vnni_w2_dense_func(spec, float_input), tvm.target.Target(ZNVER4))
    tasks = parallel_workspaces(ll)
    assert tasks and tasks == [0] * len(tasks)


@host
def test_compile_uses_vnni_kernel():
    """A Linear quantizes inside the kernel (one call); a 1x1 conv's pixel rows come quantized."""
    import bitcompiler as bc
    from tests.backends.test_lower import kernels_called
    from tests.conftest import assert_close as assert_close_t

    torch.manual_seed(0)
    scheme = "uniform:bits=2,act=8,first_last=quantize"
    dense = torch.nn.Sequential(torch.nn.Linear(512, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10)).eval()
    conv = torch.nn.Sequential(torch.nn.Conv2d(256, 32, 1), torch.nn.ReLU()).eval()
    for model, shape, name in ((dense, (512,), "512x64"), (conv, (256, 3, 3), "256x32")):
        cm = bc.compile(model, (torch.randn(1, *shape),), scheme=scheme)
        names = kernels_called(cm)
        assert any(name in n and n.endswith("_vnni") for n in names), names
        if model is dense:
            assert not any("quantize" in n for n in names[:1]), names  # no quantizer before the first layer
        for batch in (1, 3):
            x = torch.randn(batch, *shape)
            assert_close_t(cm(x), cm.reference(x))
