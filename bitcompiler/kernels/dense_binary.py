"""Dense kernels for packed (binary) activations: W1A1 byte lanes and the int-word popcount kernel.

Computation (exactly :func:`bitcompiler.quant.numerics.bit_linear`): activations arrive packed
(``XP (M, KW)``, bit 1 = +1). With pm1 weights ``acc = K - 2 * sum_w popcount(XP ^ P)`` (the
zero tails XOR to 0); with uint weights ``acc = sum_i 2^i * (popcount(P_i & XP) -
popcount(P_i & ~XP))`` (``P_i`` has a zero tail, so ``~XP``'s tail never counts).
``sumx = 2 * popcount(XP) - K``. :func:`bitcompiler.kernels.dense_kernel` picks the function.

When N % 32 == 0 and K % 128 == 0 the CPU lowering uses :mod:`bitcompiler.kernels.dense_lanes`
instead (rows in vector lanes, Harley-Seal: about 1.4x faster). Schedule for the host CPU, measured
on the W1A1 4096x4096 layer on AVX2:

* **W1A1 with pm1 weights reads bytes** (:func:`_binary_bytes_func`): ``ctpop`` on ``<32 x i8>``
  is the pshufb nibble table without the ``vpsadbw`` widening that ``<4 x i64>`` needs after every
  vector, and the byte counts are summed in uint8 lanes for ``chunk <= 31`` vectors (at most
  8 per byte per vector: exact) before one widening per chunk (:func:`byte_layout`: 32 lanes and
  a 16-vector chunk for K = 4096). 7 vector ops per 32 bytes instead of 9: about 1.2x faster
  (4096x4096 batch 1: 84 -> 68 us; batch 64: 2.6 -> 4.6 G words/s on znver3, one thread).
  Blocking as below: NB = 8 rows share each activation vector, their 8 uint8 partial-sum
  vectors stay in registers, parallel over row blocks, epilogue right after each block.
* Otherwise (uint weights) the words are read as **int64** (a second, 64-bit-typed buffer declared over the same data
  pointer; plain TIR) whenever a row has an even number of words. ``ctpop`` on ``<4 x i64>``
  lowers to the pshufb nibble table plus one ``vpsadbw``, while ``<8 x i32>`` needs extra
  unpack/sad/pack shuffles to widen the byte counts: the 64-bit form is about 1.5x faster.
* The word loop is split by the vector width and ``rfactor``-ed, so the inner loop is a
  vectorized, lane-wise popcount accumulation (one horizontal sum per output at the end).
* **Register blocking over NB = 8 output rows**: for each activation vector, the 8 weight rows are
  XOR-ed/popcounted against it while it sits in a register; the 8 partial-sum vectors live in
  registers (the rfactor buffer is compacted to ``NB x V`` and kept in the "global" scope so LLVM
  gets a stack ``alloca`` it can promote to registers -- a "local" buffer inside a parallel loop
  becomes a heap workspace, which keeps the accumulators in memory and halves the speed).
* Parallel over blocks of NB output rows (outermost), batch rows inside, so a block of weights
  stays in L1 while every batch row streams past it; the epilogue is computed right after each
  block's reduction (``reverse_compute_at``), so ``acc`` never goes to memory.
"""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.script import tirx as T

from bitcompiler.kernels._common import divisors, largest_divisor
from bitcompiler.kernels.spec import DenseSpec
from bitcompiler.kernels.template import Choose, hand

F32 = "float32"


