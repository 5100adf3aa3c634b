"""A dlight schedule rule for row reductions (LayerNorm, RMSNorm, softmax) over a contiguous axis.

TVM 0.27's CPU ``Reduction`` rule keeps each row's sums scalar: a chain of dependent float adds,
one per element. A LayerNorm over 64 tokens x 256 channels then took 32 µs of the MLP-Mixer's
1.3 ms call, nine of them. ``LaneReduction`` splits each such sum into ``lanes`` partial sums
(``rfactor``) that the vector unit keeps side by side, then adds the lanes: the same LayerNorm
takes 3.6 µs.

The sums are added in another order than a sequential loop (as PyTorch's own vectorized kernels
do), so the result moves by a few ulp: float outputs stay far inside the 1e-5 relative bar
(docs/guide.md, "Exactness"). Functions it does not match are left to the next rule.
"""

from __future__ import annotations

from typing import Any

from tvm import s_tir, tirx
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.base import get_extent
from tvm.s_tir.dlight.cpu.base import CPUScheduleRule
from tvm.target.codegen import llvm_get_vector_width


def _leading_spatial(dom_kind: str) -> int:
    return len(dom_kind) - len(dom_kind.lstrip("S"))


def _contiguous_sum(sch: s_tir.Schedule, info: Any, lanes: int) -> bool:
    """A reduction block ``S..SR`` whose one reduction axis is static, a multiple of 2 x ``lanes``,
    and the last index of a buffer it reads (so the lanes are adjacent elements)."""
    kind = info.dom_kind()
    if kind.count("R") != 1 or not kind.endswith("R"):
        return False
    extent = info.iters[-1].dom
    if not isinstance(extent, int) or extent % lanes or extent < 2 * lanes:
        return False
    block = sch.get(info.block_rv)
    var = block.iter_vars[[iv.iter_type for iv in block.iter_vars].index(tirx.IterVar.CommReduce)].var
    return any(r.region and r.region[-1].min.same_as(var) for r in block.reads)


class LaneReduction(CPUScheduleRule):
    """Row reductions with vector partial sums: the rows in parallel (the CPU pipeline keeps a small
    one on one thread: :mod:`bitcompiler.backends.parallel_min`), every block of a row computed
    under the row's loop, element-wise blocks vectorized."""

    def apply(self, func: tirx.PrimFunc, target: Any, _tunable: bool) -> s_tir.Schedule | None:
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if not infos or len(infos) < 2 or not infos[-1].is_injective():
            return None
        lanes = max(llvm_get_vector_width(target), 128) // 32
        reductions = [bi for bi in infos if not bi.is_injective()]
        if not reductions or not all(_contiguous_sum(sch, bi, lanes) for bi in reductions):
            return None
        if any(bi.dom_kind()[0] != "S" for bi in infos):
            return None
        rows = min(_leading_spatial(bi.dom_kind()) for bi in infos)
        if any(_leading_spatial(bi.dom_kind()) != rows for bi in reductions):
            return None  # a reduction over more than the row's last axis
        names = [sch.get(bi.block_rv).name_hint for bi in infos]
        try:
            return _schedule(sch, infos, names, rows, lanes)
        except s_tir.ScheduleError:  # a reducer rfactor does not know: the next rule's
            return None


def _schedule(sch: s_tir.Schedule, infos: list, names: list[str], rows: int, lanes: int) -> s_tir.Schedule:
    partial = []  # the rfactor blocks: lanes partial sums per row
    order = []
    for info, name in zip(infos, names):
        if info.is_injective():
            order.append(name)
            continue
        _, lane = sch.split(sch.get_loops(info.block_rv)[-1], [None, lanes])
        rf = sch.rfactor(lane, rows)
        partial.append(rf)
        order += [sch.get(rf).name_hint, name]
    last = sch.get_sblock(order[-1])
    loops = sch.get_loops(last)
    row = sch.fuse(*loops[:rows]) if rows > 1 else loops[0]
    sch.parallel(row)
    _vectorize_inner(sch, last, lanes)
    for name in reversed(order[:-1]):
        sch.compute_at(sch.get_sblock(name), row, preserve_unit_loops=True)
    for name in order[:-1]:
        block = sch.get_sblock(name)
        if name in names and infos[names.index(name)].is_injective():
            _vectorize_inner(sch, block, lanes)
    for rf in partial:
        loops = sch.get_loops(rf)
        lane, step = loops[1], loops[-1]  # (row, lane, unit loops..., step over the row)
        sch.reorder(step, lane)
        sch.vectorize(lane)
        sch.decompose_reduction(rf, step)
    return sch


def _vectorize_inner(sch: s_tir.Schedule, block: Any, lanes: int) -> None:
    loops = sch.get_loops(block)
    if len(loops) <= 1:
        return
    extent = get_extent(sch, loops[-1])
    if isinstance(extent, int) and extent <= lanes:
        if extent >= 2:
            sch.vectorize(loops[-1])
        return
    _, vec = sch.split(loops[-1], [None, lanes])
    sch.vectorize(vec)
