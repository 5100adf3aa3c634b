"""Register-blocked W1A1 conv (``act="binary"``, pm1 weights) for the host CPU.

Computes exactly what :mod:`bitcompiler.kernels.conv` documents (same buffers and layout);
:func:`bitcompiler.kernels.conv2d_kernel` picks it for LLVM targets.

CPU schedule, ``act="binary"`` with pm1 weights (``_binary_pm1_func``, written directly as loops):

* Per batch row, a width-im2col of the zero-padded activations is built once,
  ``XK[g, kw, padded_row, word, ow]`` (words read as int64 when ``CWg`` is even), so the ``VL``
  (4 int64 / 8 int32) output pixels of one vector read one contiguous vector per
  ``(kh, kw, word)`` -- no bounds checks in the reduction, strides and dilation folded in.
* Register block of ``OB`` (8) output channels x ``VL`` pixels: each activation vector is
  XOR-ed/popcounted against ``OB`` broadcast weight words while in a register; the ``OB`` partial
  vectors live in a small "global"-scope stack array (registers), as in ``dense.py``.
* Padding taps read zero words and so count ``popcount(w)`` instead of 0; the epilogue subtracts
  the popcount of those taps' weights, from per-call tables ``PC[o, kh, kw]`` (per tap) and
  ``PCK[o, kw]`` (per column) and a per-(block, row) ``RC`` -- a few vector selects per output.
* Parallel over (output-channel block, output row); the epilogue is vectorized over the pixels
  (scalar with a bounds test when the width is not a multiple of ``VL``).
"""

from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

from bitcompiler.kernels._common import as_i32, largest_divisor
from bitcompiler.kernels.spec import ConvSpec

F32 = "float32"


