"""AVX2 dense kernels (int8 ``vpmaddubsw``, float ``vpermps`` tables) against numerics.bit_linear."""

import numpy as np
import pytest
import torch

from bitcompiler.kernels import DenseSpec, dense_avx2, dense_int8, dense_kernel, dense_vnni
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

pytestmark = pytest.mark.skipif(not dense_avx2.avx2_target("llvm"), reason="host CPU has no AVX2")

# K = 20: a tail only; 600: two 256-blocks + a tail of 88 (2 full words, one partial)
INT8_WEIGHTS = [("pm1", 1, False), ("uint", 1, True), ("uint", 2, True), ("uint", 3, False), ("uint", 4, True),
                ("uint", 5, True), ("uint", 7, True)]  # fmt: skip


def _run(spec, planes, x, ep):
    run = build(dense_kernel(spec))
    (y,) = run(act_inputs(x, spec.act) + [planes] + ep, [((x.shape[0], spec.out_features), "float32")])
    return y


@pytest.mark.parametrize("k, n", [(20, 6), (600, 7)])
@pytest.mark.parametrize("code, bits, has_offset", INT8_WEIGHTS)
@pytest.mark.parametrize("threshold", [False, True])
def test_int8_matches_reference(k, n, code, bits, has_offset, threshold):
    spec = DenseSpec(k, n, bits, code, "int8", has_offset, threshold)
    assert "pmadd.ub.sw" in dense_kernel(spec).script()  # the AVX2 kernel was chosen
    g = torch.Generator().manual_seed(k + 13 * bits + n)
    planes = nu.code_to_planes(random_codes((n, k), bits, code, g), bits, code)
    ep, kw = epilogue_params(n, threshold, g, has_offset, k * 2**bits)
    if threshold:
        kw.update(scale=torch.ones(n), offset=torch.zeros(n), bias=torch.zeros(n))
    for m in (1, 5, 64):
        x = torch.randn(m, k, generator=g)
        y = _run(spec, planes, x, ep)
        ref = nu.bit_linear(x, planes, k, code, "int8", **kw)
        if threshold:  # the integer accumulator is exact: identical decisions
            assert np.array_equal(y, ref.numpy())
        else:
            assert_close(y, ref)


@pytest.mark.parametrize("bits", [2, 4, 5, 7])
def test_int8_largest_products_exact(bits):
    """Every code at 2^B - 1 against x = -127: int16 partial sums must neither saturate nor wrap."""
    k, n = 4096 + 40, 4
    spec = DenseSpec(k, n, bits, "uint", "int8", False, True)
    planes = nu.code_to_planes(torch.full((n, k), 2**bits - 1), bits, "uint")
    acc = -(2**bits - 1) * 127 * k
    ts, th = torch.ones(n, dtype=torch.int32), torch.tensor([acc, acc + 1, acc - 1, 0], dtype=torch.int32)
    y = _run(spec, planes, -torch.ones(2, k), [ts, th])
    assert y.tolist() == [[1.0, -1.0, 1.0, -1.0]] * 2  # acc >= acc, not >= acc + 1: exact


def _run_interleaved(spec, planes, x, ep):
    run = build(dense_int8.int8_dense_func(spec, interleaved=True))
    pil = torch.from_numpy(dense_int8.interleave_w2(planes.numpy()))
    (y,) = run(act_inputs(x, "int8") + [pil] + ep, [((x.shape[0], spec.out_features), "float32")])
    return y


@pytest.mark.parametrize("k, n", [(256, 6), (768, 7)])
@pytest.mark.parametrize("has_offset, threshold", [(True, False), (False, True), (False, False)])
def test_int8_w2_interleaved_matches_reference(k, n, has_offset, threshold):
    spec = DenseSpec(k, n, 2, "uint", "int8", has_offset, threshold)
    assert dense_int8.w2_interleaved_fits(spec)
    g = torch.Generator().manual_seed(k + n)
    planes = nu.code_to_planes(random_codes((n, k), 2, "uint", g), 2, "uint")
    ep, kw = epilogue_params(n, threshold, g, has_offset, k * 4)
    if threshold:
        kw.update(scale=torch.ones(n), offset=torch.zeros(n), bias=torch.zeros(n))
    for m in (1, 5):
        x = torch.randn(m, k, generator=g)
        y = _run_interleaved(spec, planes, x, ep)
        ref = nu.bit_linear(x, planes, k, "uint", "int8", **kw)
        if threshold:
            assert np.array_equal(y, ref.numpy())
        else:
            assert_close(y, ref)


