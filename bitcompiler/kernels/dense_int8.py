"""AVX2 dense kernels for int8 activations, written as explicit vector TIR (helpers shared with
:mod:`bitcompiler.kernels.dense_avx2`).

**int8 activations** (:func:`int8_dense_func`, bits 1..7, ``vpmaddubsw``): a 256-bit load of one
plane holds 256 weights; byte ``L`` bit ``b`` is the weight of ``k = 8L + b``. The activations are
permuted once per call to match (``XT[b*32 + L] = x[8L + b]`` per 256-block, amortized over all N
rows), so the codes of bit ``b`` are one shift + mask of the plane bytes, multiplied by
``XT[b]`` with ``vpmaddubsw`` (u8 code x s8 activation, exact: ``2 * 127 * (2^B - 1) < 2^15``) into
int16, widened once per block with ``vpmaddwd`` (per product for B >= 5 so int16 never overflows).
Two planes (W2) are first interleaved (``(P0 & 0x55) | (P1 & 0x55) << 1`` and the odd bits alike),
so each code is one shift + mask instead of two: ~40 ops per 256 weights. K % 256 is a scalar tail.
When K % 256 == 0 the CPU lowering stores the weights already interleaved (:func:`interleave_w2`)
and the codes are masked in place, scaled by 4^p, with one int16 sum per scale (see
:func:`int8_dense_func`): ~27 ops per 256 weights, 4096x4096 0.29 -> 0.22 ms.

**8-bit weights** (:func:`int8_codes_dense_func`): the CPU lowering stores one byte per code
(:func:`weight_codes`, the same bits as the 8 planes) and ``vpmaddwd`` multiplies 16 zero-extended
codes by 16 sign-extended activations. Decoding 8 planes per code was 18x slower at K = 4096, and
K < 256 is all scalar tail in the plane kernel (a 48-input patch embedding at batch 64: 2.79 ms ->
70 us).

Measured in one process (``TVM_NUM_THREADS=1``, 4096x4096, batch 1, whole ``cm(x)``, znver3, a
shared and noisy VM): W2A8 0.36 ms at first, 0.24-0.26 ms with interleaved codes (plain schedule
2.5 ms) vs ORT dynamic int8 0.64-1.4 ms and torch dynamic int8 4.4 ms.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from tvm import tirx
from tvm.script import tirx as T

from bitcompiler.kernels._common import PARALLEL_MIN
from bitcompiler.kernels.dense_avx2 import F32, U8, _bc, _epilogue, _tree_sum
from bitcompiler.kernels.spec import DenseSpec

BLOCK = 256  # weights per 256-bit plane load (int8 kernel)
INT8_MAX_BITS = 7  # u8 codes up to 127: one vpmaddubsw pair sum (2 * 127 * 127) stays below 2^15


def int8_fits(spec: DenseSpec) -> bool:
    return spec.act == "int8" and spec.bits <= INT8_MAX_BITS


def _int8_entry(spec: DenseSpec, body: Any, w_shape: tuple, w_dtype: str) -> tirx.PrimFunc:
    """The int8-activation kernels' entry: ``XQ int8 (M, K), XS f32 (M,)``, the weights ``W``
    (``w_shape``, ``w_dtype``), then ``TS, TH`` or ``SC, OF, BI``, then ``Y``; ``body(XQ, XS, W, Y,
    E0, E1, E2, M)`` is the kernel's macro."""
    K, N = spec.in_features, spec.out_features
    ws = tuple(T.int64(d) for d in w_shape)
    if spec.threshold:

        @T.prim_func(s_tir=True)
        def func(xq: T.handle, xs: T.handle, w: T.handle, ts: T.handle, th: T.handle, y: T.handle):
            M = T.int64()
            XQ = T.match_buffer(xq, (M, T.int64(K)), "int8")
            XS = T.match_buffer(xs, (M,), F32)
            W = T.match_buffer(w, ws, w_dtype)
            TS = T.match_buffer(ts, (T.int64(N),), "int32")
            TH = T.match_buffer(th, (T.int64(N),), "int32")
            Y = T.match_buffer(y, (M, T.int64(N)), F32)
            body(XQ, XS, W, Y, TS, TH, TH, M)

        return func

    @T.prim_func(s_tir=True)  # type: ignore[no-redef]
    def func(xq: T.handle, xs: T.handle, w: T.handle, sc: T.handle, of: T.handle, bi: T.handle, y: T.handle):
        M = T.int64()
        XQ = T.match_buffer(xq, (M, T.int64(K)), "int8")
        XS = T.match_buffer(xs, (M,), F32)
        W = T.match_buffer(w, ws, w_dtype)
        SC = T.match_buffer(sc, (T.int64(N),), F32)
        OF = T.match_buffer(of, (T.int64(N),), F32)
        BI = T.match_buffer(bi, (T.int64(N),), F32)
        Y = T.match_buffer(y, (M, T.int64(N)), F32)
        body(XQ, XS, W, Y, SC, OF, BI, M)

    return func


