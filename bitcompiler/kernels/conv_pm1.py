"""What the binary pm1 CPU conv kernels share: which epilogues a layer can take, the epilogue
values, and the PrimFunc signatures around a kernel body.

Two kernels compute these convs (``act="binary"``, pm1 weights) on the CPU:
:mod:`bitcompiler.kernels.conv_binary` (register-blocked, any x86 or Arm CPU) and
:mod:`bitcompiler.kernels.conv_vpop` (AVX-512 vector popcounts over a flat im2col). Both take the
same buffers, so :func:`pm1_conv_func` wraps either body ``make(out_value, E0, E1)(XP, P, Y, M,
RES, YP)`` in the signature of its epilogue: threshold (+-1 floats), the next layer's packed input,
affine, affine plus residual and clamp, and that residual output with its signs packed.
"""

from __future__ import annotations

from typing import Any

from tvm import tirx
from tvm.script import tirx as T

from bitcompiler.kernels.spec import ConvSpec

F32 = "float32"


def packs_output(spec: ConvSpec) -> bool:
    """Whether :func:`~bitcompiler.kernels.conv_binary.binary_pm1_func` can write ``spec``'s thresholds as the next layer's packed input."""
    return (
        spec.act == "binary"
        and spec.code == "pm1"
        and spec.threshold
        and spec.out_channels % 32 == 0
        and spec.og % 8 == 0
    )


def fuses_residual(spec: ConvSpec) -> bool:
    """Whether :func:`~bitcompiler.kernels.conv_binary.binary_pm1_func` can fold ``hardtanh(conv + residual)`` into ``spec``'s epilogue."""
    return spec.act == "binary" and spec.code == "pm1" and not spec.threshold


def thr_hit(TS: Any, TH: Any, a: Any, o: Any) -> Any:
    """The reference's threshold: ``s = sign(TS[o]) * a`` (0 when TS = 0), then ``s >= TH[o]``."""
    sgn = tirx.Select(TS[o] > 0, 1, 0) - tirx.Select(TS[o] < 0, 1, 0)
    return sgn * a >= TH[o]


def thr_value(TS: Any, TH: Any, a: Any, o: Any) -> Any:
    return tirx.Select(thr_hit(TS, TH, a, o), tirx.const(1.0, F32), tirx.const(-1.0, F32))


def aff_value(SC: Any, BI: Any, a: Any, o: Any) -> Any:
    return SC[o] * a.astype(F32) + BI[o]


def bits_byte(hits: list) -> Any:
    """Up to 8 per-channel conditions as the bits of one uint8 (bit r = condition r, 1 = +1): one
    byte of the packed layout :func:`bitcompiler.kernels.pack_sign_nchw` writes."""
    bits = [tirx.Select(h, tirx.const(1 << r, "int32"), tirx.const(0, "int32")) for r, h in enumerate(hits)]
    return tirx.Cast("uint8", sum(bits[1:], bits[0]))


def clipped(v: Any, RES: Any, at: Any, clip: tuple[float, float] | None) -> Any:
    """With a residual: ``hardtanh(v + RES[at])`` as PyTorch computes it (float32 add, then clamp)."""
    if clip is None:
        return v
    lo, hi = (tirx.const(float(b), F32) for b in clip)
    return tirx.min(tirx.max(v + RES[at], lo), hi)


