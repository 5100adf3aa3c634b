import re

import numpy as np
import pytest
import tvm
from tvm import te, tirx

from bitcompiler.backends.injective import Injective

TARGET = tvm.target.Target({"kind": "llvm"})


def _clip_add(shape):
    m = te.var("M", "int64")
    full = (m, *(tirx.IntImm("int64", d) for d in shape))
    a = te.placeholder(full, "float32", "A")
    b = te.placeholder(full, "float32", "B")
    s = te.compute(full, lambda *i: a(*i) + b(*i), name="sum")
    y = te.compute(full, lambda *i: tirx.max(tirx.min(s(*i), 1.0), -1.0), name="clip")
    return te.create_prim_func([a, b, y])


# (64, 56, 56): 8 lanes along the rows of 56; 16 lanes across the fused trailing axes ran across
# row ends, a gather and a scatter each (614 µs for a 64x56x56 ReLU instead of 19)
@pytest.mark.parametrize("shape", [(64, 32, 32), (3, 5, 7), (16,), (64, 56, 56), (64, 28, 28), (4, 14, 14)])
def test_injective_inlines_vectorizes_parallelizes_and_matches_numpy(shape):
    sch = Injective().apply(_clip_add(shape), TARGET, False)
    assert sch is not None
    func = sch.mod["main"]
    text = func.script()
    assert 'T.sblock("sum")' not in text and 'T.sblock("clip")' in text  # the add is inlined
    assert "T.parallel(" in text
    lanes = [int(n) for n in re.findall(r"T\.vectorized\(T\.int64\((\d+)\)\)", text)]
    assert lanes == ([max(v for v in (16, 8, 4) if shape[-1] % v == 0)] if shape[-1] % 4 == 0 else [])
    f = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=TARGET)["main"]
    rng = np.random.default_rng(0)
    a, b = (rng.normal(size=(3, *shape)).astype("float32") for _ in range(2))
    y = tvm.runtime.tensor(np.zeros((3, *shape), "float32"))
    f(tvm.runtime.tensor(a), tvm.runtime.tensor(b), y)
    np.testing.assert_array_equal(y.numpy(), np.clip(a + b, -1, 1))


def test_injective_leaves_reductions_to_other_rules():
    m = te.var("M", "int64")
    a = te.placeholder((m, tirx.IntImm("int64", 8)), "float32", "A")
    k = te.reduce_axis((0, 8), "k")
    s = te.compute((m,), lambda i: te.sum(a[i, k], axis=k), name="s")
    assert Injective().apply(te.create_prim_func([a, s]), TARGET, False) is None


def _transpose_add(rows, cols, add):
    m = te.var("M", "int64")
    a = te.placeholder((m, tirx.IntImm("int64", rows), tirx.IntImm("int64", cols)), "float32", "A")
    out = (m, tirx.IntImm("int64", cols), tirx.IntImm("int64", rows))
    if not add:
        return te.create_prim_func([a, te.compute(out, lambda b, i, j: a[b, j, i], name="T")])
    r = te.placeholder(out, "float32", "R")
    return te.create_prim_func([a, r, te.compute(out, lambda b, i, j: r[b, i, j] + a[b, j, i], name="T")])


@pytest.mark.parametrize("add", [False, True], ids=["transpose", "transpose_add"])
def test_transposes_are_tiled_with_vectors_along_the_input_rows(add):
    sch = Injective().apply(_transpose_add(64, 256, add), TARGET, False)
    assert sch is not None
    text = sch.mod["main"].script()
    # 16 x 16 tiles: the tile's columns unrolled, its rows (the input's contiguous axis) in vectors
    assert "T.unroll(T.int64(16))" in text and "T.vectorized(T.int64(16))" in text, text
    f = tvm.compile(tvm.IRModule({"main": sch.mod["main"].with_attr("global_symbol", "main")}), target=TARGET)
    rng = np.random.default_rng(1)
    a = rng.normal(size=(2, 64, 256)).astype("float32")
    r = rng.normal(size=(2, 256, 64)).astype("float32")
    y = tvm.runtime.tensor(np.zeros((2, 256, 64), "float32"))
    f["main"](*[tvm.runtime.tensor(v) for v in ([a, r] if add else [a])], y)
    np.testing.assert_array_equal(y.numpy(), a.transpose(0, 2, 1) + (r if add else 0))


def test_a_transpose_without_whole_tiles_keeps_the_element_wise_schedule():
    text = Injective().apply(_transpose_add(6, 20, False), TARGET, False).mod["main"].script()
    assert "T.unroll(" not in text
