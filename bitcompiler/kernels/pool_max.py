"""Max pooling on the CPU: float32 NCHW, and the OR pooling of packed sign bits.

* :func:`max_pool2d_kernel`: ``X f32 (M, C, H, W) -> Y f32 (M, C, OH, OW)``, the max over each
  window (a padded tap is the lowest float32, as in TVM's ``topi.nn.pool2d``, so it never
  wins). The taps are one expression (no reduction block), the schedule runs batch x channels
  in parallel and vectorizes along the output rows; TVM's own legalization of ``relax.nn.max_pool2d``
  is an unscheduled scalar nest (0.57 ms for a 64x128x7x7 input).
* :func:`or_pool_packed_kernel`: ``XP int32 (M, H, W, G, CWg) -> YP (M, OH, OW, G, CWg)`` in
  :func:`bitcompiler.kernels.pack_sign_nchw`'s layout, the OR of each window's words (a padded
  tap is 0). A sign bit ``y >= 0`` of a window's max is set exactly when one tap's is, so
  ``pack_sign(max_pool(y)) == or_pool(pack_sign(y))`` bit for bit: a max pool before a binary
  layer runs on packed words, 32 channels an instruction.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from tvm import s_tir, te, tirx

from bitcompiler.kernels._common import batch_var, largest_divisor, shape64, target_kind, threads_pay

F32 = "float32"
MAX_TAPS = 64  # larger windows: TVM's legalization (a reduction) instead of one unrolled expression


@dataclass(frozen=True)
class PoolWindow:
    """A pooling window over an ``h x w`` input giving ``oh x ow``: ``padding`` is (top, left)."""

    h: int
    w: int
    oh: int
    ow: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)

    def taps(self, y: Any, x: Any) -> Iterator[tuple[Any, Any, Any]]:
        """``(iy, ix, inside)`` of each tap of output ``(y, x)``; ``inside`` is None when the
        window can never leave the input (no padding, and the last window fits)."""
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.kernel, self.stride, self.padding, self.dilation
        fits = ph == pw == 0 and (self.oh - 1) * sh + (kh - 1) * dh < self.h
        fits = fits and (self.ow - 1) * sw + (kw - 1) * dw < self.w
        for i in range(kh):
            for j in range(kw):
                iy, ix = y * sh - ph + i * dh, x * sw - pw + j * dw
                inside = None if fits else tirx.all(iy >= 0, iy < self.h, ix >= 0, ix < self.w)
                yield iy, ix, inside

    def check(self) -> None:
        if self.kernel[0] * self.kernel[1] > MAX_TAPS or min(self.oh, self.ow) < 1:
            raise ValueError(f"no max-pool kernel for a {self.kernel} window giving {self.oh}x{self.ow}")


def _reduce(window: PoolWindow, tap: Any, combine: Any, pad: Any, y: Any, x: Any) -> Any:
    out = None
    for iy, ix, inside in window.taps(y, x):
        v = tap(iy, ix) if inside is None else tirx.if_then_else(inside, tap(iy, ix), pad)
        out = v if out is None else combine(out, v)
    return out


def _schedule(func: tirx.PrimFunc, name: str, outer: int) -> tirx.PrimFunc:
    """The first ``outer`` loops in parallel (:func:`~bitcompiler.kernels._common.threads_pay`), the rest fused and vectorized where they divide."""
    sch = s_tir.Schedule(func)
    loops = sch.get_loops(sch.get_sblock(name))
    extent = 1
    for loop in loops[outer:]:
        extent *= int(sch.get(loop).extent)
    lanes = largest_divisor(extent, (8, 4))
    if lanes > 1:
        sch.vectorize(sch.split(sch.fuse(*loops[outer:]), [None, lanes])[1])
    else:  # e.g. 3x3 outputs: plain nested loops, the innermost unrolled (no divisions)
        sch.unroll(loops[-1])
    if threads_pay(func):  # one sample of PARALLEL_MIN outputs (a launch costs more than less saves)
        sch.parallel(sch.fuse(*loops[:outer]))
    return sch.mod["main"]


def _schedule_rows(func: tirx.PrimFunc, ow: int) -> tirx.PrimFunc:
    """Vectors along each output row (8 or 4 lanes dividing it), batch x channels in parallel;
    :func:`_schedule`'s fused plane where no lane count divides the row. A vector that crosses
    a row end needs a division and a remainder per lane: the fused plane took 149 us for a
    3x3 stride-2 pool of 64x56x56 (rows: 60), 18 us for a 2x2 pool of 32x28x28 (rows: 4.9)."""
    lanes = largest_divisor(ow, (8, 4))
    if lanes == 1:
        return _schedule(func, "Y", 2)
    sch = s_tir.Schedule(func)
    m, ch, _y, x = sch.get_loops(sch.get_sblock("Y"))
    sch.vectorize(sch.split(x, [None, lanes])[1])
    if threads_pay(func):
        sch.parallel(sch.fuse(m, ch))
    return sch.mod["main"]


def max_pool2d_kernel(c: int, window: PoolWindow, target: str | dict | Any = "llvm") -> tirx.PrimFunc:
    """``X f32 (M, C, H, W) -> Y f32 (M, C, OH, OW)``: the max over each window."""
    window.check()
    M = batch_var()
    X = te.placeholder(shape64(M, c, window.h, window.w), F32, "X")
    lowest = tirx.min_value(F32)

    def value(m: Any, ch: Any, y: Any, x: Any) -> Any:
        return _reduce(window, lambda iy, ix: X[m, ch, iy, ix], tirx.max, lowest, y, x)

    Y = te.compute(shape64(M, c, window.oh, window.ow), value, name="Y")
    func = te.create_prim_func([X, Y])
    if target_kind(target) == "llvm":
        func = _schedule_rows(func, window.ow)
    return func.with_attr("global_symbol", "main")


def or_pool_packed_kernel(
    groups: int, words: int, window: PoolWindow, target: str | dict | Any = "llvm"
) -> tirx.PrimFunc:
    """``XP int32 (M, H, W, G, CWg) -> YP int32 (M, OH, OW, G, CWg)``: the OR of each window."""
    window.check()
    M = batch_var()
    XP = te.placeholder(shape64(M, window.h, window.w, groups, words), "int32", "XP")
    zero = tirx.const(0, "int32")

    def value(m: Any, y: Any, x: Any, g: Any, wd: Any) -> Any:
        return _reduce(window, lambda iy, ix: XP[m, iy, ix, g, wd], lambda a, b: a | b, zero, y, x)

    YP = te.compute(shape64(M, window.oh, window.ow, groups, words), value, name="YP")
    func = te.create_prim_func([XP, YP])
    if target_kind(target) == "llvm":
        func = _schedule(func, "YP", 2)
    return func.with_attr("global_symbol", "main")
