"""Activation quantizers that feed the bit kernels (exactly :mod:`bitcompiler.quant.numerics`).

* :func:`pack_sign_rows` -- ``X f32 (M, K) -> XP int32 (M, KW)``: bit ``j`` of word ``w`` is
  ``X[m, 32w + j] >= 0`` (``sign(0) = +1``), zero tail.
* :func:`quantize_rows_int8` -- ``X f32 (M, *rest) -> XQ int8 (M, *rest), XS f32 (M,)``:
  ``s = max(max|x|, 1e-8) / 127``, ``q = clamp(round_half_even(x / s), -127, 127)``.
* :func:`pack_sign_nchw` -- ``X f32 (M, C, H, W) -> XP int32 (M, H, W, G, CWg)``: each pixel's
  group ``g`` channels ``g*cg .. (g+1)*cg - 1`` packed into that group's own ``CWg`` words, the
  layout :func:`bitcompiler.kernels.conv2d_kernel` reads one tap from contiguously.

Schedules (CPU): the row packer ORs 32 comparison bits into a word with the bit loop fully unrolled
(constant shifts; LLVM turns the 32 compares into vector compares), parallel over rows. The NCHW
packer writes each word as one 32-bit expression and vectorizes over up to 32 neighbouring pixels
(a whole row of up to 32 when no power of two divides the width: 14x14 maps 5x faster),
so every channel plane is read contiguously, whole cache lines at a time (reading 32 channels of one
pixel strides by H*W floats per bit and thrashes the cache: 15x slower at 64x32x32; 8 pixels, half a
line, left 32 planes 4 KiB apart evicting each other between the two halves: 4x slower than 32),
parallel over the batch and image rows. The int8 quantizer reduces ``max|x|`` with an 8-lane rfactor (vectorized ``vmaxps``), then
divides/rounds/clamps vectorized, parallel over the batch. Each runs on one thread where one
sample is less work than ``PARALLEL_MIN`` (:func:`bitcompiler.kernels._common.threads_pay`: a
parallel launch costs more than it saves; for the NCHW packer the work is the floats it reads, 32
a word). Rounding uses ``nearbyint`` (the
default round-half-to-even mode), matching ``torch.round``; ``x / s`` is a true float32 division
as in the reference, not a multiplication by the reciprocal.
"""

from __future__ import annotations

import math
from typing import Any

from tvm import s_tir, te, tirx

from bitcompiler.kernels import finite
from bitcompiler.kernels._common import (
    PARALLEL_MIN,
    batch_var,
    i64,
    largest_divisor,
    or_reducer,
    shape64,
    target_kind,
    threads_pay,
)
from bitcompiler.quant.numerics import EPS, num_words

F32 = "float32"


def _bit(cond, j) -> tirx.PrimExpr:
    # shift the 0/1 value, never a constant 1: 1 << 31 would not fold into an int32 literal
    return tirx.Select(cond, tirx.const(1, "int32"), tirx.const(0, "int32")) << j.astype("int32")


def pack_sign_rows(k: int, target: str | dict | Any = "llvm") -> tirx.PrimFunc:
    """``X f32 (M, K) -> XP int32 (M, ceil(K / 32))``; sign bits, LSB first, zero tail."""
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    kw = num_words(k)
    M = batch_var()
    X = te.placeholder(shape64(M, k), F32, "X")
    j = te.reduce_axis((i64(0), i64(32)), "j")
    bor = or_reducer()

    def word(m, w):
        idx = w * 32 + j.var
        cond = X[m, idx] >= tirx.const(0.0, F32)
        if k % 32:
            cond = tirx.if_then_else(idx < k, cond, False)
        return bor(_bit(cond, j.var), axis=[j])

    XP = te.compute(shape64(M, kw), word, name="XP")
    func = te.create_prim_func([X, XP])
    if target_kind(target) == "llvm":
        sch = s_tir.Schedule(func)
        b = sch.get_sblock("XP")
        m, _w, jj = sch.get_loops(b)
        if threads_pay(func):  # one sample of PARALLEL_MIN sign bits (see quantize_rows_int8)
            sch.parallel(m)
        sch.unroll(jj)
        func = sch.mod["main"]
    return func.with_attr("global_symbol", "main")


