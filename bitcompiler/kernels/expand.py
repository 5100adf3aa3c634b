"""Planes from a compact stream (:func:`bitcompiler.quant.numerics.planes_to_stream`).

``S int32 (stream words,) -> P int32 (*rows, RW)``: row ``r`` holds ``cg`` codes, bit ``c`` of
word ``w`` is stream bit ``r·cg + 32w + c`` (zero past ``cg``). Each word is one funnel shift of
two neighbouring stream words, masked to the row's codes: no loop over bits. The second read is
clamped to the last word (a word that ends the stream needs nothing past it). Flat, vectorized.
"""

from __future__ import annotations

import functools
import math

from tvm import s_tir, te, tirx

from bitcompiler.kernels._common import i64
from bitcompiler.quant.numerics import num_words, stream_words


@functools.cache
def expand_planes_kernel(shape: tuple[int, ...], cg: int) -> tirx.PrimFunc:
    """``S (stream) -> P (shape)`` where ``shape[-1] == ceil(cg / 32)`` words per row."""
    rows, rw = math.prod(shape[:-1]), shape[-1]
    if rw != num_words(cg):
        raise ValueError(f"rows of {cg} codes take {num_words(cg)} words, not {rw}")
    n = stream_words(rows * cg)
    S = te.placeholder((i64(n),), "int32", "S")

    def word(i):  # flat word index i = r·rw + w
        r, w = i // rw, i % rw
        start = r * cg + w * 32
        lo = S[start // 32].astype("int64") & tirx.const(0xFFFFFFFF, "int64")
        hi = S[tirx.min(start // 32 + 1, n - 1)].astype("int64") << tirx.const(32, "int64")
        bits = ((lo | hi) >> (start % 32)) & tirx.const(0xFFFFFFFF, "int64")
        count = tirx.min(cg - w * 32, 32)  # codes in this word
        mask = (tirx.const(1, "int64") << count.astype("int64")) - tirx.const(1, "int64")
        return (bits & mask).astype("int32")

    P = te.compute((i64(rows * rw),), word, name="P")
    func = te.create_prim_func([S, P])
    sch = s_tir.Schedule(func)
    (i,) = sch.get_loops(sch.get_sblock("P"))
    if rows * rw >= 8:
        _, inner = sch.split(i, [None, 8])
        sch.vectorize(inner)
    return sch.mod["main"].with_attr("global_symbol", "main")
