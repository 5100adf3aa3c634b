"""A dlight schedule rule for the element-wise float ops bitcompiler leaves to Relax on the CPU.

TVM 0.27's CPU dlight rules cover GEMV and reductions only; element-wise ops (residual adds,
clips, GELU, transposes) otherwise run as unscheduled scalar loops -- a 64x32x32 clip took
57 µs instead of a few. ``Injective`` inlines producers, vectorizes the last axis (16, 8 or 4
lanes, whichever divides it) and runs the rest in parallel (the CPU pipeline keeps an op too small
for threads to pay on one thread: :mod:`bitcompiler.backends.parallel_min`).

A transpose of the last two axes (``x.transpose(1, 2)`` of an MLP-Mixer's token-mixing block, also
fused with a residual add) reads with a stride along the output's vectors: it is tiled instead, 16 x
16 elements, vectors along the input's rows and the tile's columns unrolled, which LLVM turns into
in-register shuffles (64 x 256 floats: 1.4 µs instead of 11 µs).
"""

from __future__ import annotations

from typing import Any

from tvm import s_tir, tirx
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.base import get_extent
from tvm.s_tir.dlight.base.common_schedules import try_inline
from tvm.s_tir.dlight.cpu.base import CPUScheduleRule


class Injective(CPUScheduleRule):
    """Fuse, vectorize (16/8/4 lanes) and parallelize purely spatial PrimFuncs."""

    def apply(self, func: tirx.PrimFunc, target: Any, _tunable: bool) -> s_tir.Schedule | None:
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if not infos or not all(bi.is_injective() for bi in infos):
            return None
        # normalize_prim_func drops unit loops: a reduction over K=1 (Linear(1, n), a 1x1 conv of
        # one channel) then looks spatial but keeps its T.init, and scheduling it as element-wise
        # adds its consumer's bias twice. Such a block is a reduction: leave it to the default.
        if any(sch.get(bi.block_rv).init is not None for bi in infos):
            return None
        for info in try_inline(sch, infos):
            loops = sch.get_loops(info.block_rv)
            if not loops:
                continue
            if _tile_transpose(sch, info.block_rv, loops):
                continue
            last = get_extent(sch, loops[-1])
            lanes = next((v for v in (16, 8, 4) if isinstance(last, int) and last % v == 0), 1)
            outer = list(loops[:-1])
            if lanes > 1:  # vectors along the last axis only (see _serial_tail)
                rest, vec = sch.split(loops[-1], [None, lanes])
                sch.vectorize(vec)
                outer.append(rest)
            else:
                outer = _serial_tail(sch, loops)
            if outer:
                sch.parallel(sch.fuse(*outer) if len(outer) > 1 else outer[0])
        return sch


def _serial_tail(sch: s_tir.Schedule, loops: list) -> list:
    """The loops to run in parallel where the last axis takes no whole vectors (a 7x7 map): the
    trailing static loops, as few as make 16 iterations, fused into one serial loop (LLVM
    vectorizes it where it can); the ones before them returned. A vector that ran across the end of a row needed a gather and a scatter
    (indices by division): over 64x56x56 floats, 16 lanes across the fused trailing axes took 614 µs
    against 19 µs along the last axis."""
    extents = [get_extent(sch, loop) for loop in loops]
    first, size = len(loops), 1
    while first > 0 and isinstance(extents[first - 1], int) and size < 16:
        first -= 1
        size *= extents[first]
    tail = loops[first:]
    if len(tail) > 1:
        sch.fuse(*tail)
    return list(loops[:first]) if tail else list(loops)


def _tile_transpose(sch: s_tir.Schedule, block: Any, loops: list) -> bool:
    """Tile a block that reads some buffer transposed in its last two loops (see the module's
    docstring); False, and nothing changed, for any other block."""
    stmt = sch.get(block)
    if len(loops) < 2 or len(stmt.iter_vars) != len(loops):
        return False
    row, col = stmt.iter_vars[-2].var, stmt.iter_vars[-1].var
    if not any(len(r.region) >= 2 and r.region[-1].min.same_as(row) for r in stmt.reads):
        return False
    extents = [get_extent(sch, loop) for loop in loops[-2:]]
    tile = next((t for t in (16, 8) if all(isinstance(e, int) and e % t == 0 for e in extents)), 0)
    if not tile or not any(r.region[-1].min.same_as(col) for r in stmt.writes):
        return False
    ro, ri = sch.split(loops[-2], [None, tile])
    co, ci = sch.split(loops[-1], [None, tile])
    sch.reorder(ro, co, ci, ri)
    sch.unroll(ci)
    sch.vectorize(ri)
    sch.parallel(sch.fuse(*loops[:-2], ro, co))
    return True