def _row_sums(spec: DenseSpec, nb: int, chunks: int, step: int, dot: Any, tail: Any, acc_of: Any) -> Any:
    """The int8 kernels' loop nest as a macro ``rows(W, X, WT, XQ, XS, Y, E0, E1, E2, M)``: over
    blocks of ``nb`` output rows (in parallel from ``PARALLEL_MIN`` multiply-adds), per batch row ``int32x8`` partial sums of ``dot(W, X, n, m, c)``
    over ``chunks`` chunks of ``step`` inputs (in registers), their horizontal sum, the scalar tail
    ``tail(WT, n, k) * XQ[m, k]`` for ``k >= chunks * step``, and the epilogue of
    ``acc_of(sum, sumx)`` (``sumx = sum_k XQ[m, k]``)."""
    K, N = spec.in_features, spec.out_features

    @T.macro
    def row_block(W, X, WT, XQ, XS, Y, E0, E1, E2, M, SX, no):
        for m in range(M):
            # "global" scope: a stack array LLVM keeps in registers (see dense.py's docstring)
            a32 = T.alloc_buffer((nb * 8,), "int32", scope="global")
            red = T.alloc_buffer((nb,), "int32", scope="global")
            for r in T.unroll(nb):
                a32[T.ramp(r * 8, 1, 8)] = _bc(0, "int32", 8)
            for c in range(T.int64(chunks)):
                for r in T.unroll(nb):
                    a32[T.ramp(r * 8, 1, 8)] = a32[T.ramp(r * 8, 1, 8)] + dot(W, X, no * nb + r, m, c)
            for r in T.unroll(nb):
                red[r] = 0
                for lane in range(8):
                    red[r] = red[r] + a32[r * 8 + lane]
                for k in range(T.int64(chunks * step), T.int64(K)):
                    red[r] = red[r] + tail(WT, no * nb + r, k) * T.Cast("int32", XQ[m, k])
                Y[m, no * nb + r] = _epilogue(
                    spec, acc_of(red[r], SX[m]), SX[m], XS[m], no * nb + r, E0, E1, E2
                )

    @T.macro
    def rows(W, X, WT, XQ, XS, Y, E0, E1, E2, M):
        SX = T.alloc_buffer((M,), "int32")
        for m in range(M):
            SX[m] = 0
            for k in range(T.int64(K)):
                SX[m] = SX[m] + T.Cast("int32", XQ[m, k])
        # threads only for work they pay for (PARALLEL_MIN): a 256 x 10 classifier at batch 1 is
        # 2,560 multiply-adds, under a microsecond
        if M * T.int64(K * N) >= T.int64(PARALLEL_MIN):
            for no in T.parallel(T.int64(N // nb)):
                row_block(W, X, WT, XQ, XS, Y, E0, E1, E2, M, SX, no)
        else:
            for no in range(T.int64(N // nb)):
                row_block(W, X, WT, XQ, XS, Y, E0, E1, E2, M, SX, no)

    return rows


# --------------------------------------------------------------------------- int8 activations
def w2_interleaved_fits(spec: DenseSpec) -> bool:
    """2-bit weights with int8 activations and whole 256-weight blocks: :func:`interleave_w2` applies."""
    return int8_fits(spec) and spec.bits == 2 and spec.in_features % BLOCK == 0


def interleave_w2(planes: np.ndarray) -> np.ndarray:
    """``P (2, N, KW) int32`` -> the same shape holding the two planes' bits interleaved into 2-bit
    codes: plane 0 byte ``L`` holds the codes of ``k = 8L + 0, 2, 4, 6`` at bits (0-1, 2-3, 4-5,
    6-7), plane 1 those of ``k = 8L + 1, 3, 5, 7``. The kernel then masks codes out of the bytes
    it loads instead of interleaving the planes on every call (8 vector ops per 256 weights)."""
    p0, p1 = (np.ascontiguousarray(planes[i]).view(U8) for i in range(2))
    even = (p0 & 0x55) | ((p1 & 0x55) << 1)
    odd = ((p0 >> 1) & 0x55) | (p1 & 0xAA)
    return np.stack([even, odd]).view(np.int32).reshape(planes.shape)


def int8_dense_func(spec: DenseSpec, interleaved: bool = False) -> tirx.PrimFunc:
    """``act="int8"``, bits <= 7: ``vpmaddubsw`` over codes decoded from 256-bit plane loads.

    ``interleaved`` (:func:`w2_interleaved_fits`): ``P`` holds :func:`interleave_w2`'s codes, and each
    code is one mask (``(u & 3 << 2p) = 4^p q``) or, for the top one, one shift. Products with the
    same 4^p share an int16 sum, which is shifted back exactly (every term is a multiple of 4^p)
    before the three sums are added: ``|sum| <= 3048 + 1524 + 1524``, no int16 overflow.
    """
    K, N, B, KW = spec.in_features, spec.out_features, spec.bits, spec.words
    if interleaved and not w2_interleaved_fits(spec):
        raise ValueError(
            f"interleaved 2-bit codes need 2-bit weights, int8 activations and K % {BLOCK} == 0: {spec}"
        )
    C = K // BLOCK
    pm1 = spec.code == "pm1"
    nb = 2 if N % 2 == 0 else 1
    widen_each = (2**B - 1) * 127 * 2 * 8 > 2**15 - 1  # 8 int16 products per block would overflow

    def plane(PB, i, n, c):
        return PB[i, n, T.ramp(c * 32, T.int64(1), 32)]

    def codes(PB, n, c, b):
        """u8 lanes: the codes of k = 256c + 8L + b, L = 0..31."""
        if B == 2:
            v0, v1 = plane(PB, 0, n, c), plane(PB, 1, n, c)
            m55 = _bc(0x55, U8, 32)
            if b % 2 == 0:  # bit pairs (2p, 2p+1) hold the code of bit 2p
                u = (v0 & m55) | ((v1 & m55) << _bc(1, U8, 32))
            else:  # ... and of bit 2p + 1
                u = ((v0 >> _bc(1, U8, 32)) & m55) | (v1 & _bc(0xAA, U8, 32))
            p = b // 2
            t = (u >> _bc(2 * p, U8, 32)) if p else u
            return t & _bc(3, U8, 32) if p < 3 else t
        q = None
        for i in range(B):
            v, s = plane(PB, i, n, c), b - i
            t = (v >> _bc(s, U8, 32)) if s > 0 else ((v << _bc(-s, U8, 32)) if s < 0 else v)
            t = t & _bc(1 << i, U8, 32)
            q = t if q is None else q | t
        return q

    def widen(v):
        return T.call_llvm_pure_intrin("int32x8", "llvm.x86.avx2.pmadd.wd", v, _bc(1, "int16", 16))

    def pmadd(codes, XT, m, c, b):
        return T.call_llvm_pure_intrin(
            "int16x16", "llvm.x86.avx2.pmadd.ub.sw", codes, XT[m, T.ramp(c * BLOCK + b * 32, T.int64(1), 32)]
        )

    def block_dot_interleaved(PB, XT, n, m, c):
        """int32x8 partial sums over block c from interleaved codes (see the docstring)."""
        u = [plane(PB, 0, n, c), plane(PB, 1, n, c)]  # codes of even b, odd b
        by_scale = {1: [], 4: [], 16: []}
        for b in range(8):
            p = b // 2
            if p == 3:
                by_scale[1].append(pmadd(u[b % 2] >> _bc(6, U8, 32), XT, m, c, b))
            else:
                by_scale[4**p].append(pmadd(u[b % 2] & _bc(3 << 2 * p, U8, 32), XT, m, c, b))
        g1, g4, g16 = (_tree_sum(by_scale[k]) for k in (1, 4, 16))
        return widen(g1 + (g4 >> _bc(2, "int16", 16)) + (g16 >> _bc(4, "int16", 16)))

    def block_dot(PB, XT, n, m, c):
        """int32x8 partial sums of sum_k q[n, k] * x[m, k] over block c."""
        if interleaved:
            return block_dot_interleaved(PB, XT, n, m, c)
        tot = None
        for b in range(8):
            t = pmadd(codes(PB, n, c, b), XT, m, c, b)
            if widen_each:
                t = widen(t)
            tot = t if tot is None else tot + t
        return tot if widen_each else widen(tot)

    def tail_code(P, n, k):
        q = None
        for i in range(B):
            t = ((P[i, n, k // 32] >> T.Cast("int32", k % 32)) & 1) << i
            q = t if q is None else q | t
        return q

    def acc_of(acc, sumx):
        return acc * 2 - sumx if pm1 else acc

    rows = _row_sums(spec, nb, C, BLOCK, block_dot, tail_code, acc_of)

    @T.macro
    def body(XQ, XS, P, Y, E0, E1, E2, M):
        PB = T.decl_buffer((T.int64(B), T.int64(N), T.int64(4 * KW)), U8, data=P.data)
        XT = T.alloc_buffer((M, T.int64(max(C, 1) * BLOCK)), "int8")
        for m, c, b, lane in T.grid(M, T.int64(C), T.int64(8), T.int64(32)):
            XT[m, c * BLOCK + b * 32 + lane] = XQ[m, c * BLOCK + lane * 8 + b]
        rows(PB, XT, P, XQ, XS, Y, E0, E1, E2, M)

    return _int8_entry(spec, body, (B, N, KW), "int32")


# --------------------------------------------------------------------------- 8-bit codes, int8 activations
CODES_ROWS = 4  # output rows sharing each widened activation vector


def codes_fits(spec: DenseSpec) -> bool:
    """8-bit uint weights with int8 activations: :func:`int8_codes_dense_func` on whole-byte codes."""
    return spec.act == "int8" and spec.code == "uint" and spec.bits == 8


def weight_codes(planes: np.ndarray, k: int) -> np.ndarray:
    """``P (8, N, KW) int32`` -> the codes ``Q (N, K) uint8`` (one byte per 8-bit weight, as the planes)."""
    bits = np.unpackbits(np.ascontiguousarray(planes).view(U8), axis=-1, bitorder="little")[..., :k]
    return np.tensordot(1 << np.arange(planes.shape[0], dtype=np.int64), bits, axes=1).astype(U8)


def int8_codes_dense_func(spec: DenseSpec) -> tirx.PrimFunc:
    """``act="int8"``, 8-bit uint weights stored as bytes ``Q (N, K)``: ``vpmaddwd`` on 16 codes
    (zero-extended) times 16 activations (sign-extended) per op, int32 sums (exact: 2 * 255 * 127
    per pair). The plane kernel would decode 8 planes per code, and K < 256 is all scalar tail
    there (a 48-input patch embedding at batch 64: 1.3 ms). Buffers ``XQ, XS, Q``, then ``TS, TH``
    or ``SC, OF, BI``, then ``Y``."""
    if not codes_fits(spec):
        raise ValueError(f"the 8-bit codes kernel needs uint 8-bit weights and int8 activations: {spec}")
    K, N = spec.in_features, spec.out_features
    C, V = K // 16, 16
    nb = CODES_ROWS if N % CODES_ROWS == 0 else 1

    def madd(Q, XQ, n, m, c):
        q = T.Cast("int16x16", Q[n, T.ramp(c * V, T.int64(1), V)])
        x = T.Cast("int16x16", XQ[m, T.ramp(c * V, T.int64(1), V)])
        return T.call_llvm_pure_intrin("int32x8", "llvm.x86.avx2.pmadd.wd", q, x)

    def tail(Q, n, k):
        return T.Cast("int32", Q[n, k])

    rows = _row_sums(spec, nb, C, V, madd, tail, lambda acc, _sumx: acc)

    @T.macro
    def body(XQ, XS, Q, Y, E0, E1, E2, M):
        rows(Q, XQ, Q, XQ, XS, Y, E0, E1, E2, M)

    return _int8_entry(spec, body, (N, K), U8)
