"""Dense bit layer kernel: ``Y (M, N) = epilogue(acc, sumx)`` over packed weight planes ``P (B, N, KW)``.

Computation (exactly :func:`bitcompiler.quant.numerics.bit_linear`):

* ``act="binary"``: activations arrive packed (``XP (M, KW)``, bit 1 = +1). With pm1 weights
  ``acc = K - 2 * sum_w popcount(XP ^ P)`` (the zero tails XOR to 0); with uint weights
  ``acc = sum_i 2^i * (popcount(P_i & XP) - popcount(P_i & ~XP))`` (``P_i`` has a zero tail, so
  ``~XP``'s tail never counts). ``sumx = 2 * popcount(XP) - K``.
* ``act="int8"`` / ``"float"``: the weight bits are read on the fly from the planes and select
  the activation into an int32 (int8) or float32 (float) accumulator (see the schedule notes). ``sumx`` is computed once per row by its own small block (it does not depend on n).
* Epilogue (block ``Y``): ``(scale[n] * s) * acc + (offset[n] * s) * sumx + bias[n]`` in float32
  (the offset term is dropped when ``has_offset`` is False), or with a threshold
  ``+1 if thr_sign[n] * acc >= thr[n] else -1`` on the exact integer ``acc``.

Schedule for the host CPU (``target="llvm"``), chosen by measuring the W1A1 4096x4096 layer on
AVX2 (see the module-level numbers in the package docstring):

* The words are read as **int64** (a second, 64-bit-typed buffer declared over the same data
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
* int8 / float: the 32 bits of a word are the vectorized inner loop (rfactor over the bit index);
  lane ``j`` tests its bit as ``(word & (1 << j)) == (1 << j)`` (a constant mask vector: and +
  compare, no variable shift) and selects ``x`` or 0, so a pm1 row accumulates
  ``sum_{bit=1} x`` and ``acc = 2 * that - sumx`` (``sumx`` then always computed), a uint row
  ``sum_i 2^i sum_{bit_i=1} x``. 2 output rows share each activation vector for one plane, 1 row
  for more planes (register pressure). A row tail (K % 32) is its own small reduction block so
  the main loop never needs a bounds check.

Any other target kind gets the same computation unscheduled (serial loops, int32 words) -- plain
portable TIR that a C (Cortex-M) or GPU backend schedules or emits as it is.
"""

from __future__ import annotations

from tvm import s_tir, te, tirx
from tvm.script import tirx as T

from bitcompiler.kernels._common import as_i32, batch_var, i64, largest_divisor, shape64, target_kind
from bitcompiler.kernels.spec import DenseSpec

F32 = "float32"


# --------------------------------------------------------------------------- binary activations
def _binary_func(spec: DenseSpec, wide: bool) -> tirx.PrimFunc:
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

    @T.prim_func(s_tir=True)
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


# --------------------------------------------------------------------------- int8 / float activations
def _unpacked_func(spec: DenseSpec) -> tirx.PrimFunc:
    """TE for act="int8" / "float": codes unpacked on the fly from the planes."""
    K, N, B, KW = spec.in_features, spec.out_features, spec.bits, spec.words
    KF, REM = spec.full_words, spec.tail_bits
    M = batch_var()
    if spec.act == "float":
        X = te.placeholder(shape64(M, K), F32, "X")
        inputs = [X]
        acc_t = F32

        def xval(m, k):
            return X[m, k]

    else:
        XQ = te.placeholder(shape64(M, K), "int8", "XQ")
        XS = te.placeholder(shape64(M), F32, "XS")
        inputs = [XQ, XS]
        acc_t = "int32"

        def xval(m, k):
            return XQ[m, k].astype("int32")

    P = te.placeholder(shape64(B, N, KW), "int32", "P")
    pm1 = spec.code == "pm1"

    def term(m, n, w, j):
        # bit j selected by a per-lane constant mask: and + compare + and per lane (no variable shift)
        x = xval(m, w * 32 + j)
        bit = tirx.const(1, "int32") << as_i32(j)
        zero = tirx.const(0, acc_t)
        t = tirx.Select((P[0, n, w] & bit) == bit, x, zero)
        for i in range(1, B):
            xi = x * tirx.const(2**i, acc_t)
            t = t + tirx.Select((P[i, n, w] & bit) == bit, xi, zero)
        return t

    parts = []
    if KF:
        w = te.reduce_axis((i64(0), i64(KF)), "w")
        j = te.reduce_axis((i64(0), i64(32)), "j")
        parts.append(
            te.compute(shape64(M, N), lambda m, n: te.sum(term(m, n, w.var, j.var), axis=[w, j]), name="acc")
        )
    if REM:
        t = te.reduce_axis((i64(0), i64(REM)), "t")
        parts.append(
            te.compute(
                shape64(M, N), lambda m, n: te.sum(term(m, n, i64(KF), t.var), axis=[t]), name="acc_tail"
            )
        )
    sumx = None
    if pm1 or (spec.has_offset and not spec.threshold):
        k = te.reduce_axis((i64(0), i64(K)), "k")
        sumx = te.compute(shape64(M), lambda m: te.sum(xval(m, k.var), axis=[k]), name="sumx")

    def acc_of(m, n):
        a = parts[0][m, n]
        for p in parts[1:]:
            a = a + p[m, n]
        # pm1: sum q*x = 2 * sum_{bit=1} x - sum x
        return a * tirx.const(2, acc_t) - sumx[m] if pm1 else a

    if spec.threshold:
        TS = te.placeholder(shape64(N), "int32", "TS")
        TH = te.placeholder(shape64(N), "int32", "TH")
        epi = [TS, TH]
        Y = te.compute(
            shape64(M, N),
            lambda m, n: tirx.Select(
                TS[n].astype("int64") * acc_of(m, n).astype("int64") >= TH[n].astype("int64"),
                tirx.const(1.0, F32),
                tirx.const(-1.0, F32),
            ),
            name="Y",
        )
    else:
        SC = te.placeholder(shape64(N), F32, "SC")
        OF = te.placeholder(shape64(N), F32, "OF")
        BI = te.placeholder(shape64(N), F32, "BI")
        epi = [SC, OF, BI]

        def y(m, n):
            s = XS[m] if spec.act == "int8" else None
            a = SC[n] if s is None else SC[n] * s
            v = a * acc_of(m, n).astype(F32)
            if spec.has_offset:
                b = OF[n] if s is None else OF[n] * s
                v = v + b * sumx[m].astype(F32)
            return v + BI[n]

        Y = te.compute(shape64(M, N), y, name="Y")
    return te.create_prim_func([*inputs, P, *epi, Y])


