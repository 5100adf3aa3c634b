"""W1A1 dense with output rows in vector lanes and Harley-Seal carry-save popcounts (AVX2).

The byte-lane kernel (:mod:`bitcompiler.kernels.dense_binary`) spends 8 vector ops on every 32
weight bytes: XOR with the activations, split into nibbles (and, shift, and), two ``vpshufb``
lookups, two adds. Three of the eight (the shift and the lookups) run on only two of znver3's four
vector pipes. This kernel needs about 6, all of them plain bitwise ops on any pipe.

It stores the weights **transposed in groups of 32 rows** (:func:`lanes_layout`):
``PT[g, kb, r]`` is byte ``kb`` (inputs ``8kb .. 8kb+7``) of row ``32g + r``. One 32-byte vector
is then the same 8 inputs for 32 rows, and a lane counts for one row only. A row's popcount over
K inputs becomes a sum of ``K/8`` vectors per lane. That is long enough for Harley and Seal's
carry-save adder tree (Muła, Kurz and Lemire, "Faster population counts using AVX2 instructions",
2018):

* the kernel packs the activation signs itself (bit 1 = ``x >= 0``), then
  ``d = PT[g, kb] ^ XB[kb]``, ``XB[kb]`` the activation byte ``kb`` in all 32 lanes: broadcast in
  memory once per call at batch 1, by a broadcasting load (``vpbroadcastb``) for a batch;
* 16 vectors ``d`` go through 15 carry-save adders (5 ops each) into running ``ones, twos, fours,
  eights`` vectors and one ``sixteens`` vector;
* only ``sixteens`` is popcounted (per byte lane, the nibble table), summed in uint8 for up to 31
  blocks and then widened to uint16.

At the end, per lane,
``count = 16*c16 + 8*pc(eights) + 4*pc(fours) + 2*pc(twos) + pc(ones)``, and ``acc = K - 2*count``
exactly as :func:`bitcompiler.quant.numerics.bit_linear` defines it for pm1 weights and binary
activations.

Measured on znver3, one thread, 4096x4096, kernel alone: batch 1 46 µs against 65 µs for the
byte-lane kernel (a C version of the same loop with intrinsics: 45 µs); batch 64 2.93 ms against
3.37 ms. Both are compute-bound: a 512-row slice that fits in L2 runs at the same rate per vector
(about 2 cycles per 32 weight bytes).

``expand``/``scales`` (:func:`lanes_func`) make it the fused row-aligned tiled layer, as for the
byte-lane kernel. The CPU lowering stores the weights transposed
(:func:`bitcompiler.kernels.relaid_dense_kernel`); the report's bytes are the same.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from tvm import tirx
from tvm.script import tirx as T

from bitcompiler.kernels.spec import DenseSpec
from bitcompiler.kernels.template import Choose, Template, scheduled

ROWS = 32  # rows per group: one uint8 lane each in a 256-bit vector
BLOCK = 16  # vectors per Harley-Seal block (15 carry-save adders)
MAX_CHUNK = 31  # blocks whose sixteens popcounts (<= 8 each) add up in uint8 without overflow
U8, U16, F32 = "uint8", "uint16", "float32"
# stack slots (32 bytes each) of the carry-save state and temporaries
ONES, TWOS, FOURS, EIGHTS, C16, TA, TB, FA, FB, EA, EB, SIX, U = range(13)


def fits(spec: DenseSpec) -> bool:
    """pm1 weights, binary activations, whole row groups and whole Harley-Seal blocks."""
    return (
        spec.act == "binary"
        and spec.code == "pm1"
        and spec.bits == 1
        and spec.out_features % ROWS == 0
        and spec.in_features % (8 * BLOCK) == 0
    )


def lanes_layout(planes: np.ndarray) -> np.ndarray:
    """``P (1, N, KW) int32`` (the packed pm1 plane) -> ``PT (N/32, K/8, 32) uint8``, rows in lanes."""
    _, n, kw = planes.shape
    rows = np.ascontiguousarray(planes[0]).view(U8).reshape(n, 4 * kw)  # little-endian: byte kb = bits 8kb..
    return np.ascontiguousarray(rows.reshape(n // ROWS, ROWS, 4 * kw).transpose(0, 2, 1))


def lanes_func(spec: DenseSpec, expand: int = 1, scales: int = 0) -> tirx.PrimFunc:
    """TVMScript of the kernel: ``X (M, K) f32, PT (G, KB, 32) uint8``, then ``TS, TH`` or
    ``SC, OF, BI``, then ``Y (M, N) f32``. The kernel packs X's signs itself (bit 1 = ``x >= 0``, as
    :func:`bitcompiler.kernels.pack_sign_rows`): one call instead of two.

    ``expand = p > 1`` is the fused row-aligned tiled layer (as
    :func:`bitcompiler.kernels.dense_binary.binary_bytes_func`): the N rows are the tile's distinct
    rows, ``Y (M, p*N)`` gets each row's accumulator p times, ``Y[m, c*N + n] = SC[(c*N + n) *
    scales // (p*N)] * acc[m, n] + BI[c*N + n]`` or the threshold; the buffers are then ``X, PT, SC
    (scales,), BI`` or ``X, PT, TS, TH`` (no offsets).

    Written as scalar statements in ``T.vectorized(32)`` lane loops (one vector statement each
    after lowering), so that MetaSchedule can analyse it as a template; a Python-level ``x = e``
    would become a buffer (a workspace allocated per row group), so values are built by helpers.
    """
    K, N = spec.in_features, spec.out_features
    G, KB = N // ROWS, K // 8
    blocks = KB // BLOCK
    chunk = max(c for c in range(1, min(blocks, MAX_CHUNK) + 1) if blocks % c == 0)
    chunks = blocks // chunk
    NO = N * expand  # outputs per batch row
    S_ = scales or NO

    def sidx(c, o):
        """Scale index of output ``o = c*N + n`` (copy c): per output, or per chunk (scales = p:
        ``o * p // (p*N)`` is c, given directly so that no lane divides)."""
        if S_ == NO:
            return o
        return c if S_ == expand else (o * S_) // NO

    def val(S, PT, XB, g, m, ch, blk, src, r):
        """Lane r of a carry-save operand: input vector ``src < BLOCK`` of block (ch, blk) (weights
        XOR activations) or stack slot ``src - BLOCK``."""
        if src >= BLOCK:
            return S[(src - BLOCK) * ROWS + r]
        kb = (ch * chunk + blk) * BLOCK + src
        if len(XB.shape) == 2:  # packed bytes, broadcast by the load (vpbroadcastb)
            return PT[g, kb, r] ^ XB[m, kb]
        return PT[g, kb, r] ^ XB[m, kb, r]  # bytes already broadcast in memory

    @T.macro
    def csa(S, PT, XB, g, m, ch, blk, h, a, b, c):
        """(S[h], S[a]) <- carry and sum of S[a] + b + c, bit-wise (the sum replaces S[a])."""
        for r in T.vectorized(ROWS):
            S[U * ROWS + r] = val(S, PT, XB, g, m, ch, blk, b, r) ^ val(S, PT, XB, g, m, ch, blk, c, r)
        for r in T.vectorized(ROWS):
            S[h * ROWS + r] = (val(S, PT, XB, g, m, ch, blk, b, r) & val(S, PT, XB, g, m, ch, blk, c, r)) | (
                S[a * ROWS + r] & S[U * ROWS + r]
            )
        for r in T.vectorized(ROWS):
            S[a * ROWS + r] = S[a * ROWS + r] ^ S[U * ROWS + r]

    @T.macro
    def csa8(S, PT, XB, g, m, ch, blk, first, carry):
        """Inputs ``first .. first+7`` of block (ch, blk) added into the ones, twos and fours
        slots, their carry out to slot ``carry`` (half of a 16-input Harley-Seal step; slot operands
        are ``BLOCK + slot``, see ``val``)."""
        csa(S, PT, XB, g, m, ch, blk, TA, ONES, first, first + 1)
        csa(S, PT, XB, g, m, ch, blk, TB, ONES, first + 2, first + 3)
        csa(S, PT, XB, g, m, ch, blk, FA, TWOS, BLOCK + TA, BLOCK + TB)
        csa(S, PT, XB, g, m, ch, blk, TA, ONES, first + 4, first + 5)
        csa(S, PT, XB, g, m, ch, blk, TB, ONES, first + 6, first + 7)
        csa(S, PT, XB, g, m, ch, blk, FB, TWOS, BLOCK + TA, BLOCK + TB)
        csa(S, PT, XB, g, m, ch, blk, carry, FOURS, BLOCK + FA, BLOCK + FB)

    def acc_of(S, C, r):
        """``K - 2 * count`` of lane r from the carry-save state (Horner over 16, 8, 4, 2, 1)."""
        count = C[r]
        for slot in (EIGHTS, FOURS, TWOS, ONES):
            count = count * T.uint16(2) + T.Cast(U16, T.popcount(S[slot * ROWS + r]))
        return K - 2 * T.Cast("int32", count)

    def thr_value(TS, TH, acc, c, n):
        hit = T.Cast("int64", TS[n]) * T.Cast("int64", acc) >= T.Cast("int64", TH[n])
        return T.Select(hit, T.float32(1.0), T.float32(-1.0))

    def aff_value(SC, BI, acc, c, n):
        return SC[sidx(c, n)] * T.Cast(F32, acc) + BI[n]

    t = BLOCK  # slot operands are BLOCK + slot (see val)

    def make(out_value):
        @T.macro
        def rows(PT, XB, Y, E0, E1, vg, vm):
            """One row group of one batch row: the carry-save sums, then the epilogue."""
            # "global" scope: a stack array whose constant-index vectors LLVM keeps in registers
            S = T.alloc_buffer((13 * ROWS,), U8, scope="global")
            C = T.alloc_buffer((ROWS,), U16, scope="global")
            for r in T.vectorized(4 * ROWS):
                S[r] = T.uint8(0)
            for r in T.vectorized(ROWS):
                C[r] = T.uint16(0)
            for ch in range(chunks):
                for r in T.vectorized(ROWS):
                    S[C16 * ROWS + r] = T.uint8(0)
                for blk in range(chunk):
                    csa8(S, PT, XB, vg, vm, ch, blk, 0, EA)
                    csa8(S, PT, XB, vg, vm, ch, blk, 8, EB)
                    csa(S, PT, XB, vg, vm, ch, blk, SIX, EIGHTS, t + EA, t + EB)
                    for r in T.vectorized(ROWS):
                        S[C16 * ROWS + r] = S[C16 * ROWS + r] + T.popcount(S[SIX * ROWS + r])
                for r in T.vectorized(ROWS):
                    C[r] = C[r] + T.Cast(U16, S[C16 * ROWS + r])
            for c in T.unroll(expand):
                for r in T.vectorized(ROWS):
                    Y[vm, c * N + vg * ROWS + r] = out_value(
                        E0, E1, acc_of(S, C, r), c, c * N + vg * ROWS + r
                    )

        @T.macro
        def body(X, PT, Y, M, E0, E1):
            XP = T.alloc_buffer((M, T.int64(spec.words)), "int32")
            for m, w in T.grid(M, T.int64(spec.words)):
                XP[m, w] = 0
                for j in T.unroll(32):
                    XP[m, w] = XP[m, w] | (T.Cast("int32", X[m, w * 32 + j] >= T.float32(0)) << j)
            XB8 = T.decl_buffer((M, T.int64(KB)), U8, data=XP.data)
            if M == 1:
                # one batch row: its bytes broadcast to 32 lanes in memory (16 KiB at K = 4096, in
                # L1): a plain load per input vector
                XB = T.alloc_buffer((T.int64(1), T.int64(KB), T.int64(ROWS)), U8)
                for kb in range(T.int64(KB)):
                    for r in T.vectorized(ROWS):
                        XB[0, kb, r] = XB8[0, kb]
                for g, m in T.grid(T.int64(G), M):
                    with T.sblock("rows1"):
                        vg, vm = T.axis.remap("SS", [g, m])
                        T.reads(PT[vg, 0:KB, 0:ROWS], XB[vm, 0:KB, 0:ROWS], E0[0 : E0.shape[0]], E1[0:NO])
                        T.writes(Y[vm, 0:NO])
                        rows(PT, XB, Y, E0, E1, vg, vm)
            else:
                # a batch: each byte broadcast by its load (vpbroadcastb), so a block of batch rows'
                # activations is 512 B each at K = 4096 instead of 16 KiB (8 % faster at batch 64,
                # 8 % slower at batch 1, where the in-memory broadcast above is used)
                for g, m in T.grid(T.int64(G), M):
                    with T.sblock("rows"):
                        vg, vm = T.axis.remap("SS", [g, m])
                        T.reads(PT[vg, 0:KB, 0:ROWS], XB8[vm, 0:KB], E0[0 : E0.shape[0]], E1[0:NO])
                        T.writes(Y[vm, 0:NO])
                        rows(PT, XB8, Y, E0, E1, vg, vm)

        return body

    if spec.threshold:

        @T.prim_func(s_tir=True)
        def func(x: T.handle, pt: T.handle, ts: T.handle, th: T.handle, y: T.handle):
            M = T.int64()
            X = T.match_buffer(x, (M, T.int64(K)), F32)
            PT = T.match_buffer(pt, (T.int64(G), T.int64(KB), T.int64(ROWS)), U8)
            TS = T.match_buffer(ts, (T.int64(NO),), "int32")
            TH = T.match_buffer(th, (T.int64(NO),), "int32")
            Y = T.match_buffer(y, (M, T.int64(NO)), F32)
            make(thr_value)(X, PT, Y, M, TS, TH)

        return func

    if expand > 1:

        @T.prim_func(s_tir=True)  # type: ignore[no-redef]
        def func(x: T.handle, pt: T.handle, sc: T.handle, bi: T.handle, y: T.handle):
            M = T.int64()
            X = T.match_buffer(x, (M, T.int64(K)), F32)
            PT = T.match_buffer(pt, (T.int64(G), T.int64(KB), T.int64(ROWS)), U8)
            SC = T.match_buffer(sc, (T.int64(S_),), F32)
            BI = T.match_buffer(bi, (T.int64(NO),), F32)
            Y = T.match_buffer(y, (M, T.int64(NO)), F32)
            make(aff_value)(X, PT, Y, M, SC, BI)

        return func

    @T.prim_func(s_tir=True)  # type: ignore[no-redef]
    def func(x: T.handle, pt: T.handle, sc: T.handle, of: T.handle, bi: T.handle, y: T.handle):
        M = T.int64()
        X = T.match_buffer(x, (M, T.int64(K)), F32)
        PT = T.match_buffer(pt, (T.int64(G), T.int64(KB), T.int64(ROWS)), U8)
        SC = T.match_buffer(sc, (T.int64(N),), F32)
        OF = T.match_buffer(of, (T.int64(N),), F32)  # noqa: F841 - pm1 has no offset; kept for the signature
        BI = T.match_buffer(bi, (T.int64(N),), F32)
        Y = T.match_buffer(y, (M, T.int64(N)), F32)
        make(aff_value)(X, PT, Y, M, SC, BI)

    return func


def schedule_lanes(sch: Any, choose: Choose) -> None:
    """Batch rows in blocks of ``batch_block`` (outermost), then row groups, ``groups`` per parallel
    task, then the block's batch rows: a group's weights (16 KiB at K = 4096) stay in L1 while the
    block's rows stream past them. Measured at 4096x4096, batch 64 (one thread, kernel alone, one
    process): 3.47 ms with blocks of 4 against 3.82 ms unblocked, before the batch nest read
    packed bytes (2.93 ms now); blocks of 8 cost 12 % at batch 1 then. The batch blocks and the
    row-group tasks are one fused parallel loop, so a call launches the thread pool once (a
    parallel loop inside the serial batch-block loop launched it 16 times at batch 64, each launch
    waiting for the slowest thread). The batch-1 nest (``rows1``) has only the ``groups`` choice."""
    g, m = sch.get_loops(sch.get_sblock("rows"))
    n_groups = int(sch.get(g).extent)
    t = choose("groups", [t for t in (1, 2, 4, 8) if n_groups % t == 0], 1)
    b = choose("batch_block", [1, 4, 8, 16], 4)
    mo, mi = sch.split(m, [None, b])
    go, gi = sch.split(g, [None, t])
    sch.reorder(mo, go, gi, mi)
    sch.parallel(sch.fuse(mo, go))
    g1, _m1 = sch.get_loops(sch.get_sblock("rows1"))  # the batch-1 nest
    go1, _gi1 = sch.split(g1, [None, t])
    sch.parallel(go1)


def lanes_kernel(spec: DenseSpec, expand: int = 1, scales: int = 0) -> tirx.PrimFunc:
    """The scheduled (or tuned) rows-in-lanes W1A1 kernel for ``spec`` (:func:`fits` must hold);
    ``expand``/``scales``: the fused tiled layer (:func:`lanes_func`)."""
    if not fits(spec):
        raise ValueError(f"the rows-in-lanes W1A1 kernel does not take {spec}")
    kind = "dense-lanes" if expand == 1 else "tiled-lanes"
    func = scheduled(Template(kind, lanes_func(spec, expand, scales), schedule_lanes))
    return func.with_attr("global_symbol", "main")
