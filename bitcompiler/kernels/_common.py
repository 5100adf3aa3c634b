"""Helpers shared by the kernel builders: int64 constants, targets, word views, schedule bits."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from typing import Any, TypeVar, cast

import tvm
from tvm import te, tirx

WORD_DTYPE = "int32"
# The work (elements written, or multiply-adds) below which a kernel runs on the calling thread: a
# parallel loop is a launch of TVM's thread pool (a few µs with the workers spinning on idle cores,
# far more when a worker waits for a core another process holds), more than a second thread saves
# on 1-5 µs of work. A GELU over 64 x 1024 floats (26 µs) stays parallel; a LayerNorm, a residual
# add or a transpose over 64 x 256 floats (1-5 µs) does not.
PARALLEL_MIN = 65536


def work(func: tirx.PrimFunc) -> int:
    """The work of an unscheduled ``func`` for :data:`PARALLEL_MIN`: its blocks' instances (elements
    written, times the reduction's extent for a reduction) summed, a symbolic extent (the batch,
    unknown when the kernel is built) counted as one."""
    from tvm import s_tir
    from tvm.s_tir.dlight.analysis import normalize_prim_func

    return sum(
        _instances(it.dom for it in info.iters) for info in normalize_prim_func(s_tir.Schedule(func)) or []
    )


def _instances(extents: Any) -> int:
    """The product of ``extents``, a symbolic one (the batch) counted as one."""
    n = 1
    for e in extents:
        n *= int(e) if isinstance(e, (int, tirx.IntImm)) else 1
    return n


def threads_pay(func: tirx.PrimFunc) -> bool:
    """Whether a parallel loop pays in ``func`` (unscheduled): :func:`work` of ``PARALLEL_MIN`` or more."""
    return work(func) >= PARALLEL_MIN


def loops_pay(sch: Any, loops: list) -> bool:
    """Whether one stage of a schedule ``sch`` (its loop nest ``loops``; instances counted as
    :func:`work` does) is ``PARALLEL_MIN`` work: a parallel loop of less costs a launch of the
    thread pool for a few µs of work."""
    return _instances(sch.get(loop).extent for loop in loops) >= PARALLEL_MIN


_Builder = TypeVar("_Builder", bound=Callable[..., Any])


def i64(v: int) -> tirx.IntImm:
    return tirx.IntImm("int64", int(v))


def i32(v: int) -> tirx.IntImm:
    return tirx.IntImm("int32", int(v))


def shape64(*dims: Any) -> tuple:
    return tuple(i64(d) if isinstance(d, int) else d for d in dims)


def batch_var() -> tirx.Var:
    """The symbolic batch ``M`` every kernel takes (int64)."""
    return te.var("M", "int64")


def threshold_output(M: Any, N: int, acc_of: Any) -> tuple[list, te.Tensor]:
    """The threshold epilogue: ``TS, TH int32 (N,)`` and ``Y f32 (M, N)``, +1 where
    ``TS[n]·acc_of(m, n) >= TH[n]`` (in int64) and -1 elsewhere."""
    TS = te.placeholder(shape64(N), "int32", "TS")
    TH = te.placeholder(shape64(N), "int32", "TH")
    Y = te.compute(
        shape64(M, N),
        lambda m, n: tirx.Select(
            TS[n].astype("int64") * acc_of(m, n).astype("int64") >= TH[n].astype("int64"),
            tirx.const(1.0, "float32"),
            tirx.const(-1.0, "float32"),
        ),
        name="Y",
    )
    return [TS, TH], Y


def built_once(builder: _Builder) -> _Builder:
    """``builder(spec, target, ...)`` built once per arguments where ``target`` is a string (a
    kernel is a pure function of its arguments, and ResNet-18 has 3 to 4 convolutions of each
    shape); a ``Target`` or dict target builds anew."""
    cached = functools.lru_cache(maxsize=256)(builder)

    @functools.wraps(builder)
    def build(spec: Any, target: Any = "llvm", *args: Any, **kwargs: Any) -> Any:
        return (cached if isinstance(target, str) else builder)(spec, target, *args, **kwargs)

    return cast("_Builder", build)


def target_kind(target: Any) -> str:
    """``"llvm"`` for the host-CPU schedules; any other kind gets the plain (portable) TIR."""
    if isinstance(target, tvm.target.Target):
        return str(target.kind.name)
    if isinstance(target, str) and target.lstrip().startswith("{"):  # str() of a tvm.target.Target
        target = json.loads(target)
    if isinstance(target, dict):
        return str(target.get("kind", ""))
    if isinstance(target, str):
        return target.split()[0] if target.strip() else ""
    raise ValueError(f"target must be a string, dict or tvm.target.Target, got {target!r}")


def as_tvm_target(target: Any) -> Any:
    """``target`` (a ``tvm.target.Target``, its string or JSON form, or a dict) as a ``tvm.target.Target``."""
    if isinstance(target, tvm.target.Target):
        return target
    if isinstance(target, str) and target.lstrip().startswith("{"):
        target = json.loads(target)
    return tvm.target.Target(target)


def as_i32(e: tirx.PrimExpr) -> tirx.PrimExpr:
    return e.astype("int32")


def or_reducer() -> Any:
    return te.comm_reducer(lambda a, b: a | b, lambda t: tirx.const(0, t), name="bit_or")


def largest_divisor(n: int, candidates: tuple[int, ...]) -> int:
    for c in candidates:
        if c >= 1 and n % c == 0:
            return c
    return 1


def divisors(n: int, candidates: tuple[int, ...]) -> list[int]:
    """The candidates that divide ``n`` (``[1]`` when none does): a schedule's legal choices."""
    return [c for c in candidates if n % c == 0] or [1]


def _find_parser_by_frame_walk() -> None:
    """Make TVMScript's macro expansion find its parser without ``inspect.getouterframes``.

    ``ScriptMacro._find_parser_def`` looks for the running parser in the globals of the calling
    frames, but builds a ``FrameInfo`` (source lines and module lookup) for every outer frame to
    do so: that was most of the time of building a conv kernel (0.45 s, 3.8 s at the stack depth
    of the Relax importer, 20 of the 30 s of compiling ResNet-18). This walks ``f_back`` and
    checks the same globals in the same order. Left alone if TVM's parser looks different.
    """
    from tvm.script.parser.core import parser as script_parser

    macro = getattr(script_parser, "ScriptMacro", None)
    name = getattr(macro, "parser_object_name", None)
    if macro is None or not isinstance(name, str) or not hasattr(macro, "_find_parser_def"):
        return

    def _find_parser_def(self: Any) -> Any:
        frame: Any = sys._getframe(0)
        while frame is not None:
            parser = frame.f_globals.get(name)
            if parser is not None:
                return parser
            frame = frame.f_back
        raise RuntimeError(f"{name} not available")

    macro._find_parser_def = _find_parser_def


_find_parser_by_frame_walk()