@pytest.mark.parametrize("code_value, x_value", [(3, -1.0), (3, 1.0), (2, -1.0)])
def test_int8_w2_interleaved_extremes_exact(code_value, x_value):
    """Every code at its largest against x = +-127: the scaled int16 sums (up to 16 x 3 x 127 x 4)
    must neither saturate nor lose bits when shifted back."""
    k, n = 4096, 4
    spec = DenseSpec(k, n, 2, "uint", "int8", False, True)
    planes = nu.code_to_planes(torch.full((n, k), code_value), 2, "uint")
    acc = int(code_value * 127 * k * x_value)
    ts, th = torch.ones(n, dtype=torch.int32), torch.tensor([acc, acc + 1, acc - 1, 0], dtype=torch.int32)
    y = _run_interleaved(spec, planes, torch.full((2, k), x_value), [ts, th])
    assert y.tolist() == [[1.0, -1.0, 1.0, float(acc >= 0) * 2 - 1]] * 2


def test_interleave_w2_refuses_other_layers():
    for spec in (
        DenseSpec(300, 4, 2, "uint", "int8", True, False),
        DenseSpec(256, 4, 3, "uint", "int8", True, False),
    ):
        assert not dense_int8.w2_interleaved_fits(spec)
        with pytest.raises(ValueError, match="interleaved"):
            dense_int8.int8_dense_func(spec, interleaved=True)


@pytest.mark.parametrize("k, n", [(20, 8), (100, 16), (4129, 24)])
@pytest.mark.parametrize("code, bits, has_offset", [("pm1", 1, False), ("uint", 1, True), ("uint", 3, True),
                                                    ("uint", 8, False)])  # fmt: skip
def test_float_matches_reference(k, n, code, bits, has_offset):
    spec = DenseSpec(k, n, bits, code, "float", has_offset, False)
    assert "permps" in dense_kernel(spec).script()
    g = torch.Generator().manual_seed(k + 7 * bits + n)
    planes = nu.code_to_planes(random_codes((n, k), bits, code, g), bits, code)
    ep, kw = epilogue_params(n, False, g, has_offset, k)
    for m in (1, 5, 37, 64):  # 37: tables built for 16 batch rows at a time, the last chunk partial
        x = torch.randn(m, k, generator=g)
        assert_close(_run(spec, planes, x, ep), nu.bit_linear(x, planes, k, code, "float", **kw))


def test_selection_falls_back():
    """bits = 8 (u8 codes overflow vpmaddubsw), N % 8 (float lanes) and non-AVX2 targets: the schedule."""
    int8 = DenseSpec(64, 8, 8, "uint", "int8", True, False)
    odd = DenseSpec(64, 12, 1, "pm1", "float", False, False)
    w2a8 = DenseSpec(64, 8, 2, "uint", "int8", True, False)
    assert "pmadd" not in dense_kernel(int8).script()
    assert "permps" not in dense_kernel(odd).script()
    assert "pmadd" not in dense_kernel(w2a8, target={"kind": "llvm", "mcpu": "x86-64"}).script()
    assert "pmadd" not in dense_kernel(w2a8, target="c").script()
    assert not dense_avx2.avx2_target({"kind": "llvm", "mtriple": "aarch64-linux-gnu"})


def test_compile_uses_interleaved_w2a8_kernel():
    import bitcompiler as bc
    from tests.backends.test_lower import kernels_called
    from tests.conftest import assert_close as assert_close_t

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(512, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10)).eval()
    cm = bc.compile(model, (torch.randn(1, 512),), scheme="uniform:bits=2,act=8,first_last=quantize")
    names = kernels_called(cm)
    suffix = "_vnni" if dense_vnni.vnni_target("llvm") else "_il"  # AVX-512 VNNI first (test_dense_vnni.py)
    assert any("512x64" in name and name.endswith(suffix) for name in names), names
    assert not any("64x10" in name and name.endswith(suffix) for name in names), names  # K=64: planes
    for batch in (1, 3):
        x = torch.randn(batch, 512)
        assert_close_t(cm(x), cm.reference(x))


