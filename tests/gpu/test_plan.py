"""A GPU plan's sizes (:mod:`bitcompiler.backends.gpu.plan`): integer arithmetic of the plan's
variables, written from TVM's expressions (each kernel's sizes bound to the batch at its call)
and evaluated without TVM and without Python's eval; the memory plan."""

from __future__ import annotations

import pytest

from bitcompiler.backends.gpu import plan
from bitcompiler.errors import InputError, LoadError, LoweringError


@pytest.mark.parametrize(
    ("expr", "batch", "value"),
    [
        (7, 5, 7),
        ("B", 5, 5),
        ("(B + 63) // 64", 1, 1),
        ("(B + 63) // 64", 64, 1),
        ("(B + 63) // 64", 65, 2),
        ("B * 40 * 4", 3, 480),
        ("(B * 5 + 31) // 32 % 3", 20, 1),
        ("min(B, 64) - max(B, 2)", 1, -1),
        ("-B + 10", 4, 6),
    ],
)
def test_expressions_evaluate(expr, batch: int, value: int) -> None:
    assert plan.evaluate(expr, {"B": batch}) == value


@pytest.mark.parametrize(
    "expr",
    [
        "__import__('os').system('echo no')",
        "B.bit_length()",
        "B ** 2",
        "B / 2",
        "1.5",
        "[B]",
        "C + 1",
        "B if B else 1",
        "(lambda: 1)()",
        "min(B)",
        "pow(B, 2)",
        "B +",
        "1 // (B - B)",
        "B" + " + 1" * 1000,
        True,
        None,
        [1],
    ],
)
def test_anything_but_integer_arithmetic_is_refused(expr) -> None:
    with pytest.raises(LoadError, match="plan expression"):
        plan.evaluate(expr, {"B": 2})


def test_place_shares_bytes_only_between_buffers_never_live_together() -> None:
    # kernels: 0 writes t0; 1 reads t0 writes t1; 2 reads t1 writes t2 (t0 is dead by then)
    steps = [[0], [0, 1], [1, 2]]
    offsets, size = plan.place([0, 1, 2], [1000, 300, 700], steps)
    assert offsets == {0: 0, 2: 0, 1: 1024}  # t2 reuses t0's bytes; t1 overlaps both in time
    assert size == 1024 + 512


def _plan() -> dict:
    buffers = [
        {"name": "input0", "kind": "input", "dtype": "float32", "shape": ["B", 4], "nbytes": "B * 16"},
        {"name": "t1", "kind": "output", "dtype": "float32", "shape": ["B", 2], "nbytes": "B * 8"},
    ]
    launch = {"kernel": "k", "grid": ["(B + 127) // 128", 1, 1], "block": [128, 1, 1], "shared": 0}
    launch["args"] = [{"buffer": 0}, {"buffer": 1}, {"scalar": "B", "dtype": "int64"}]
    return {"vars": {"B": {"input": 0, "axis": 0}}, "buffers": buffers, "inputs": [0], "launches": [launch]}


def test_bind_reads_the_batch_and_checks_shapes() -> None:
    p = _plan()
    assert plan.bind(p, [(300, 4)]) == {"B": 300}
    layout = plan.layout(p, {"B": 300})
    assert layout.shapes == [[300, 4], [300, 2]] and layout.nbytes == [4800, 2400]
    assert layout.launches[0]["grid"] == [3, 1, 1] and layout.launches[0]["args"][2]["scalar"] == 300
    with pytest.raises(InputError, match=r"expected shape \(2, 4\)"):
        plan.bind(p, [(2, 5)])
    with pytest.raises(InputError, match="at least 1"):
        plan.bind(p, [(0, 4)])
    with pytest.raises(InputError, match="expected 1 input"):
        plan.bind(p, [(2, 4), (2, 4)])


def test_a_batch_past_32_bit_indices_is_refused() -> None:
    p = {**_plan(), "index_bits": 32}
    assert plan.layout(p, {"B": 2**29 - 1}).shapes[0] == [2**29 - 1, 4]  # 2**31 - 4 elements: reachable
    with pytest.raises(InputError, match="input0 would hold 2,147,483,648 elements.*smaller batches"):
        plan.layout(p, {"B": 2**29})


def test_call_binding_maps_each_kernel_size_to_the_batch_and_refuses_mismatches() -> None:
    from tvm import te, tirx

    from bitcompiler.backends.gpu import build as gpu_build

    m = te.var("M", "int64")
    a = te.placeholder((m, 4), "float32", "A")
    func = te.create_prim_func([a, te.compute((m, 4), lambda i, j: a[i, j] * 2, name="Y")])
    bufs = gpu_build._Buffers()
    s = tirx.Var("s77", "int64")
    bufs.names["s77"] = "B"
    rows = bufs.add("input", [s * 8, 4], "float32")  # e.g. (batch, tokens) flattened
    assert bufs.entries[rows]["shape"] == ["B * 8", 4] and bufs.entries[rows]["nbytes"] == "B * 128"
    binding = gpu_build.call_binding("f", func, [rows, rows], bufs)
    assert bufs.expr(tirx.FloorDiv(m + 127, tirx.IntImm("int64", 128)), binding) == "(B * 8 + 127) // 128"
    wrong = bufs.add("temp", [s * 8, 5], "float32")
    with pytest.raises(LoweringError, match=r"f: parameter Y of shape"):
        gpu_build.call_binding("f", func, [rows, wrong], bufs)


def test_size_text_evaluates_to_the_expression_it_writes() -> None:
    from tvm import tirx

    s = tirx.Var("s77", "int64")

    def c(v: int) -> tirx.IntImm:
        return tirx.IntImm("int64", v)

    cases = [
        (tirx.Sub(s, tirx.Sub(s, c(1))), lambda b: b - (b - 1)),
        (tirx.Sub(tirx.Sub(s, c(1)), c(2)), lambda b: b - 1 - 2),
        (tirx.FloorDiv(s, tirx.Mul(c(2), c(3))), lambda b: b // (2 * 3)),
        (tirx.FloorDiv(tirx.FloorDiv(s, c(2)), c(3)), lambda b: b // 2 // 3),
        (tirx.FloorMod(tirx.Mul(s, c(3)), c(4)), lambda b: b * 3 % 4),
        (tirx.Mul(tirx.Add(s, c(1)), c(3)), lambda b: (b + 1) * 3),
        (tirx.Min(tirx.Add(s, c(63)), c(64)), lambda b: min(b + 63, 64)),
        (tirx.Cast("int32", tirx.Max(s, c(2))), lambda b: max(b, 2)),
    ]
    for expr, value in cases:
        text = plan.write(expr, {"s77": "B"})
        for b in (1, 7, 100):
            assert plan.evaluate(text, {"B": b}) == value(b), (text, b)
