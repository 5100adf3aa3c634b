"""The TVM-free half of a GPU plan (:mod:`bitcompiler.backends.gpu.plan`): size expressions are
integer arithmetic of the plan's variables, evaluated without Python's eval; the memory plan."""

from __future__ import annotations

import pytest

from bitcompiler.backends.gpu import plan
from bitcompiler.errors import InputError, LoadError


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