def pm1_conv_func(
    spec: ConvSpec, make: Any, packed: bool, clip: tuple[float, float] | None, signs: bool = False
) -> tirx.PrimFunc:
    """The PrimFunc of a binary pm1 CPU conv with :func:`~bitcompiler.kernels.conv_binary.binary_pm1_func`'s buffers around
    ``make(out_value, E0, E1)(XP, P, Y, M, RES, YP)``, the kernel's body for an epilogue
    (``thr_value, TS, TH`` or ``aff_value, SC, BI``); ``signs``: a residual epilogue that also
    writes its output's signs packed, ``YP``."""
    O, H, W = spec.out_channels, spec.in_h, spec.in_w
    (KH, KW), G, CWG, OH, OW = spec.kernel, spec.groups, spec.words_per_group, spec.out_h, spec.out_w

    if packed:

        @T.prim_func(s_tir=True)  # type: ignore[no-redef]
        def func(xp: T.handle, p: T.handle, ts: T.handle, th: T.handle, y: T.handle):
            M = T.int64()
            XP = T.match_buffer(xp, (M, T.int64(H), T.int64(W), T.int64(G), T.int64(CWG)), "int32")
            P = T.match_buffer(p, (T.int64(1), T.int64(O), T.int64(KH), T.int64(KW), T.int64(CWG)), "int32")
            TS = T.match_buffer(ts, (T.int64(O),), "int32")
            TH = T.match_buffer(th, (T.int64(O),), "int32")
            Y = T.match_buffer(y, (M, T.int64(OH), T.int64(OW), T.int64(1), T.int64(O // 32)), "int32")
            make(thr_value, TS, TH)(XP, P, Y, M, Y, Y)

        return func

    if spec.threshold:

        @T.prim_func(s_tir=True)
        def func(xp: T.handle, p: T.handle, ts: T.handle, th: T.handle, y: T.handle):
            M = T.int64()
            XP = T.match_buffer(xp, (M, T.int64(H), T.int64(W), T.int64(G), T.int64(CWG)), "int32")
            P = T.match_buffer(p, (T.int64(1), T.int64(O), T.int64(KH), T.int64(KW), T.int64(CWG)), "int32")
            TS = T.match_buffer(ts, (T.int64(O),), "int32")
            TH = T.match_buffer(th, (T.int64(O),), "int32")
            Y = T.match_buffer(y, (M, T.int64(O), T.int64(OH), T.int64(OW)), F32)
            make(thr_value, TS, TH)(XP, P, Y, M, Y, Y)

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
        make(aff_value, SC, BI)(XP, P, Y, M, Y, Y)

    if clip is None:
        return func

    @T.prim_func(s_tir=True)  # type: ignore[no-redef]
    def func(xp: T.handle, p: T.handle, sc: T.handle, of: T.handle, bi: T.handle, res: T.handle, y: T.handle):
        M = T.int64()
        XP = T.match_buffer(xp, (M, T.int64(H), T.int64(W), T.int64(G), T.int64(CWG)), "int32")
        P = T.match_buffer(p, (T.int64(1), T.int64(O), T.int64(KH), T.int64(KW), T.int64(CWG)), "int32")
        SC = T.match_buffer(sc, (T.int64(O),), F32)
        T.match_buffer(of, (T.int64(O),), F32)  # pm1 codes carry no offset
        BI = T.match_buffer(bi, (T.int64(O),), F32)
        RES = T.match_buffer(res, (M, T.int64(O), T.int64(OH), T.int64(OW)), F32)
        Y = T.match_buffer(y, (M, T.int64(O), T.int64(OH), T.int64(OW)), F32)
        make(aff_value, SC, BI)(XP, P, Y, M, RES, Y)

    if not signs:
        return func

    @T.prim_func(s_tir=True)  # type: ignore[no-redef]
    def func(
        xp: T.handle,
        p: T.handle,
        sc: T.handle,
        of: T.handle,
        bi: T.handle,
        res: T.handle,
        y: T.handle,
        yp: T.handle,
    ):
        M = T.int64()
        XP = T.match_buffer(xp, (M, T.int64(H), T.int64(W), T.int64(G), T.int64(CWG)), "int32")
        P = T.match_buffer(p, (T.int64(1), T.int64(O), T.int64(KH), T.int64(KW), T.int64(CWG)), "int32")
        SC = T.match_buffer(sc, (T.int64(O),), F32)
        T.match_buffer(of, (T.int64(O),), F32)  # pm1 codes carry no offset
        BI = T.match_buffer(bi, (T.int64(O),), F32)
        RES = T.match_buffer(res, (M, T.int64(O), T.int64(OH), T.int64(OW)), F32)
        Y = T.match_buffer(y, (M, T.int64(O), T.int64(OH), T.int64(OW)), F32)
        YP = T.match_buffer(yp, (M, T.int64(OH), T.int64(OW), T.int64(1), T.int64(O // 32)), "int32")
        make(aff_value, SC, BI)(XP, P, Y, M, RES, YP)

    return func


def packs_residual(spec: ConvSpec) -> bool:
    """Whether :func:`~bitcompiler.kernels.conv_binary.binary_pm1_func` can also write the signs of a residual epilogue's output as the
    next binary layer's packed input (:func:`fuses_residual` with 32k output channels)."""
    return fuses_residual(spec) and spec.out_channels % 32 == 0 and spec.og % 8 == 0
