"""AVX-512 VNNI dense kernel for 2-bit weights and int8 activations (W2A8), as explicit vector TIR.

**Weight order** (:func:`vnni_w2_layout`, stored so at compile time): row ``n``'s codes in chunks of
256 weights, 64 bytes each; byte ``L`` of chunk ``c`` holds the codes of ``k = 256c + 64j + L`` at
bits ``2j, 2j+1`` (``j = 0..3``). One 512-bit load gives a chunk, and ``W & (3 << 2j)`` is
``4^j q`` for the 64 weights whose activations are the contiguous ``x[256c + 64j : +64]``: no
activation permutation, no shift.

**Dot product**: ``vpdpbusd`` multiplies the 64 masked codes (unsigned bytes) by the 64 activations
(signed bytes) and adds each group of four products into one of 16 int32 lanes. The codes are
unsigned, so the activations stay int8 (no +128 offset and weight-sum correction). Each of the
four code positions ``j`` has its own accumulator, since its codes carry the factor ``4^j``; at
the end ``acc_0 + acc_1 >> 2 + acc_2 >> 4 + acc_3 >> 6`` (arithmetic shifts, exact: every lane of
``acc_j`` is a multiple of ``4^j``; a lane sums ``K / 16`` products of at most ``192 * 127``, far
below 2^31 for any ``K`` a layer has). Per 256 weights and output row: one load, four ``vpand``,
four ``vpdpbusd``. ``VNNI_ROWS`` output rows share each activation vector: 16 accumulators and
4 activation vectors of the 32 zmm registers.

**Activations**: with ``float_input`` the kernel quantizes each batch row itself before the dot
products (``max|x|``, the scale and the codes vectorized, exactly as
:func:`~bitcompiler.kernels.quantize_rows_int8`: the same :func:`~bitcompiler.kernels.activations.int8_scale`
and :func:`~bitcompiler.kernels.activations.int8_round`) and sums the codes (``sumx``), parallel
over the batch: one VM call per layer instead of two. It checks the rows on the way (each row's
largest exponent field, :mod:`~bitcompiler.kernels.finite`) and raises on NaN or Inf, so ``cm(x)``
skips Python's pass over the input (4096 floats: 2.4 us of a 120 us call). Without it the kernel takes ``XQ, XS`` as the other
int8 kernels do (a 1x1 conv's pixels carry their sample's scale).

Measured in one process (``TVM_NUM_THREADS=1``, 4096x4096, batch 1, znver4 VM with 2 shared cores,
this thread's CPU time, best of 5 alternating rounds): kernel alone 108 us, quantizing included (the
AVX2 kernel on interleaved codes: 167 us, plus 5 us for the separate quantizer); whole ``cm(x)``
116 us. Compute-bound, not bandwidth-bound: 512 rows (L2-resident) take 13.1 us, the rate of all
4096 rows streamed from L3 (4 MiB of weights in 108 us: 39 GB/s). The 262,144 ``vpdpbusd`` of a call run at
2.4 G/s; a loop of ``vpdpbusd`` alone reaches 3.6 G/s on this host (one per cycle), the same mix with
its ``vpandq`` and loads from L1 2.7 G/s: the masks, on the same vector pipes, are the rest.
``python -m bench.w2a8`` measures the call, this kernel alone and the AVX2 path side by side.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from tvm import tirx
from tvm.script import tirx as T

from bitcompiler.kernels import finite
from bitcompiler.kernels.activations import int8_round, int8_scale
from bitcompiler.kernels.dense_avx2 import F32, U8, _bc, _epilogue, x86_features
from bitcompiler.kernels.dense_int8 import _int8_entry
from bitcompiler.kernels.spec import DenseSpec

CHUNK = 256  # weights per 512-bit load of 2-bit codes
LANES = 16  # int32 lanes of a zmm register
VNNI_ROWS = 4  # output rows sharing each activation vector
FEATURES = ("avx512f", "avx512bw", "avx512vnni")


def vnni_target(target: Any) -> bool:
    """True for an LLVM x86 target with 512-bit ``vpdpbusd`` (AVX-512 VNNI: Ice Lake, Zen 4 and later)."""
    return x86_features(target, *FEATURES)


def fits(spec: DenseSpec) -> bool:
    """2-bit unsigned codes, int8 activations, whole 256-weight chunks."""
    return spec.act == "int8" and spec.code == "uint" and spec.bits == 2 and spec.in_features % CHUNK == 0


def vnni_w2_layout(codes: np.ndarray) -> np.ndarray:
    """Codes ``Q (N, K)`` (0..3) -> ``(N, K / 4) uint8`` in the kernel's order (see the module docstring)."""
    n, k = codes.shape
    q = codes.astype(U8).reshape(n, k // CHUNK, 4, CHUNK // 4)
    out = q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)
    return np.ascontiguousarray(out).reshape(n, k // 4)


def _dpbusd(acc: Any, codes: Any, x: Any) -> Any:
    return T.call_llvm_pure_intrin("int32x16", "llvm.x86.avx512.vpdpbusd.512", acc, codes, x)


def vnni_w2_dense_func(spec: DenseSpec, float_input: bool = True) -> tirx.PrimFunc:
    """The kernel for ``spec`` (:func:`fits`). Buffers: ``X f32 (M, K)`` (``float_input``) or
    ``XQ int8 (M, K), XS f32 (M,)``, then ``W uint8 (N, K/4)`` (:func:`vnni_w2_layout`), then
    ``TS, TH`` or ``SC, OF, BI``, then ``Y f32 (M, N)``."""
    if not fits(spec):
        raise ValueError(
            f"the VNNI W2A8 kernel needs 2-bit uint weights, int8 activations and K % {CHUNK} == 0: {spec}"
        )
    K, N = spec.in_features, spec.out_features
    C, KB = K // CHUNK, K // 4
    nb = VNNI_ROWS if N % VNNI_ROWS == 0 else 1

    def lanes(start, n=LANES):
        return T.ramp(start, 1, n)

    @T.macro
    def quantize(X, XQ, XS, XE, m):
        """Row m of X: its scale into XS[m], its codes into XQ[m] (as quantize_rows_int8), its
        largest exponent field into XE[m] (kernels/finite.py: EXPONENT for NaN or Inf)."""
        am = T.alloc_buffer((LANES,), F32, scope="global")
        ex = T.alloc_buffer((LANES,), "int32", scope="global")
        am[lanes(0)] = _bc(0.0, F32, LANES)
        ex[lanes(0)] = _bc(0, "int32", LANES)
        for c in range(T.int64(K // LANES)):
            am[lanes(0)] = T.max(am[lanes(0)], T.abs(X[m, lanes(c * LANES)]))
            ex[lanes(0)] = T.max(
                ex[lanes(0)],
                T.reinterpret(f"int32x{LANES}", X[m, lanes(c * LANES)])
                & _bc(finite.EXPONENT, "int32", LANES),
            )
        XS[m] = T.float32(0.0)
        XE[m] = 0
        for i in range(LANES):
            XS[m] = T.max(XS[m], am[i])
            XE[m] = T.max(XE[m], ex[i])
        XS[m] = int8_scale(XS[m])
        for c in range(T.int64(K // LANES)):
            XQ[m, lanes(c * LANES)] = int8_round(X[m, lanes(c * LANES)], T.Broadcast(XS[m], LANES), LANES)

    @T.macro
    def code_sum(XQ, SX, m):
        sx = T.alloc_buffer((LANES,), "int32", scope="global")
        sx[lanes(0)] = _bc(0, "int32", LANES)
        for c in range(T.int64(K // LANES)):
            sx[lanes(0)] = sx[lanes(0)] + T.Cast(f"int32x{LANES}", XQ[m, lanes(c * LANES)])
        SX[m] = 0
        for i in range(LANES):
            SX[m] = SX[m] + sx[i]

    def dot(A, W, XQ, n, m, c, a, j):
        """``A``'s sums ``a`` plus chunk ``c`` of row ``n``'s codes at position ``j`` times their activations."""
        mask = T.Broadcast(T.Cast(U8, T.shift_left(3, j * 2)), 64)
        return _dpbusd(
            A[lanes(a * LANES)], W[n, lanes(c * 64, 64)] & mask, XQ[m, lanes(c * CHUNK + j * 64, 64)]
        )

    @T.macro
    def rows(XQ, XS, SX, W, Y, E0, E1, E2, M):
        for no in T.parallel(T.int64(N // nb)):
            for m in range(M):
                # "global" scope: stack arrays LLVM keeps in registers (see dense.py's docstring),
                # two of 512 bytes: one of 1 KiB would be over TVM's stack limit, a heap workspace
                lo = T.alloc_buffer((2 * nb * LANES,), "int32", scope="global")  # code positions 0, 1
                hi = T.alloc_buffer((2 * nb * LANES,), "int32", scope="global")  # 2, 3
                red = T.alloc_buffer((LANES,), "int32", scope="global")
                for a in T.unroll(2 * nb):
                    lo[lanes(a * LANES)] = _bc(0, "int32", LANES)
                    hi[lanes(a * LANES)] = _bc(0, "int32", LANES)
                for c in range(T.int64(C)):
                    for r in T.unroll(nb):
                        for j in T.unroll(2):  # unrolled: the masks are constants
                            lo[lanes((r * 2 + j) * LANES)] = dot(lo, W, XQ, no * nb + r, m, c, r * 2 + j, j)
                            hi[lanes((r * 2 + j) * LANES)] = dot(
                                hi, W, XQ, no * nb + r, m, c, r * 2 + j, j + 2
                            )
                for r in T.unroll(nb):
                    red[lanes(0)] = (
                        lo[lanes(r * 2 * LANES)]
                        + (lo[lanes((r * 2 + 1) * LANES)] >> _bc(2, "int32", LANES))
                        + (hi[lanes(r * 2 * LANES)] >> _bc(4, "int32", LANES))
                        + (hi[lanes((r * 2 + 1) * LANES)] >> _bc(6, "int32", LANES))
                    )
                    for i in range(1, LANES):
                        red[0] = red[0] + red[i]
                    Y[m, no * nb + r] = _epilogue(spec, red[0], SX[m], XS[m], no * nb + r, E0, E1, E2)

    if not float_input:

        @T.macro
        def quantized(XQ, XS, W, Y, E0, E1, E2, M):
            SX = T.alloc_buffer((M,), "int32")
            for m in T.parallel(M):
                code_sum(XQ, SX, m)
            rows(XQ, XS, SX, W, Y, E0, E1, E2, M)

        return _int8_entry(spec, quantized, (N, KB), U8)

    @T.macro
    def body(X, W, Y, E0, E1, E2, M):
        XQ = T.alloc_buffer((M, T.int64(K)), "int8")
        XS = T.alloc_buffer((M,), F32)
        XE = T.alloc_buffer((M,), "int32")
        SX = T.alloc_buffer((M,), "int32")
        for m in T.parallel(M):
            quantize(X, XQ, XS, XE, m)
            code_sum(XQ, SX, m)
        for m in range(M):  # the input checked on the way: cm(x) skips Python's pass over it
            assert XE[m] < finite.EXPONENT, ("ValueError", [finite.MESSAGE])
        rows(XQ, XS, SX, W, Y, E0, E1, E2, M)

    return finite.mark(_float_entry(spec, body, (N, KB)), 0)


def _float_entry(spec: DenseSpec, body: Any, w_shape: tuple) -> tirx.PrimFunc:
    """The entry taking float rows: ``X f32 (M, K)``, ``W uint8`` (``w_shape``), then ``TS, TH`` or
    ``SC, OF, BI``, then ``Y``; ``body(X, W, Y, E0, E1, E2, M)`` is the kernel's macro."""
    K, N = spec.in_features, spec.out_features
    ws = tuple(T.int64(d) for d in w_shape)
    if spec.threshold:

        @T.prim_func(s_tir=True)
        def func(x: T.handle, w: T.handle, ts: T.handle, th: T.handle, y: T.handle):
            M = T.int64()
            X = T.match_buffer(x, (M, T.int64(K)), F32)
            W = T.match_buffer(w, ws, U8)
            TS = T.match_buffer(ts, (T.int64(N),), "int32")
            TH = T.match_buffer(th, (T.int64(N),), "int32")
            Y = T.match_buffer(y, (M, T.int64(N)), F32)
            body(X, W, Y, TS, TH, TH, M)

        return func

    @T.prim_func(s_tir=True)  # type: ignore[no-redef]
    def func(x: T.handle, w: T.handle, sc: T.handle, of: T.handle, bi: T.handle, y: T.handle):
        M = T.int64()
        X = T.match_buffer(x, (M, T.int64(K)), F32)
        W = T.match_buffer(w, ws, U8)
        SC = T.match_buffer(sc, (T.int64(N),), F32)
        OF = T.match_buffer(of, (T.int64(N),), F32)
        BI = T.match_buffer(bi, (T.int64(N),), F32)
        Y = T.match_buffer(y, (M, T.int64(N)), F32)
        body(X, W, Y, SC, OF, BI, M)

    return func
