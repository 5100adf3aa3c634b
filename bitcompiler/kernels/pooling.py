"""Average pooling in the order of :func:`bitcompiler.quant.numerics.window_mean`.

``X f32 (M, C, H, W) -> Y f32 (M, C, OH, OW)``: per output, ``s = 0``, ``s = s + X[tap]`` over the
taps in row-major order (a padded tap adds ``+0``), then ``s / count`` as one float32 division.
The reduction loops stay serial and in that order (LLVM never reorders float adds without
fast-math); the schedule parallelizes over batch and channels only.
"""

from __future__ import annotations

from typing import Any

from tvm import s_tir, te, tirx

from bitcompiler.kernels._common import batch_var, i64, shape64, target_kind
from bitcompiler.quant.numerics import pool_out_size

F32 = "float32"


def window_mean_kernel(
    c: int,
    h: int,
    w: int,
    kernel: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    count_include_pad: bool = True,
    target: str | dict | Any = "llvm",
) -> tirx.PrimFunc:
    """``X (M, C, H, W) -> Y (M, C, OH, OW)``: the window mean in its fixed order."""
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    oh, ow = pool_out_size(h, kh, sh, ph), pool_out_size(w, kw, sw, pw)
    if oh < 1 or ow < 1:
        raise ValueError(f"a {kh}x{kw} window does not fit a {h}x{w} input padded by {padding}")
    M = batch_var()
    X = te.placeholder(shape64(M, c, h, w), F32, "X")
    ri = te.reduce_axis((i64(0), i64(kh)), "ri")
    rj = te.reduce_axis((i64(0), i64(kw)), "rj")

    def tap(m, ch, y, x):
        iy, ix = y * sh - ph + ri, x * sw - pw + rj
        if ph == 0 and pw == 0:
            return X[m, ch, iy, ix]
        inside = tirx.all(iy >= 0, iy < h, ix >= 0, ix < w)
        return tirx.if_then_else(inside, X[m, ch, iy, ix], tirx.const(0.0, F32))

    S = te.compute(shape64(M, c, oh, ow), lambda *i: te.sum(tap(*i), axis=[ri, rj]), name="S")

    def count(y, x):
        if count_include_pad or (ph == 0 and pw == 0):
            return tirx.const(float(kh * kw), F32)
        rows = tirx.min(y * sh - ph + kh, h) - tirx.max(y * sh - ph, 0)
        cols = tirx.min(x * sw - pw + kw, w) - tirx.max(x * sw - pw, 0)
        return (rows * cols).astype(F32)

    Y = te.compute(shape64(M, c, oh, ow), lambda m, ch, y, x: S[m, ch, y, x] / count(y, x), name="Y")
    func = te.create_prim_func([X, Y])
    if target_kind(target) == "llvm":
        sch = s_tir.Schedule(func)
        m, ch, *_ = sch.get_loops(sch.get_sblock("Y"))
        sch.compute_at(sch.get_sblock("S"), sch.get_loops(sch.get_sblock("Y"))[3])
        sch.parallel(sch.fuse(m, ch))
        func = sch.mod["main"]
    return func.with_attr("global_symbol", "main")
