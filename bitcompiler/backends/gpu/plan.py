"""A GPU plan's sizes: written from TVM's expressions, and evaluated at one batch without TVM.

A plan (``plan.json``) is compiled once for every batch. Sizes that depend on the batch are
*expressions* of the plan's ``vars`` (each read from one input's dimension, ``{"B": {"input": 0,
"axis": 0}}``): a buffer's ``shape`` and ``nbytes``, a launch's ``grid``, ``block`` and ``shared``
bytes, and scalar kernel arguments are either integers or text such as ``"(B + 63) // 64"``.
The text is integer arithmetic only (``+ - * // %``, unary ``-``, ``min``/``max`` of two, parentheses,
the plan's variable names): :func:`write` prints it from a TVM integer expression (read by its
node types; this module imports no TVM), :func:`evaluate` parses it with :mod:`ast` and evaluates
it node by node; nothing in a plan is ever executed as Python.

:func:`layout` turns a plan and the variables' values into everything a runner allocates and
launches: each buffer's shape and bytes, the temporaries' offsets in one arena (a static memory
plan for that batch: a buffer's bytes are reused once its last kernel ran) and every launch's
sizes and arguments.
"""

from __future__ import annotations

import ast
import functools
import math
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from bitcompiler.errors import InputError, LoadError, LoweringError

ALIGN = 256  # bytes: every buffer of the memory plan starts on this boundary
MAX_EXPR = 400  # characters: longer expression text is refused (a plan's are a few dozen)

_BINARY: dict[type, Callable[[int, int], int]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
}
_CALLS: dict[str, Callable[[int, int], int]] = {"min": min, "max": max}


_WRITE_OPS = {"Add": ("+", 1), "Sub": ("-", 1), "Mul": ("*", 2), "FloorDiv": ("//", 2), "FloorMod": ("%", 2)}
_ATOM = 3  # precedence of a number, a name or a call


def write(e: Any, names: Mapping[str, str]) -> str:
    """TVM integer expression ``e`` (of variables ``names`` maps to plan names) as plan expression
    text, with only the parentheses it needs, e.g. ``(B * 8 + 63) // 64``."""
    return _write(e, names)[0]


def _write(e: Any, names: Mapping[str, str]) -> tuple[str, int]:
    kind = type(e).__name__
    if kind == "IntImm":
        return str(int(e.value)), _ATOM
    if kind in ("Var", "SizeVar"):
        if e.name not in names:
            raise LoweringError(
                f"GPU plan: a size depends on {e.name}, which is no input's dimension; only the batch may vary"
            )
        return names[e.name], _ATOM
    if kind == "Cast" and str(e.ty.dtype).startswith(("int", "uint")):
        return _write(e.value, names)
    if kind in _WRITE_OPS:
        op, prec = _WRITE_OPS[kind]
        (a, pa), (b, pb) = _write(e.a, names), _write(e.b, names)
        a = a if pa >= prec else f"({a})"
        b = b if pb > prec else f"({b})"  # a - (b - c), a // (b * c)
        return f"{a} {op} {b}", prec
    if kind in ("Min", "Max"):
        return f"{kind.lower()}({write(e.a, names)}, {write(e.b, names)})", _ATOM
    raise LoweringError(f"GPU plan: cannot write the size {e} ({kind}) as a plan expression")


@functools.lru_cache(maxsize=4096)
def _parse(text: str) -> ast.expr:
    if len(text) > MAX_EXPR:
        raise LoadError(f"plan expression of {len(text)} characters (at most {MAX_EXPR}): {text[:80]}...")
    try:
        return ast.parse(text, mode="eval").body
    except SyntaxError as e:
        raise LoadError(f"plan expression {text!r} is not integer arithmetic: {e.msg}") from e


def evaluate(expr: Any, env: Mapping[str, int]) -> int:
    """The integer value of plan expression ``expr`` (an int, or its text) for variables ``env``."""
    if isinstance(expr, int) and not isinstance(expr, bool):
        return expr
    if not isinstance(expr, str):
        raise LoadError(
            f"plan expression {expr!r}: expected an integer or its text, got {type(expr).__name__}"
        )
    try:
        return _eval(_parse(expr), expr, env)
    except ZeroDivisionError as e:
        raise LoadError(f"plan expression {expr!r} divides by zero at {dict(env)}") from e
    except RecursionError as e:
        raise LoadError(f"plan expression {expr[:80]!r}... nests too deeply") from e


def _eval(node: ast.expr, text: str, env: Mapping[str, int]) -> int:
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return node.value
    if isinstance(node, ast.Name) and node.id in env:
        return int(env[node.id])
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        return _BINARY[type(node.op)](_eval(node.left, text, env), _eval(node.right, text, env))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_eval(node.operand, text, env)
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id in _CALLS
        and len(node.args) == 2
        and not node.keywords
    ):
        a, b = (_eval(x, text, env) for x in node.args)
        return _CALLS[node.func.id](a, b)
    what = (
        f"unknown name {node.id!r}" if isinstance(node, ast.Name) else f"{type(node).__name__} is not allowed"
    )
    raise LoadError(
        f"plan expression {text!r}: {what} (integer arithmetic of the plan's variables {sorted(env)} only)"
    )