@pytest.mark.parametrize("k, n", [(48, 8), (100, 10), (4096 + 40, 4)])
@pytest.mark.parametrize("has_offset, threshold", [(True, False), (False, True)])
def test_int8_codes_matches_reference(k, n, has_offset, threshold):
    spec = DenseSpec(k, n, 8, "uint", "int8", has_offset, threshold)
    assert dense_int8.codes_fits(spec)
    g = torch.Generator().manual_seed(k + n)
    q = random_codes((n, k), 8, "uint", g)
    q[0] = 255  # the largest products: 2 x 255 x 127 per int32 pair sum
    planes = nu.code_to_planes(q, 8, "uint")
    codes = dense_int8.weight_codes(planes.numpy(), k)
    assert np.array_equal(codes, q.numpy())  # the same bits, one byte per weight
    ep, kw = epilogue_params(n, threshold, g, has_offset, k * 255)
    if threshold:
        kw.update(scale=torch.ones(n), offset=torch.zeros(n), bias=torch.zeros(n))
    run = build(dense_int8.int8_codes_dense_func(spec))
    for m in (1, 5):
        x = torch.randn(m, k, generator=g)
        x[:, 0] = -100.0  # x quantizes to -127 there
        (y,) = run(act_inputs(x, "int8") + [torch.from_numpy(codes)] + ep, [((m, n), "float32")])
        ref = nu.bit_linear(x, planes, k, "uint", "int8", **kw)
        if threshold:
            assert np.array_equal(y, ref.numpy())
        else:
            assert_close(y, ref)


def test_compile_uses_codes_kernel_for_8bit_layers():
    import bitcompiler as bc
    from tests.backends.test_lower import kernels_called
    from tests.conftest import assert_close as assert_close_t

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(48, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10)).eval()
    cm = bc.compile(model, (torch.randn(1, 48),), scheme="uniform:bits=8,act=8,first_last=quantize")
    names = kernels_called(cm)
    assert sum(name.endswith("_codes") for name in names) == 2, names
    for batch in (1, 3):
        x = torch.randn(batch, 48)
        assert_close_t(cm(x), cm.reference(x))


@pytest.mark.parametrize("code, bits, has_offset", [("pm1", 1, False), ("uint", 3, True)])
def test_float_rows8_layout_matches_reference(code, bits, has_offset):
    k, n = 100, 16
    spec = DenseSpec(k, n, bits, code, "float", has_offset, False)
    g = torch.Generator().manual_seed(bits)
    planes = nu.code_to_planes(random_codes((n, k), bits, code, g), bits, code)
    ep, kw = epilogue_params(n, False, g, has_offset, k)
    p8 = torch.from_numpy(dense_avx2.rows8_layout(planes.numpy()))
    assert p8.shape == planes.shape and not torch.equal(p8, planes)
    run = build(dense_avx2.float_dense_func(spec, rows8=True))
    for m in (1, 3):
        x = torch.randn(m, k, generator=g)
        (y,) = run([x, p8] + ep, [((m, n), "float32")])
        assert_close(y, nu.bit_linear(x, planes, k, code, "float", **kw))


def test_compile_uses_rows8_float_kernel():
    import bitcompiler as bc
    from tests.backends.test_lower import kernels_called
    from tests.conftest import assert_close as assert_close_t

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10)).eval()
    cm = bc.compile(model, (torch.randn(1, 64),), scheme="binary:first_last=quantize")
    names = kernels_called(cm)
    assert any("64x32" in name and name.endswith("_r8") for name in names), names
    for batch in (1, 3):
        x = torch.randn(batch, 64)
        assert_close_t(cm(x), cm.reference(x))


@pytest.mark.parametrize(
    "k, n, bits, code, act, has_offset",
    [(512, 256, 2, "uint", "int8", True), (520, 64, 7, "uint", "int8", True), (512, 256, 1, "pm1", "float", False),
     (512, 256, 2, "uint", "float", True)],
)  # fmt: skip
def test_no_heap_workspace_in_parallel_tasks(k, n, bits, code, act, has_offset):
    """The sums and every value of a parallel task are registers or stack arrays, built as the VM
    builds the kernel: no task allocates a heap workspace (a "local" block or a named value
    would be one, allocated per task)."""
    tasks = parallel_workspaces(
        llvm_ir_beside_another(dense_kernel(DenseSpec(k, n, bits, code, act, has_offset, False)))
    )
    assert tasks and tasks == [0] * len(tasks)