# --------------------------------------------------------------------------- schedules
def _tile_epilogue(sch: s_tir.Schedule, nb: int):
    """Y loops -> (n // nb) parallel, m, n % nb; returns (no, m, ni)."""
    y = sch.get_sblock("Y")
    m, n = sch.get_loops(y)
    no, ni = sch.split(n, [None, nb])
    sch.reorder(no, m, ni)
    return no, m, ni


def _schedule_binary(func: tirx.PrimFunc, spec: DenseSpec, wide: bool) -> tirx.PrimFunc:
    sch = s_tir.Schedule(func)
    kv = spec.words // 2 if wide else spec.words
    v = largest_divisor(kv, (4, 2) if wide else (8, 4, 2))
    nb = largest_divisor(spec.out_features, (8, 4, 2) if spec.code == "pm1" else (4, 2))
    no, m, _ni = _tile_epilogue(sch, nb)
    acc = sch.get_sblock("acc")
    sch.compute_at(acc, m, preserve_unit_loops=True)
    _, _, am, an, i, w = sch.get_loops(acc)
    if v > 1:
        _wo, wi = sch.split(w, [None, v])
        rf = sch.rfactor(wi, 2)
        rl = sch.get_loops(rf)  # no, m, am, an, i, wo, wi
        sch.reorder(rl[2], rl[4], rl[5], rl[3], rl[6])
        sch.set_scope(rf, 0, "global")  # compacted to a small stack array (see module docstring)
        sch.vectorize(rl[6])
        sch.unroll(rl[3])
        sch.parallel(no)
        sch.decompose_reduction(rf, rl[4])
    else:
        sch.reorder(am, i, w, an)
        sch.unroll(an)
        sch.parallel(no)
        sch.decompose_reduction(acc, i)
    return sch.mod["main"]


def _schedule_unpacked(func: tirx.PrimFunc, spec: DenseSpec) -> tirx.PrimFunc:
    sch = s_tir.Schedule(func)
    # rows sharing one activation vector: 2 for one plane; more planes need the registers
    nb = largest_divisor(spec.out_features, (2,)) if spec.bits == 1 else 1
    no, m, _ni = _tile_epilogue(sch, nb)
    if spec.full_words:
        acc = sch.get_sblock("acc")
        sch.compute_at(acc, m, preserve_unit_loops=True)
        rf = sch.rfactor(sch.get_loops(acc)[-1], 2)
        rl = sch.get_loops(rf)  # no, m, am, an, w, j
        sch.reorder(rl[2], rl[4], rl[3], rl[5])
        sch.set_scope(rf, 0, "global")
        sch.vectorize(rl[5])
        sch.unroll(rl[3])
        sch.decompose_reduction(rf, rl[4])
    if spec.tail_bits:
        sch.compute_at(sch.get_sblock("acc_tail"), m, preserve_unit_loops=True)
    sch.parallel(no)
    return sch.mod["main"]


def dense_kernel(spec: DenseSpec, target: str = "llvm") -> tirx.PrimFunc:
    """The dense bit kernel for ``spec``; scheduled for the host CPU when ``target`` is LLVM.

    Buffer arguments, in order: the activation inputs for ``spec.act`` (float ``X f32 (M, K)``;
    int8 ``XQ int8 (M, K), XS f32 (M,)``; binary ``XP int32 (M, KW)``), ``P int32 (B, N, KW)``,
    then ``TS, TH int32 (N,)`` with a threshold or ``SC, OF, BI f32 (N,)`` without, and the output
    ``Y f32 (M, N)``. ``M`` is a symbolic int64 batch.
    """
    if not isinstance(spec, DenseSpec):
        raise ValueError(f"dense_kernel needs a DenseSpec, got {type(spec).__name__}")  # noqa: TRY004
    cpu = target_kind(target) == "llvm"
    if spec.act == "binary":
        wide = cpu and spec.words % 2 == 0
        func = _binary_func(spec, wide)
        if cpu:
            func = _schedule_binary(func, spec, wide)
    else:
        func = _unpacked_func(spec)
        if cpu:
            func = _schedule_unpacked(func, spec)
    return func.with_attr("global_symbol", "main")