def binary_words_func(spec: DenseSpec, wide: bool) -> tirx.PrimFunc:
    """TVMScript for act="binary" (the words may be read through an int64 view)."""
    K, N, B, KW = spec.in_features, spec.out_features, spec.bits, spec.words
    WT = "int64" if wide else "int32"
    KV = KW // 2 if wide else KW
    ZERO = tirx.const(0, WT)
    ONES = tirx.const(-1, WT)
    pm1 = spec.code == "pm1"
    offset = spec.has_offset
    nplanes = 1 if pm1 else B

    def term(X, P, m, n, i, w):
        if pm1:
            return T.popcount(X[m, w] ^ P[0, n, w])
        return (T.popcount(P[i, n, w] & X[m, w]) - T.popcount(P[i, n, w] & (X[m, w] ^ ONES))) << T.Cast(WT, i)

    def acc32(acc, m, n):
        a = T.Cast("int32", acc[m, n])
        return K - 2 * a if pm1 else a

    def sumx32(sx, m):
        return 2 * T.Cast("int32", sx[m]) - K

    if spec.threshold:

        @T.prim_func(s_tir=True)
        def func(xp: T.handle, p: T.handle, ts: T.handle, th: T.handle, y: T.handle):
            M = T.int64()
            XP = T.match_buffer(xp, (M, T.int64(KW)), "int32")
            P = T.match_buffer(p, (T.int64(B), T.int64(N), T.int64(KW)), "int32")
            TS = T.match_buffer(ts, (T.int64(N),), "int32")
            TH = T.match_buffer(th, (T.int64(N),), "int32")
            Y = T.match_buffer(y, (M, T.int64(N)), F32)
            acc = T.sblock_alloc_buffer((M, T.int64(N)), WT)
            XV = T.decl_buffer((M, T.int64(KV)), WT, data=XP.data)
            PV = T.decl_buffer((T.int64(B), T.int64(N), T.int64(KV)), WT, data=P.data)
            for m, n, i, w in T.grid(M, T.int64(N), T.int64(nplanes), T.int64(KV)):
                with T.sblock("acc"):
                    vm, vn, vi, vw = T.axis.remap("SSRR", [m, n, i, w])
                    with T.init():
                        acc[vm, vn] = ZERO
                    acc[vm, vn] = acc[vm, vn] + term(XV, PV, vm, vn, vi, vw)
            for m, n in T.grid(M, T.int64(N)):
                with T.sblock("Y"):
                    vm, vn = T.axis.remap("SS", [m, n])
                    Y[vm, vn] = T.Select(
                        T.Cast("int64", TS[vn]) * T.Cast("int64", acc32(acc, vm, vn))
                        >= T.Cast("int64", TH[vn]),
                        T.float32(1.0),
                        T.float32(-1.0),
                    )

        return func

    @T.prim_func(s_tir=True)  # type: ignore[no-redef]
    def func(xp: T.handle, p: T.handle, sc: T.handle, of: T.handle, bi: T.handle, y: T.handle):
        M = T.int64()
        XP = T.match_buffer(xp, (M, T.int64(KW)), "int32")
        P = T.match_buffer(p, (T.int64(B), T.int64(N), T.int64(KW)), "int32")
        SC = T.match_buffer(sc, (T.int64(N),), F32)
        OF = T.match_buffer(of, (T.int64(N),), F32)
        BI = T.match_buffer(bi, (T.int64(N),), F32)
        Y = T.match_buffer(y, (M, T.int64(N)), F32)
        acc = T.sblock_alloc_buffer((M, T.int64(N)), WT)
        sx = T.sblock_alloc_buffer((M,), WT)
        XV = T.decl_buffer((M, T.int64(KV)), WT, data=XP.data)
        PV = T.decl_buffer((T.int64(B), T.int64(N), T.int64(KV)), WT, data=P.data)
        if offset:
            for m, w in T.grid(M, T.int64(KV)):
                with T.sblock("sumx"):
                    vm, vw = T.axis.remap("SR", [m, w])
                    with T.init():
                        sx[vm] = ZERO
                    sx[vm] = sx[vm] + T.popcount(XV[vm, vw])
        for m, n, i, w in T.grid(M, T.int64(N), T.int64(nplanes), T.int64(KV)):
            with T.sblock("acc"):
                vm, vn, vi, vw = T.axis.remap("SSRR", [m, n, i, w])
                with T.init():
                    acc[vm, vn] = ZERO
                acc[vm, vn] = acc[vm, vn] + term(XV, PV, vm, vn, vi, vw)
        if offset:
            for m, n in T.grid(M, T.int64(N)):
                with T.sblock("Y"):
                    vm, vn = T.axis.remap("SS", [m, n])
                    Y[vm, vn] = (
                        SC[vn] * T.Cast(F32, acc32(acc, vm, vn))
                        + OF[vn] * T.Cast(F32, sumx32(sx, vm))
                        + BI[vn]
                    )
        else:
            for m, n in T.grid(M, T.int64(N)):
                with T.sblock("Y"):
                    vm, vn = T.axis.remap("SS", [m, n])
                    Y[vm, vn] = SC[vn] * T.Cast(F32, acc32(acc, vm, vn)) + BI[vn]

    return func


