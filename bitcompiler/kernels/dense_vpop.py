"""W1A1 dense with AVX-512 vector popcounts (``vpopcntq``): 8 output rows in the 64-bit lanes of
one 512-bit vector, several batch rows per weight load.

For x86 CPUs with ``avx512vpopcntdq`` (znver4, Ice Lake and later). The rows-in-lanes kernel
(:mod:`bitcompiler.kernels.dense_lanes`) counts bits with carry-save adders because AVX2 has no
vector popcount; with one, a row's count over K inputs is ``K / 64`` XORs, popcounts and adds of
whole 64-bit words.

* Weights are stored **transposed in groups of 8 rows** (:func:`vpop_layout`): ``WT[g, kw, r]``
  is 64-bit word ``kw`` of row ``8g + r``, so one vector is the same 64 inputs of 8 rows.
* The kernel packs the activation signs itself (bit 1 = ``x >= 0``, as
  :func:`bitcompiler.kernels.pack_sign_rows`): eight floats compared and their mask taken with
  one ``vmovmskps`` each (a scalar shift-and-or per float took 25 µs for 64 x 1024 floats; this
  takes a few).
* With ``gelu=True`` it reads the input of a GELU that only binary layers read and packs by
  GELU's sign rule (``numerics.gelu_sign32``: a second compare and an OR per 8 floats); the CPU
  lowering picks it for such a layer, and the rule's own kernel is dropped (an MLP-Mixer at batch
  1, one thread: 402 -> 373 µs a call, its eight rule kernels took 36 µs).
* **Any number of inputs K**: the rows take ``ceil(K / 64)`` words; past K the kernel packs 1
  bits and :func:`vpop_layout` gives the weights 1 bits too, so the padding never counts (a
  partial last byte is packed by scalar compares). A Mixer's token layer over 16 patches (K = 16)
  took 0.58 ms on the generic kernel and takes 0.19 ms here (timm's mixer_s16 at 64x64, batch 1).
* ``MB`` batch rows share each weight vector (one load, ``MB`` XOR-popcount-adds against each
  row's broadcast word); their counts stay in registers.
* Row groups and batch blocks run in parallel where the call has ``PARALLEL_MIN`` words of work
  (batch rows x N x K/64, decided per call); below, a serial copy of the same nest runs on the
  calling thread (an MLP-Mixer's 64 -> 128 token layer over 256 rows: 32,768 words, 6 µs).
* With ``amx_cores`` (a CPU with AMX tiles the process may use) a layer of 512 inputs or more and
  whole pairs of 16 rows has a branch that calls of 32 batch rows or more (and 2^21 words of work) take
  (:mod:`~bitcompiler.kernels.dense_amx`): 4096² at batch 64 0.67-0.79 ms against 1.16-1.21 ms on a 2-core
  Xeon VM.

``acc = K - 2 * popcount`` exactly as :func:`bitcompiler.quant.numerics.bit_linear` defines it for
pm1 weights and binary activations; the epilogue is the rows-in-lanes kernel's (same numbers).

Measured on znver4 (one thread, kernel alone, ``time_evaluator`` in one process on a shared,
loaded host, so the ratios count more than the times): 64 x 1024 -> 256 18 µs against 141 µs for
the rows-in-lanes kernel; 64 x 256 -> 1024 22 µs against 51-130 µs; 4096 x 4096 at batch 1 23 µs
against 64-122 µs, at batch 64 1.4-2.9 ms against 5.2-8.6 ms. So it replaces that kernel at every
batch where the CPU has ``avx512vpopcntdq`` (:func:`bitcompiler.kernels.relaid_dense_kernel`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from tvm import tirx
from tvm.script import tirx as T

from bitcompiler.kernels import dense_amx, finite
from bitcompiler.kernels._common import PARALLEL_MIN
from bitcompiler.kernels.spec import DenseSpec
from bitcompiler.kernels.template import Choose, Template, scheduled
from bitcompiler.quant import numerics

R = 8  # rows per vector: 64-bit lanes of a 512-bit vector
MB = 4  # batch rows per weight load
F32, U64 = "float32", "uint64"


def fits(spec: DenseSpec) -> bool:
    """pm1 weights, binary activations, whole groups of 8 rows (any number of inputs: the last
    64-bit word is padded, see :func:`vpop_layout`)."""
    return spec.act == "binary" and spec.code == "pm1" and spec.bits == 1 and spec.out_features % R == 0


def vpop_layout(planes: np.ndarray, k: int | None = None) -> np.ndarray:
    """``P (1, N, KW) int32`` (the packed pm1 plane) -> ``WT (N/8, ceil(K/64), 8) uint64``, rows in
    lanes (little-endian: word ``kw`` is the int32 words ``2kw`` (low) and ``2kw + 1``). Past ``k``
    inputs every bit is 1, as the kernel packs its input there: padding never counts."""
    _, n, kw32 = planes.shape
    k = 32 * kw32 if k is None else k
    words32 = np.zeros((n, 2 * -(-kw32 // 2)), np.int32)
    words32[:, :kw32] = planes[0]
    words = words32.view(np.uint64).copy()
    for w in range(k // 64, words.shape[1]):  # the bits past k: ones
        first = max(k - 64 * w, 0)
        words[:, w] |= np.uint64(((1 << 64) - 1) ^ ((1 << first) - 1))
    return np.ascontiguousarray(words.reshape(n // R, R, -1).transpose(0, 2, 1))


def _signs(X: Any, m: Any, b: Any, C: Any, gelu: bool = False) -> Any:
    """Byte ``b`` of row ``m``'s packed signs: bit j = ``X[m, 8b + j] >= 0`` (one compare and one
    ``vmovmskps``); with ``gelu``, the sign of ``gelu(X)`` as ``numerics.gelu_sign32`` defines it
    (``x >= 0`` or ``x <= GELU_ZERO_BELOW``: a second compare and an OR). ``C`` holds the constant
    vectors (0.0, -1, the exponent field, the GELU threshold) in memory: vector constants written
    as broadcasts would stop MetaSchedule from analysing the template."""
    eight = T.Ramp(T.int64(0), T.int64(1), 8)
    x = X[m, T.Ramp(b * 8, T.int64(1), 8)]
    keep = x >= T.reinterpret("float32x8", C[eight])
    if gelu:
        keep = T.Or(keep, x <= T.reinterpret("float32x8", C[T.Ramp(T.int64(24), T.int64(1), 8)]))
    ge = T.Select(keep, C[T.Ramp(T.int64(8), T.int64(1), 8)], C[eight])
    mask = T.call_llvm_pure_intrin("int32", "llvm.x86.avx.movmsk.ps.256", T.reinterpret("float32x8", ge))
    return T.Cast("uint8", mask)


def _tail_byte(X: Any, m: Any, start: int, n: int, gelu: bool) -> Any:
    """The byte of row ``m``'s packed signs holding its last ``n`` (< 8) inputs from ``start``, its
    other bits 1 (the padding :func:`vpop_layout` gives the weights)."""
    byte = T.int32(0xFF ^ ((1 << n) - 1))
    for j in range(n):
        x = X[m, T.int64(start + j)]
        keep = x >= T.float32(0.0)
        if gelu:
            keep = T.Or(keep, x <= T.float32(float(np.float32(numerics.GELU_ZERO_BELOW))))
        byte = byte | T.Select(keep, T.int32(1 << j), T.int32(0))
    return T.Cast("uint8", byte)


def _tail_exponent(E: Any, X: Any, m: Any, start: int, n: int) -> Any:
    """``max(E, the largest exponent field of row m's last n inputs from start)``."""
    for j in range(n):
        E = T.max(E, T.reinterpret("int32", X[m, T.int64(start + j)]) & T.int32(finite.EXPONENT))
    return E


def vpop_func(spec: DenseSpec, gelu: bool = False, amx_cores: int = 0) -> tirx.PrimFunc:
    """TVMScript of the kernel: ``X (M, K) f32, WT (N/8, K/64, 8) uint64``, then ``TS, TH`` (threshold)
    or ``SC, OF, BI``, then ``Y (M, N) f32``. ``gelu``: ``X`` is the input of a GELU only this kind
    of layer reads, binarized by its sign rule (``numerics.gelu_sign32``). ``amx_cores`` > 0: calls
    of :func:`dense_amx.min_rows` rows or more take the AMX branch (:mod:`~bitcompiler.kernels.dense_amx`,
    split in that many tasks)."""
    amx = amx_cores > 0 and dense_amx.fits(spec.in_features, spec.out_features)
    K, N = spec.in_features, spec.out_features
    G, KW = N // R, -(-K // 64)
    KB, TAIL = K // 8, K % 8  # whole bytes of 8 inputs, inputs in a last partial byte
    PAD = KW * 8 - KB - (1 if TAIL else 0)  # bytes past the inputs: all ones
    gelu_bits = int(np.float32(numerics.GELU_ZERO_BELOW).view(np.int32))

    def thr_value(TS, TH, acc, n):
        hit = T.Cast("int64", TS[n]) * acc >= T.Cast("int64", TH[n])
        return T.Select(hit, T.float32(1.0), T.float32(-1.0))

    def aff_value(SC, BI, acc, n):
        return SC[n] * T.Cast(F32, acc) + BI[n]

    def make(out_value, mb):
        @T.macro
        def rows(X64, WT, Y, E0, E1, M, mo, g):
            """Row group ``g`` of batch rows ``mo*mb ..`` (the last block repeats row M-1)."""
            A = T.alloc_buffer((mb * R,), U64, scope="global")  # constant indices: registers
            for i in T.unroll(mb):
                for r in T.vectorized(R):
                    A[i * R + r] = T.uint64(0)
            for kw in range(T.int64(KW)):
                for i in T.unroll(mb):
                    for r in T.vectorized(R):
                        A[i * R + r] = A[i * R + r] + T.popcount(
                            WT[g, kw, r] ^ X64[T.min(mo * mb + T.Cast("int64", i), M - 1), kw]
                        )
            for i in T.unroll(mb):
                if mo * mb + T.Cast("int64", i) < M:
                    for r in T.vectorized(R):
                        Y[mo * mb + T.Cast("int64", i), g * R + r] = out_value(
                            E0, E1, T.int64(K) - 2 * T.Cast("int64", A[i * R + r]), g * R + r
                        )

        return rows

    def make_body(out_value):
        one, block = make(out_value, 1), make(out_value, MB)
        amx_rows = dense_amx.amx_rows_func(K, N, KW, amx_cores, out_value) if amx else None

        @T.macro
        def blocks(name, X64, WT, Y, E0, E1, M):
            for mo, g in T.grid((M + MB - 1) // MB, T.int64(G)):
                with T.sblock(name):
                    vmo, vg = T.axis.remap("SS", [mo, g])
                    T.reads(WT[vg, 0:KW, 0:R], X64[0:M, 0:KW], E0[0:N], E1[0:N])
                    T.writes(Y[0:M, vg * R : vg * R + R])
                    block(X64, WT, Y, E0, E1, M, vmo, vg)

        @T.macro
        def body(X, WT, Y, M, E0, E1):
            XP = T.alloc_buffer((M, T.int64(KW * 8)), "uint8")
            # 0 (as 0.0 too) x 8, -1 x 8, the exponent field x 8, the GELU threshold x 8
            C = T.alloc_buffer((32,), "int32", scope="global")
            EX = T.alloc_buffer((8,), "int32", scope="global")  # the largest exponent field per lane
            for j in T.vectorized(8):
                C[j] = 0
            for j in T.vectorized(8):
                C[8 + j] = -1
            for j in T.vectorized(8):
                C[16 + j] = finite.EXPONENT
            for j in T.vectorized(8):
                C[24 + j] = gelu_bits
            for j in T.vectorized(8):
                EX[j] = 0
            for m, b in T.grid(M, T.int64(KB)):
                XP[m, b] = _signs(X, m, b, C, gelu)
                EX[T.Ramp(0, 1, 8)] = finite.exponents(
                    EX[T.Ramp(0, 1, 8)], X[m, T.Ramp(b * 8, T.int64(1), 8)], C[T.Ramp(16, 1, 8)]
                )
            if TAIL > 0:
                for m in range(M):
                    XP[m, T.int64(KB)] = _tail_byte(X, m, KB * 8, TAIL, gelu)
                    EX[0] = _tail_exponent(EX[0], X, m, KB * 8, TAIL)
            if PAD > 0:
                for m, b in T.grid(M, T.int64(PAD)):
                    XP[m, T.int64(KW * 8 - PAD) + b] = T.uint8(0xFF)
            for j in range(8):
                assert EX[j] < finite.EXPONENT, ("ValueError", [finite.MESSAGE])
            X64 = T.decl_buffer((M, T.int64(KW)), U64, data=XP.data)
            if amx and M >= dense_amx.min_rows(K, N):
                amx_rows(X64, WT, Y, E0, E1, M)
            elif M == 1:
                for g in range(T.int64(G)):
                    with T.sblock("rows1"):
                        vg = T.axis.spatial(T.int64(G), g)
                        T.reads(WT[vg, 0:KW, 0:R], X64[0, 0:KW], E0[0:N], E1[0:N])
                        T.writes(Y[0, vg * R : vg * R + R])
                        one(X64, WT, Y, E0, E1, M, T.int64(0), vg)
            elif M * T.int64(N * KW) >= T.int64(PARALLEL_MIN):  # the block the schedule parallelizes
                blocks("rows", X64, WT, Y, E0, E1, M)
            else:  # too few words for a parallel launch to pay (PARALLEL_MIN): the calling thread
                blocks("rows_serial", X64, WT, Y, E0, E1, M)

        return body

    if spec.threshold:

        @T.prim_func(s_tir=True)
        def func(x: T.handle, wt: T.handle, ts: T.handle, th: T.handle, y: T.handle):
            M = T.int64()
            X = T.match_buffer(x, (M, T.int64(K)), F32)
            WT = T.match_buffer(wt, (T.int64(G), T.int64(KW), T.int64(R)), U64)
            TS = T.match_buffer(ts, (T.int64(N),), "int32")
            TH = T.match_buffer(th, (T.int64(N),), "int32")
            Y = T.match_buffer(y, (M, T.int64(N)), F32)
            make_body(thr_value)(X, WT, Y, M, TS, TH)

        return func

    @T.prim_func(s_tir=True)  # type: ignore[no-redef]
    def func(x: T.handle, wt: T.handle, sc: T.handle, of: T.handle, bi: T.handle, y: T.handle):
        M = T.int64()
        X = T.match_buffer(x, (M, T.int64(K)), F32)
        WT = T.match_buffer(wt, (T.int64(G), T.int64(KW), T.int64(R)), U64)
        SC = T.match_buffer(sc, (T.int64(N),), F32)
        OF = T.match_buffer(of, (T.int64(N),), F32)  # noqa: F841 - pm1 has no offset; kept for the signature
        BI = T.match_buffer(bi, (T.int64(N),), F32)
        Y = T.match_buffer(y, (M, T.int64(N)), F32)
        make_body(aff_value)(X, WT, Y, M, SC, BI)

    return func


def schedule_vpop(sch: Any, choose: Choose) -> None:
    """Row groups, ``groups`` per parallel task, fused with the batch blocks into one parallel loop
    (the thread pool launched once per call); the batch-1 nest splits its groups the same way."""
    mo, g = sch.get_loops(sch.get_sblock("rows"))
    n_groups = int(sch.get(g).extent)
    t = choose("groups", [t for t in (1, 2, 4, 8) if n_groups % t == 0], 1)
    go, _gi = sch.split(g, [None, t])
    sch.parallel(sch.fuse(mo, go))
    (g1,) = sch.get_loops(sch.get_sblock("rows1"))
    go1, _gi1 = sch.split(g1, [None, t])
    sch.parallel(go1)


def vpop_kernel(spec: DenseSpec, gelu: bool = False, amx_cores: int = 0) -> tirx.PrimFunc:
    """The scheduled (or tuned) vector-popcount W1A1 kernel for ``spec`` (:func:`fits` must hold);
    ``gelu``: it binarizes its input by GELU's sign rule; ``amx_cores``: its AMX branch (:func:`vpop_func`)."""
    if not fits(spec):
        raise ValueError(f"the vector-popcount W1A1 kernel does not take {spec}")
    func = scheduled(Template("dense-vpop", vpop_func(spec, gelu, amx_cores), schedule_vpop))
    return finite.mark(func.with_attr("global_symbol", "main"), 0)