def binary_pm1_func(spec: ConvSpec) -> tirx.PrimFunc:
    """Register-blocked act="binary", code="pm1" conv for the host CPU (see the module docstring)."""
    O, H, W = spec.out_channels, spec.in_h, spec.in_w
    (KH, KW), (SH, SW), (PH, PW), (DH, DW) = spec.kernel, spec.stride, spec.padding, spec.dilation
    G, CG, OG, CWG = spec.groups, spec.cg, spec.og, spec.words_per_group
    OH, OW = spec.out_h, spec.out_w
    wide = CWG % 2 == 0
    WT = "int64" if wide else "int32"
    CV = CWG // 2 if wide else CWG
    VL = 4 if wide else 8  # output pixels per vector
    NV = (OW + VL - 1) // VL
    OWP = NV * VL
    HP = (OH - 1) * SH + (KH - 1) * DH + 1
    OB = largest_divisor(OG, (8, 4, 2))  # output channels per register block
    NOB = O // OB
    ZERO = tirx.const(0, WT)
    I32 = "int32"

    def row_ok(oh, kh):
        ih = oh * SH - PH + kh * DH
        return tirx.all(ih >= 0, ih < H)

    def col_ok(ow, kw):
        iw = ow * SW - PW + kw * DW
        return tirx.all(iw >= 0, iw < W)

    def n_rows(oh):
        return sum(tirx.Select(row_ok(oh, k), 1, 0) for k in range(KH))

    def acc_value(S, RC, PCK, o, r, l, oh, ow):
        # sum over valid taps of popcount(a ^ w) = S - (popcount of the weights on padding taps)
        nw = sum(tirx.Select(col_ok(ow, b), 1, 0) for b in range(KW))
        corr = sum(tirx.Select(col_ok(ow, b), RC[r, b], PCK[o, b]) for b in range(KW))
        return (n_rows(oh) * nw) * CG - 2 * (as_i32(S[r, l]) - corr)

    def thr_value(TS, TH, a, o):
        s = tirx.Select(TS[o] > 0, a, tirx.Select(TS[o] < 0, -a, tirx.const(0, I32)))
        return tirx.Select(s >= TH[o], tirx.const(1.0, F32), tirx.const(-1.0, F32))

    def aff_value(SC, BI, a, o):
        return SC[o] * a.astype(F32) + BI[o]

    def make(out_value, E0, E1):
        @T.macro
        def body(XP, P, Y, M):
            XV = T.decl_buffer((M, T.int64(H), T.int64(W), T.int64(G), T.int64(CV)), WT, data=XP.data)
            PV = T.decl_buffer((T.int64(O), T.int64(KH), T.int64(KW), T.int64(CV)), WT, data=P.data)
            PC = T.alloc_buffer((T.int64(O), T.int64(KH), T.int64(KW)), I32)
            PCK = T.alloc_buffer((T.int64(O), T.int64(KW)), I32)
            for o, a, b in T.grid(T.int64(O), T.int64(KH), T.int64(KW)):
                PC[o, a, b] = 0
                for w in range(T.int64(CV)):
                    PC[o, a, b] = PC[o, a, b] + T.Cast(I32, T.popcount(PV[o, a, b, w]))
            for o, b in T.grid(T.int64(O), T.int64(KW)):
                PCK[o, b] = 0
                for a in range(T.int64(KH)):
                    PCK[o, b] = PCK[o, b] + PC[o, a, b]
            for m in range(M):
                # width-im2col of the padded activations: XK[g, kw, row, word, ow]
                XK = T.alloc_buffer((T.int64(G), T.int64(KW), T.int64(HP), T.int64(CV), T.int64(OWP)), WT)
                for g, b, r in T.grid(T.int64(G), T.int64(KW), T.int64(HP)):
                    for w, l in T.grid(T.int64(CV), T.int64(OWP)):
                        XK[g, b, r, w, l] = T.if_then_else(
                            r >= PH
                            and r < PH + H
                            and l < OW
                            and l * SW - PW + b * DW >= 0
                            and l * SW - PW + b * DW < W,
                            XV[m, r - PH, l * SW - PW + b * DW, g, w],
                            ZERO,
                        )
                for t in T.parallel(T.int64(NOB * OH)):
                    RC = T.alloc_buffer((T.int64(OB), T.int64(KW)), I32, scope="global")
                    for r, b in T.grid(T.int64(OB), T.int64(KW)):
                        RC[r, b] = 0
                        for a in range(T.int64(KH)):
                            RC[r, b] = RC[r, b] + T.Select(row_ok(t % OH, a), 0, PC[t // OH * OB + r, a, b])
                    for v in range(T.int64(NV)):
                        S = T.alloc_buffer((T.int64(OB), T.int64(VL)), WT, scope="global")
                        for r in T.unroll(T.int64(OB)):
                            for l in T.vectorized(T.int64(VL)):
                                S[r, l] = ZERO
                        for a, b, w in T.grid(T.int64(KH), T.int64(KW), T.int64(CV)):
                            for r in T.unroll(T.int64(OB)):
                                for l in T.vectorized(T.int64(VL)):
                                    S[r, l] = S[r, l] + T.popcount(
                                        XK[(t // OH * OB) // OG, b, t % OH * SH + a * DH, w, v * VL + l]
                                        ^ PV[t // OH * OB + r, a, b, w]
                                    )
                        if OWP == OW:
                            for r in T.unroll(T.int64(OB)):
                                for l in T.vectorized(T.int64(VL)):
                                    Y[m, t // OH * OB + r, t % OH, v * VL + l] = out_value(
                                        E0,
                                        E1,
                                        acc_value(S, RC, PCK, t // OH * OB + r, r, l, t % OH, v * VL + l),
                                        t // OH * OB + r,
                                    )
                        else:
                            for r, l in T.grid(T.int64(OB), T.int64(VL)):
                                if v * VL + l < OW:
                                    Y[m, t // OH * OB + r, t % OH, v * VL + l] = out_value(
                                        E0,
                                        E1,
                                        acc_value(S, RC, PCK, t // OH * OB + r, r, l, t % OH, v * VL + l),
                                        t // OH * OB + r,
                                    )

        return body

    if spec.threshold:

        @T.prim_func(s_tir=True)
        def func(xp: T.handle, p: T.handle, ts: T.handle, th: T.handle, y: T.handle):
            M = T.int64()
            XP = T.match_buffer(xp, (M, T.int64(H), T.int64(W), T.int64(G), T.int64(CWG)), "int32")
            P = T.match_buffer(p, (T.int64(1), T.int64(O), T.int64(KH), T.int64(KW), T.int64(CWG)), "int32")
            TS = T.match_buffer(ts, (T.int64(O),), "int32")
            TH = T.match_buffer(th, (T.int64(O),), "int32")
            Y = T.match_buffer(y, (M, T.int64(O), T.int64(OH), T.int64(OW)), F32)
            make(thr_value, TS, TH)(XP, P, Y, M)

        return func

    @T.prim_func(s_tir=True)  # type: ignore[no-redef]
    def func(xp: T.handle, p: T.handle, sc: T.handle, of: T.handle, bi: T.handle, y: T.handle):
        M = T.int64()
        XP = T.match_buffer(xp, (M, T.int64(H), T.int64(W), T.int64(G), T.int64(CWG)), "int32")
        P = T.match_buffer(p, (T.int64(1), T.int64(O), T.int64(KH), T.int64(KW), T.int64(CWG)), "int32")
        SC = T.match_buffer(sc, (T.int64(O),), F32)
        T.match_buffer(of, (T.int64(O),), F32)  # pm1 codes carry no offset
        BI = T.match_buffer(bi, (T.int64(O),), F32)
        Y = T.match_buffer(y, (M, T.int64(O), T.int64(OH), T.int64(OW)), F32)
        make(aff_value, SC, BI)(XP, P, Y, M)

    return func