# --------------------------------------------------------------------------- W1A1 on the CPU: byte lanes
def binary_bytes_func(
    spec: DenseSpec, lanes: int, chunk: int, expand: int = 1, scales: int = 0
) -> tirx.PrimFunc:
    """TVMScript for act="binary" with pm1 weights, read as bytes: ``cnt`` sums byte popcounts in uint8.

    ``acc[m, n] = sum_{g, v} cnt[m, n, g, v]`` with ``cnt[m, n, g, v] = sum_{l < chunk}
    popcount(XB[m, b] ^ PB[n, b])``, ``b = (g * chunk + l) * lanes + v``: each term is at most 8,
    so ``chunk <= 31`` keeps every uint8 lane exact (see the module docstring).

    ``expand = p > 1`` is the fused row-aligned tiled layer (:mod:`bitcompiler.kernels.tiled`): the
    N rows are the tile's distinct rows and ``Y (M, p*N)`` reuses each row's ``acc`` p times,
    ``Y[m, c*N + n] = SC[(c*N + n) * scales // (p*N)] * acc[m, n] + BI[c*N + n]`` (or the threshold);
    its buffers are ``XP, P, SC (scales,), BI`` or ``XP, P, TS, TH`` (no offsets: pm1 has none).
    """
    K, N, NB8 = spec.in_features, spec.out_features, 4 * spec.words
    if chunk > 31 or NB8 % (lanes * chunk):
        raise ValueError(f"{lanes} lanes x {chunk} steps must divide the {NB8} bytes of a row (chunk <= 31)")
    G, U8 = NB8 // (lanes * chunk), "uint8"
    NO = N * expand  # outputs per batch row
    S = scales or NO

    def sidx(o):
        return o if S == NO else (o * S) // NO

    def term(XB, PB, m, n, g, v, l):
        b = (g * chunk + l) * lanes + v
        return T.popcount(XB[m, b] ^ PB[0, n, b])

    def thr_value(TS, TH, a, n):
        hit = T.Cast("int64", TS[n]) * T.Cast("int64", a) >= T.Cast("int64", TH[n])
        return T.Select(hit, T.float32(1.0), T.float32(-1.0))

    def aff_value(SC, BI, a, n):
        return SC[sidx(n)] * T.Cast(F32, a) + BI[n]

    def make(out_value):
        @T.macro
        def body(XP, P, Y, M, E0, E1, cnt, acc):
            XB = T.decl_buffer((M, T.int64(NB8)), U8, data=XP.data)
            PB = T.decl_buffer((T.int64(1), T.int64(N), T.int64(NB8)), U8, data=P.data)
            for m, n, g, v, l in T.grid(M, T.int64(N), T.int64(G), T.int64(lanes), T.int64(chunk)):
                with T.sblock("cnt"):
                    vm, vn, vg, vv, vl = T.axis.remap("SSSSR", [m, n, g, v, l])
                    with T.init():
                        cnt[vm, vn, vg, vv] = T.uint8(0)
                    cnt[vm, vn, vg, vv] = cnt[vm, vn, vg, vv] + term(XB, PB, vm, vn, vg, vv, vl)
            for m, n, g, v in T.grid(M, T.int64(N), T.int64(G), T.int64(lanes)):
                with T.sblock("acc"):
                    vm, vn, vg, vv = T.axis.remap("SSRR", [m, n, g, v])
                    with T.init():
                        acc[vm, vn] = 0
                    acc[vm, vn] = acc[vm, vn] + T.Cast("int32", cnt[vm, vn, vg, vv])
            if expand == 1:
                for m, n in T.grid(M, T.int64(N)):
                    with T.sblock("Y"):
                        vm, vn = T.axis.remap("SS", [m, n])
                        Y[vm, vn] = out_value(E0, E1, K - 2 * acc[vm, vn], vn)
            else:
                for m, n, c in T.grid(M, T.int64(N), T.int64(expand)):
                    with T.sblock("Y"):
                        vm, vn, vc = T.axis.remap("SSS", [m, n, c])
                        Y[vm, vc * N + vn] = out_value(E0, E1, K - 2 * acc[vm, vn], vc * N + vn)

        return body

    if spec.threshold:

        @T.prim_func(s_tir=True)
        def func(xp: T.handle, p: T.handle, ts: T.handle, th: T.handle, y: T.handle):
            M = T.int64()
            XP = T.match_buffer(xp, (M, T.int64(spec.words)), "int32")
            P = T.match_buffer(p, (T.int64(1), T.int64(N), T.int64(spec.words)), "int32")
            TS = T.match_buffer(ts, (T.int64(NO),), "int32")
            TH = T.match_buffer(th, (T.int64(NO),), "int32")
            Y = T.match_buffer(y, (M, T.int64(NO)), F32)
            cnt = T.sblock_alloc_buffer((M, T.int64(N), T.int64(G), T.int64(lanes)), U8)
            acc = T.sblock_alloc_buffer((M, T.int64(N)), "int32")
            make(thr_value)(XP, P, Y, M, TS, TH, cnt, acc)

        return func

    if expand > 1:

        @T.prim_func(s_tir=True)  # type: ignore[no-redef]
        def func(xp: T.handle, p: T.handle, sc: T.handle, bi: T.handle, y: T.handle):
            M = T.int64()
            XP = T.match_buffer(xp, (M, T.int64(spec.words)), "int32")
            P = T.match_buffer(p, (T.int64(1), T.int64(N), T.int64(spec.words)), "int32")
            SC = T.match_buffer(sc, (T.int64(S),), F32)
            BI = T.match_buffer(bi, (T.int64(NO),), F32)
            Y = T.match_buffer(y, (M, T.int64(NO)), F32)
            cnt = T.sblock_alloc_buffer((M, T.int64(N), T.int64(G), T.int64(lanes)), U8)
            acc = T.sblock_alloc_buffer((M, T.int64(N)), "int32")
            make(aff_value)(XP, P, Y, M, SC, BI, cnt, acc)

        return func

    @T.prim_func(s_tir=True)  # type: ignore[no-redef]
    def func(xp: T.handle, p: T.handle, sc: T.handle, of: T.handle, bi: T.handle, y: T.handle):
        M = T.int64()
        XP = T.match_buffer(xp, (M, T.int64(spec.words)), "int32")
        P = T.match_buffer(p, (T.int64(1), T.int64(N), T.int64(spec.words)), "int32")
        SC = T.match_buffer(sc, (T.int64(N),), F32)
        OF = T.match_buffer(of, (T.int64(N),), F32)  # noqa: F841 - pm1 has no offset; kept for the signature
        BI = T.match_buffer(bi, (T.int64(N),), F32)
        Y = T.match_buffer(y, (M, T.int64(N)), F32)
        cnt = T.sblock_alloc_buffer((M, T.int64(N), T.int64(G), T.int64(lanes)), U8)
        acc = T.sblock_alloc_buffer((M, T.int64(N)), "int32")
        make(aff_value)(XP, P, Y, M, SC, BI, cnt, acc)

    return func