def bind(plan: dict, shapes: Sequence[Sequence[int]]) -> dict[str, int]:
    """The plan's variables read from the input ``shapes``; every input's shape checked against them."""
    specs = [plan["buffers"][i] for i in plan["inputs"]]
    if len(shapes) != len(specs):
        raise InputError(f"expected {len(specs)} input(s), got {len(shapes)}")
    env: dict[str, int] = {}
    for name, where in plan.get("vars", {}).items():
        i, axis = int(where["input"]), int(where["axis"])
        if axis >= len(shapes[i]) or shapes[i][axis] < 1:
            raise InputError(
                f"input {i}: dimension {axis} ({name}, the batch) must be at least 1, got shape {tuple(shapes[i])}"
            )
        env[name] = int(shapes[i][axis])
    for i, (shape, spec) in enumerate(zip(shapes, specs)):
        want = [evaluate(d, env) for d in spec["shape"]]
        if list(shape) != want:
            raise InputError(
                f"input {i}: expected shape {tuple(want)} ({_describe(spec)}), got {tuple(shape)}"
            )
    return env


def _describe(spec: dict) -> str:
    return f"{spec['dtype']} of shape ({', '.join(str(d) for d in spec['shape'])})"


@dataclass
class Layout:
    """A plan at one batch: what a runner allocates and launches."""

    env: dict[str, int]
    shapes: list[list[int]]  # per buffer
    nbytes: list[int]  # per buffer
    offsets: dict[int, int]  # temporary -> its byte offset in the arena
    arena_bytes: int
    launches: list[dict]  # kernel, grid, block, shared, args ({"buffer": i} or {"scalar": v, "dtype": t})


def layout(plan: dict, env: Mapping[str, int]) -> Layout:
    """Evaluate every size of ``plan`` for ``env`` and place the temporaries (:func:`place`);
    :class:`InputError` if a buffer would hold more elements than the kernels' indices reach."""
    buffers = plan["buffers"]
    shapes = [[evaluate(d, env) for d in b["shape"]] for b in buffers]
    limit = 2 ** (int(plan.get("index_bits", 64)) - 1)
    for b, shape in zip(buffers, shapes):
        if math.prod(shape) >= limit:
            raise InputError(
                f"batch {dict(env)}: buffer {b['name']} would hold {math.prod(shape):,} elements, more than "
                f"the kernels' {plan['index_bits']}-bit indices reach; run it in smaller batches"
            )
    nbytes = [evaluate(b["nbytes"], env) for b in buffers]
    launches = []
    for launch in plan["launches"]:
        args = [
            a if "buffer" in a else {"scalar": evaluate(a["scalar"], env), "dtype": a["dtype"]}
            for a in launch["args"]
        ]
        launches.append(
            {
                "kernel": launch["kernel"],
                "grid": [evaluate(g, env) for g in launch["grid"]],
                "block": [evaluate(b, env) for b in launch["block"]],
                "shared": evaluate(launch.get("shared", 0), env),
                "args": args,
            }
        )
    temps = [i for i, b in enumerate(buffers) if b["kind"] == "temp"]
    offsets, arena = place(
        temps, nbytes, [[a["buffer"] for a in x["args"] if "buffer" in a] for x in launches]
    )
    return Layout(dict(env), shapes, nbytes, offsets, arena, launches)


def place(
    temps: list[int], nbytes: Sequence[int], steps: Sequence[Sequence[int]]
) -> tuple[dict[int, int], int]:
    """Offsets of buffers ``temps`` in one arena and its size: ``steps`` lists the buffers each
    kernel touches in launch order; two buffers share bytes only if no kernel runs between the
    first and last use of both. Largest first, each at the lowest offset that fits."""
    first: dict[int, int] = {}
    last: dict[int, int] = {}
    for step, args in enumerate(steps):
        for b in args:
            first.setdefault(b, step)
            last[b] = step
    placed: list[tuple[int, int, int, int]] = []  # (offset, end, first, last)
    offsets: dict[int, int] = {}
    size = 0
    for b in sorted(temps, key=lambda b: (-nbytes[b], b)):
        need = -(-max(nbytes[b], 1) // ALIGN) * ALIGN
        if b not in first:  # no kernel touches it: any bytes will do
            offsets[b], size = 0, max(size, need)
            continue
        live = [(o, end) for o, end, f, l in placed if f <= last[b] and first[b] <= l]
        offset = 0
        for o, end in sorted(live):
            if o < offset + need and offset < end:
                offset = max(offset, end)
        placed.append((offset, offset + need, first[b], last[b]))
        offsets[b] = offset
        size = max(size, offset + need)
    return offsets, size
