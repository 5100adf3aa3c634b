"""A dlight schedule rule for the element-wise float ops bitcompiler leaves to Relax on the CPU.

TVM 0.27's CPU dlight rules cover GEMV and reductions only; element-wise ops (residual adds,
clips, GELU, transposes) otherwise run as unscheduled scalar loops -- a 64x32x32 clip took
57 µs instead of a few. ``Injective`` inlines producers, vectorizes the static trailing loops and
runs the rest in parallel when the op is big enough for threads to pay.
"""

from __future__ import annotations

from typing import Any

from tvm import s_tir, tirx
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.base import get_extent
from tvm.s_tir.dlight.base.common_schedules import try_inline
from tvm.s_tir.dlight.cpu.base import CPUScheduleRule

PARALLEL_MIN = 16384  # elements below which a thread pool costs more than it saves


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
            extents = [get_extent(sch, loop) for loop in loops]
            first_static = len(loops)
            while first_static > 0 and isinstance(extents[first_static - 1], int):
                first_static -= 1
            static = loops[first_static:]
            n_static = 1
            for e in extents[first_static:]:
                n_static *= e
            outer = list(loops[:first_static])
            if static:
                inner = sch.fuse(*static) if len(static) > 1 else static[0]
                lanes = next((v for v in (16, 8, 4) if n_static % v == 0), 1)
                if lanes > 1:
                    rest, vec = sch.split(inner, [None, lanes])
                    sch.vectorize(vec)
                    outer.append(rest)
                else:
                    outer.append(inner)
            if outer and (first_static > 0 or n_static >= PARALLEL_MIN):
                sch.parallel(sch.fuse(*outer) if len(outer) > 1 else outer[0])
        return sch