def int8_scale(amax: tirx.PrimExpr) -> tirx.PrimExpr:
    """The int8 scale of a row whose largest magnitude is ``amax``: ``max(amax, EPS) / 127`` (float32)."""
    return tirx.max(amax, tirx.const(EPS, F32)) / tirx.const(127.0, F32)


def int8_round(x: tirx.PrimExpr, s: tirx.PrimExpr, lanes: int = 1) -> tirx.PrimExpr:
    """``clamp(round_half_even(x / s), -127, 127)`` as int8 (``lanes``: x and s are vectors of that many)."""

    def const(v: float) -> tirx.PrimExpr:
        c = tirx.const(v, F32)
        return c if lanes == 1 else tirx.Broadcast(c, lanes)

    r = tirx.min(tirx.max(tirx.nearbyint(x / s), const(-127.0)), const(127.0))
    return r.astype("int8" if lanes == 1 else f"int8x{lanes}")


def quantize_rows_int8(
    shape_without_batch: tuple, target: str | dict | Any = "llvm", check: bool = False
) -> tirx.PrimFunc:
    """``X f32 (M, *rest) -> (XQ int8 (M, *rest), XS f32 (M,))``: per-sample symmetric int8.

    ``check=True``: the kernel raises on a NaN or Inf in ``X`` (:mod:`bitcompiler.kernels.finite`;
    for a model's input, whose Python check it then replaces): ``max|x|`` is reduced over the
    floats' bits without their sign (the same maximum for finite values), and a row's largest
    reaching the exponent field's all-ones is the check, at no extra pass."""
    rest = tuple(shape_without_batch)
    if not rest or not all(isinstance(d, int) and d >= 1 for d in rest):
        raise ValueError(
            f"shape_without_batch must be a non-empty tuple of positive ints, got {shape_without_batch!r}"
        )
    n = math.prod(rest)
    M = batch_var()
    X = te.placeholder(shape64(M, *rest), F32, "X")

    # flat index -> multi-index over rest
    def unflat(f):
        idx = []
        for d in reversed(rest):
            idx.append(f % d)
            f = f // d
        return tuple(reversed(idx))

    k = te.reduce_axis((i64(0), i64(n)), "k")
    if check:
        amax = te.compute(
            shape64(M), lambda m: te.max(finite.magnitude_bits(X[(m, *unflat(k.var))]), axis=[k]), name="amax"
        )
        XS = te.compute(shape64(M), lambda m: int8_scale(tirx.reinterpret(F32, amax[m])), name="XS")
    else:
        amax = te.compute(
            shape64(M), lambda m: te.max(tirx.abs(X[(m, *unflat(k.var))]), axis=[k]), name="amax"
        )
        XS = te.compute(shape64(M), lambda m: int8_scale(amax[m]), name="XS")
    XQ = te.compute(shape64(M, *rest), lambda m, *idx: int8_round(X[(m, *idx)], XS[m]), name="XQ")
    func = te.create_prim_func([X, XQ, XS])
    if target_kind(target) == "llvm":
        # rows in parallel where one row is work enough (PARALLEL_MIN): the rows are the batch (or
        # a batch of tokens), unknown here, and a few thousand elements take under a microsecond
        threads = threads_pay(func)
        sch = s_tir.Schedule(func)
        _rows_max(sch, "amax", n, threads, (8,))
        qb = sch.get_sblock("XQ")
        loops = sch.get_loops(qb)
        inner = sch.fuse(*loops[1:]) if len(loops) > 2 else loops[1]
        vq = largest_divisor(n, (16, 8))
        if vq > 1:
            _, vi = sch.split(inner, [None, vq])
            sch.vectorize(vi)
        if threads:
            sch.parallel(loops[0])
        func = sch.mod["main"]
    if check:
        func = finite.check_rows(func, "amax", 0)
    return func.with_attr("global_symbol", "main")