# --------------------------------------------------------------------------- schedule
def tile_epilogue(sch: s_tir.Schedule, nb: int):
    """Y loops -> (n // nb) parallel, m, n % nb; returns (no, m, ni). A fused tiled epilogue's
    copy loop c (``Y[m, c*N + n]``) goes between m and ni, and ni is vectorized (contiguous in Y)."""
    y = sch.get_sblock("Y")
    m, n, *copies = sch.get_loops(y)
    no, ni = sch.split(n, [None, nb])
    sch.reorder(no, m, *copies, ni)
    if copies:
        sch.vectorize(ni)
    return no, m, ni


def byte_layout(spec: DenseSpec) -> tuple[int, int]:
    """(lanes, chunk) of the byte-lane W1A1 kernel: bytes per vector, vectors per uint8 partial sum."""
    nbytes = 4 * spec.words
    lanes = largest_divisor(nbytes, (32, 16, 8, 4))
    steps = nbytes // lanes
    return lanes, max(c for c in range(1, min(steps, 31) + 1) if steps % c == 0)


def schedule_binary(sch: s_tir.Schedule, spec: DenseSpec, wide: bool, choose: Choose = hand) -> None:
    """CPU schedule of either binary func; ``rows`` output rows share each activation vector,
    ``vector`` is the int-word vector width (the byte-lane func fixes its own lanes), ``unroll``
    the byte-lane steps unrolled. ``choose`` picks them (:mod:`bitcompiler.kernels.template`)."""
    n = spec.out_features
    nb_hand = largest_divisor(n, (8, 4, 2) if spec.code == "pm1" else (4, 2))
    nb = choose("rows", divisors(n, (1, 2, 4, 8, 16) if spec.code == "pm1" else (1, 2, 4, 8)), nb_hand)
    no, m, _ni = tile_epilogue(sch, nb)
    acc = sch.get_sblock("acc")
    sch.compute_at(acc, m, preserve_unit_loops=True)
    if any(sch.get(b).name_hint == "cnt" for b in sch.get_child_blocks(sch.get_sblock("root"))):
        # byte lanes: per chunk g, the nb x lanes uint8 partial sums (registers), then acc += their sum
        _, _, _am, an, g, _lane = sch.get_loops(acc)
        sch.reorder(g, an)
        cnt = sch.get_sblock("cnt")
        sch.compute_at(cnt, g, preserve_unit_loops=True)
        cl = sch.get_loops(cnt)  # no, m, am, g, cm, cn, cg, lane, step
        sch.reorder(cl[8], cl[5], cl[7])
        sch.unroll(cl[5])
        sch.vectorize(cl[7])
        sch.parallel(no)
        sch.decompose_reduction(acc, g)
        steps = cl[8]
        u = choose("unroll", divisors(byte_layout(spec)[1], (1, 2, 4)), 1)
        if u > 1:
            steps, inner = sch.split(steps, [None, u])
            sch.unroll(inner)
        sch.decompose_reduction(cnt, steps)
        return
    kv = spec.words // 2 if wide else spec.words
    v_hand = largest_divisor(kv, (4, 2) if wide else (8, 4, 2))
    v = choose("vector", sorted({v_hand, *divisors(kv, (2, 4) if wide else (2, 4, 8))}), v_hand)
    _, _, am, an, i, w = sch.get_loops(acc)
    if v > 1:
        _wo, wi = sch.split(w, [None, v])
        rf = sch.rfactor(wi, 2)
        # rfactor puts the partial sums at the root over the whole batch: move them back under m
        sch.compute_at(rf, m, preserve_unit_loops=True)
        # compute_at names the new loop of the block's k-th iter (wi, m, n, i, wo) "ax{k}"
        by_iter = {sch.get(lp).loop_var.name: lp for lp in sch.get_loops(rf)}
        rwi, _rm, rn, ri, rwo = (by_iter[f"ax{k}"] for k in range(5))
        sch.reorder(ri, rwo, rn, rwi)
        sch.set_scope(rf, 0, "global")  # compacted to a small stack array (see module docstring)
        sch.vectorize(rwi)
        sch.unroll(rn)
        sch.parallel(no)
        sch.decompose_reduction(rf, ri)
    else:
        sch.reorder(am, i, w, an)
        sch.unroll(an)
        sch.parallel(no)
        sch.decompose_reduction(acc, i)
