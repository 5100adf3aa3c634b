"""AVX2 dense kernels written as explicit vector TIR: the host test (:func:`avx2_target`), the helpers
the AVX2 kernels share, and the weight-only (float activations) kernel; the int8-activation kernels
are in :mod:`bitcompiler.kernels.dense_int8`.

They compute exactly what :func:`bitcompiler.kernels.dense._unpacked_func` computes;
:func:`bitcompiler.kernels.dense_kernel` picks them for LLVM targets with AVX2. At batch 1 each
weight bit is used once, so the cost per weight bit is all that matters: the plain schedule spends
~3 vector ops per 8 weights selecting activations, these kernels ~0.2.

**float activations** (:func:`float_dense_func`, T-MAC style table lookup, ``vpermps``): each
32-bit word is cut into 10 groups of 3 bits and one of 2; each group's activations get an 8-entry
table of their subset sums (pm1: signed sums ``sum +-x``, so the table value is the code's
contribution directly; uint: one lookup per plane, ``acc = sum_i 2^i acc_i``). Eight output rows are
the 8 lanes: lane ``l`` holds row ``n0 + l``'s word, and ``vpermps`` reads only the low 3 bits of
each index lane, so ``word >> 3t`` is the index of group ``t`` for all 8 rows: 3 weights x 8 rows in
shift + lookup + add, summed pairwise (a chain of 11 dependent float adds per word was 1.5x
slower). Groups of 4 (16 entries: two lookups + ``vblendvps`` on bit 3) were 1.3x slower. The
tables (352 B per 32 activations) are built for 16 batch rows at a time.

With 8 rows' words side by side (:func:`rows8_layout`, stored so at compile time) each lane vector
is one load instead of 8 strided ones.

Measured in one process (``TVM_NUM_THREADS=1``, ``torch.set_num_threads(1)``, 4096x4096, batch 1,
znver3, a shared and noisy VM): whole ``cm(x)`` 0.55-0.64 ms with strided words (plain schedule
1.0 ms) vs torch fp32 4.3 ms; kernel alone 535 -> 428 us with ``rows8``. Compute-bound (a 512-row
slice runs at the same rate from L2).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from tvm import tirx
from tvm.script import tirx as T

from bitcompiler.kernels._common import as_tvm_target, target_kind
from bitcompiler.kernels.spec import DenseSpec

F32 = "float32"
U8 = "uint8"


def avx2_target(target: Any) -> bool:
    """True for an LLVM x86 target with AVX2 (plain ``"llvm"``: the host CPU, as the CPU backend uses)."""
    return x86_features(target, "avx2")


def popcnt512_target(target: Any) -> bool:
    """True for an LLVM x86 target with AVX-512 vector popcounts (``vpopcntq``/``vpopcntd`` on 256- and
    512-bit vectors, as on znver4 or Ice Lake and later)."""
    return x86_features(target, "avx512f", "avx512vl", "avx512vpopcntdq")


def x86_features(target: Any, *names: str) -> bool:
    """True for an LLVM x86 target that has every LLVM feature in ``names`` (a target without an
    ``mcpu``: the host CPU's)."""
    import tvm
    from tvm.target import codegen

    if target_kind(target) != "llvm":
        return False
    t = as_tvm_target(target)
    triple = str(t.attrs.get("mtriple", "") or "")
    if triple and not triple.startswith(("x86_64", "i686", "i386")):
        return False
    if not t.attrs.get("mcpu"):  # the CPU backend compiles for the host CPU (Target.tvm_target)
        t = tvm.target.Target({"kind": "llvm", "mcpu": codegen.llvm_get_system_cpu()})
    try:
        return all(bool(codegen.target_has_features(n, t)) for n in names)
    except Exception:  # noqa: BLE001 - an LLVM without x86 support or these names: not these kernels
        return False


def _bc(v: float, dtype: str, lanes: int) -> Any:
    return T.Broadcast(tirx.const(v, dtype), lanes)


def _tree_sum(terms: list) -> Any:
    """Pairwise sum: a dependency chain of log2(n) vector adds instead of n (float adds are not reassociated)."""
    while len(terms) > 1:
        terms = [terms[i] + terms[i + 1] if i + 1 < len(terms) else terms[i] for i in range(0, len(terms), 2)]
    return terms[0]


def _epilogue(spec: DenseSpec, acc: Any, sumx: Any, s: Any, n: Any, E0: Any, E1: Any, E2: Any) -> Any:
    """The float32 output (``E = SC, OF, BI``) or the +-1 threshold (``E = TS, TH, -``) from ``acc``,
    in the order of :func:`bitcompiler.quant.numerics.epilogue` (as ``_unpacked_func``)."""
    if spec.threshold:
        TS, TH = E0, E1
        hit = T.Cast("int64", TS[n]) * T.Cast("int64", acc) >= T.Cast("int64", TH[n])
        return T.Select(hit, T.float32(1.0), T.float32(-1.0))
    SC, OF, BI = E0, E1, E2
    a = SC[n] if s is None else SC[n] * s
    v = a * T.Cast(F32, acc)
    if spec.has_offset:
        b = OF[n] if s is None else OF[n] * s
        v = v + b * T.Cast(F32, sumx)
    return v + BI[n]


# --------------------------------------------------------------------------- float activations
LUT_ROWS = 8  # output rows per vector (one f32 lane each)
GROUPS = 11  # tables per 32-bit word: 10 groups of 3 bits and one of 2
LUT_BATCH = 16  # batch rows whose tables are built at a time: 11 * K bytes each, bounded for long batches


def float_fits(spec: DenseSpec) -> bool:
    """Float activations, codes not centered (``spec.center``: a bit-serial sum of centered codes
    cancels across its planes as the uncentered epilogue did)."""
    return spec.act == "float" and spec.out_features % LUT_ROWS == 0 and not spec.center


def rows8_layout(planes: np.ndarray) -> np.ndarray:
    """``P (B, N, KW) int32`` reordered as ``(B, N/8, KW, 8)`` (and given back in P's shape): word w
    of rows 8j .. 8j+7 side by side, so the float kernel's 8 lanes are one contiguous load instead
    of 8 strided ones (the same words)."""
    b, n, kw = planes.shape
    lanes = planes.reshape(b, n // LUT_ROWS, LUT_ROWS, kw).transpose(0, 1, 3, 2)
    return np.ascontiguousarray(lanes).reshape(b, n, kw)


def float_dense_func(spec: DenseSpec, rows8: bool = False) -> tirx.PrimFunc:
    """``act="float"``: 8-entry subset-sum tables per 3 activations, looked up for 8 rows by ``vpermps``.

    ``rows8``: ``P`` is in :func:`rows8_layout`, each lane vector one load.
    """
    K, N, B, KW = spec.in_features, spec.out_features, spec.bits, spec.words
    pm1 = spec.code == "pm1"
    nv = 2 if N % (2 * LUT_ROWS) == 0 else 1  # row vectors per block: each table load serves nv of them
    nb = nv * LUT_ROWS

    def x_at(X, m, k):
        return T.if_then_else(k < K, X[m, T.min(k, T.int64(K - 1))], T.float32(0.0))

    def entry(X, m, w, t, j):
        """Entry j of table t of word w: the sum of the group's x whose bit is set in j (pm1: +x, else -x).

        Table t < 10 covers bits 3t .. 3t+2 of the word, table 10 bits 30, 31 (j's bit 2 ignored)."""
        tot = None
        for u in range(3):
            x = x_at(X, m, w * 32 + t * 3 + u)
            v = (
                T.Select(((j >> u) & 1) == 1, x, -x)
                if pm1
                else T.Select(((j >> u) & 1) == 1, x, T.float32(0.0))
            )
            if u == 2:
                v = T.Select(t < GROUPS - 1, v, T.float32(0.0))
            tot = v if tot is None else tot + v
        return tot

    def word_sum(LUT, m, w, word):
        """f32x8: sum over the word's 11 tables of the entries its bits pick, for the 8 rows in ``word``'s lanes."""
        terms = []
        for t in range(GROUPS):
            idx = (word >> _bc(3 * t, "int32", 8)) if t else word  # vpermps reads the low 3 bits
            terms.append(
                T.call_llvm_pure_intrin(
                    "float32x8", "llvm.x86.avx2.permps", LUT[m, w, t, T.ramp(0, 1, 8)], idx
                )
            )
        return _tree_sum(terms)

    def lanes(start):
        return T.ramp(start, 1, LUT_ROWS)

    def word_lanes(PF, i, j, w):
        """Word w of plane i for rows 8j .. 8j+7, one per lane."""
        if rows8:
            return PF[T.ramp(((i * (N // LUT_ROWS) + j) * KW + w) * LUT_ROWS, 1, LUT_ROWS)]
        return PF[T.ramp((i * N + j * LUT_ROWS) * KW + w, KW, LUT_ROWS)]

    def row_acc(acc, v):
        tot = None
        for i in range(B):
            a = acc[lanes(i * nb + v * LUT_ROWS)]
            if i:
                a = a * _bc(float(2**i), F32, LUT_ROWS)
            tot = a if tot is None else tot + a
        return tot

    @T.prim_func(s_tir=True)
    def func(x: T.handle, p: T.handle, sc: T.handle, of: T.handle, bi: T.handle, y: T.handle):
        M = T.int64()
        X = T.match_buffer(x, (M, T.int64(K)), F32)
        P = T.match_buffer(p, (T.int64(B), T.int64(N), T.int64(KW)), "int32")
        SC = T.match_buffer(sc, (T.int64(N),), F32)
        OF = T.match_buffer(of, (T.int64(N),), F32)
        BI = T.match_buffer(bi, (T.int64(N),), F32)
        Y = T.match_buffer(y, (M, T.int64(N)), F32)
        PF = T.decl_buffer((T.int64(B * N * KW),), "int32", data=P.data)  # lanes: 8 rows' words
        LUT = T.alloc_buffer((T.int64(LUT_BATCH), T.int64(KW), T.int64(GROUPS), T.int64(8)), F32)
        SX = T.alloc_buffer((M,), F32)
        for m in range(M):
            SX[m] = T.float32(0.0)
            for k in range(T.int64(K)):
                SX[m] = SX[m] + X[m, k]
        for mo in range((M + LUT_BATCH - 1) // LUT_BATCH):
            for mi in range(T.min(T.int64(LUT_BATCH), M - mo * LUT_BATCH)):
                for w, t, j in T.grid(T.int64(KW), T.int64(GROUPS), T.int64(8)):
                    LUT[mi, w, t, j] = entry(X, mo * LUT_BATCH + mi, w, t, j)
            for no in T.parallel(T.int64(N // nb)):
                for mi in range(T.min(T.int64(LUT_BATCH), M - mo * LUT_BATCH)):
                    acc = T.alloc_buffer((B * nb,), F32, scope="global")  # stack array -> registers
                    ys = T.alloc_buffer((nb,), F32, scope="global")
                    for i, v in T.grid(B, nv):
                        acc[lanes(i * nb + v * LUT_ROWS)] = _bc(0.0, F32, LUT_ROWS)
                    for w in range(T.int64(KW)):
                        for i, v in T.grid(B, nv):
                            acc[lanes(i * nb + v * LUT_ROWS)] = acc[lanes(i * nb + v * LUT_ROWS)] + word_sum(
                                LUT,
                                mi,
                                w,
                                word_lanes(PF, i, no * nv + v, w),
                            )
                    for v in range(nv):
                        ys[lanes(v * LUT_ROWS)] = row_acc(acc, v)
                    # (the row index written out: a name bound here is a heap workspace per task)
                    for r in range(nb):
                        Y[mo * LUT_BATCH + mi, no * nb + r] = _epilogue(
                            spec, ys[r], SX[mo * LUT_BATCH + mi], None, no * nb + r, SC, OF, BI
                        )

    return func