def pack_sign_nchw(
    c: int, h: int, w: int, groups: int, target: str | dict | Any = "llvm", check: bool = False
) -> tirx.PrimFunc:
    """``X f32 (M, C, H, W) -> XP int32 (M, H, W, G, CWg)``; group g packs channels g*cg..(g+1)*cg-1.

    ``check=True``: the kernel raises on a NaN or Inf in ``X`` (:mod:`bitcompiler.kernels.finite`;
    for a model's input, whose Python check it then replaces): each row's largest exponent field,
    one more vectorized pass over ``X`` (in cache beside the packing's)."""
    for name, v in (("c", c), ("h", h), ("w", w), ("groups", groups)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if c % groups:
        raise ValueError(f"groups={groups} must divide c={c}")
    cg = c // groups
    cwg = num_words(cg)
    M = batch_var()
    X = te.placeholder(shape64(M, c, h, w), F32, "X")

    def word(m, y, x, g, wd):
        # the 32 bits as one expression (no reduction), so the schedule can vectorize over x:
        # eight neighbouring pixels read eight contiguous floats of each channel plane
        out = None
        for j in range(32):
            ch = wd * 32 + j
            cond = X[m, g * cg + ch, y, x] >= tirx.const(0.0, F32)
            if cg % 32:
                cond = tirx.if_then_else(ch < cg, cond, False)
            bit = _bit(cond, tirx.const(j, "int32"))
            out = bit if out is None else out | bit
        return out

    XP = te.compute(shape64(M, h, w, groups, cwg), word, name="XP")
    func = te.create_prim_func([X, XP])
    # the work is the floats read, 32 a word written: a 64-channel 32x32 map (8 KiB of words, 256
    # KiB of floats) is threads' work, and a binary conv after it reads the rows each task packed
    threads = c * h * w >= PARALLEL_MIN
    if check:
        k = te.reduce_axis((i64(0), i64(c * h * w)), "k")
        EX = te.compute(
            shape64(M),
            lambda m: te.max(finite.exponent_field(X[m, k // (h * w), k % (h * w) // w, k % w]), axis=[k]),
            name="EX",
        )
        func = te.create_prim_func([X, XP, EX])
    if target_kind(target) == "llvm":
        sch = s_tir.Schedule(func)
        if check:
            _rows_max(sch, "EX", c * h * w, threads)
        b = sch.get_sblock("XP")
        m, y, x, g, wd = sch.get_loops(b)
        # eight or sixteen pixels of the plane a step (rows and columns fused: a 14x14 plane has
        # no vector of whole rows, and unvectorized 256 channels took 10x as long); failing that a
        # whole row as one vector (14: LLVM splits it into 8 + 4 + 2 lanes), not scalars
        v = largest_divisor(h * w, (16, 8))
        if v == 1:
            v = w if 4 <= w <= 32 else largest_divisor(h * w, (4,))
        if v > 1:
            so, si = sch.split(sch.fuse(y, x), [None, v])
            sch.reorder(m, so, g, wd, si)
            sch.vectorize(si)
            if threads:  # one sample of PARALLEL_MIN words (see quantize_rows_int8)
                sch.parallel(sch.fuse(m, so))
        elif threads:
            sch.parallel(sch.fuse(m, y))
        func = sch.mod["main"]
    if check:
        func = finite.check_rows(func, "EX", 0)
    return func.with_attr("global_symbol", "main")


def _rows_max(sch: Any, name: str, n: int, threads: bool, lanes: tuple = (16, 8)) -> None:
    """Schedule the per-row max reduction ``name`` over ``n`` contiguous values: the first of
    ``lanes`` dividing ``n`` (an rfactor: one vector ``max`` a step), rows in parallel where
    ``threads``."""
    b = sch.get_sblock(name)
    _m, kk = sch.get_loops(b)
    v = largest_divisor(n, lanes)
    if v == 1:
        return
    _ko, ki = sch.split(kk, [None, v])
    rf = sch.rfactor(ki, 1)
    rl = sch.get_loops(rf)  # m, ko, ki
    sch.reorder(rl[0], rl[1], rl[2])
    sch.vectorize(rl[2])
    if threads:
        sch.parallel(rl[0])
    sch.decompose_reduction(rf, rl[1])
