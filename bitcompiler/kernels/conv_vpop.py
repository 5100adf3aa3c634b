"""W1A1 conv (``act="binary"``, pm1 weights, groups 1) over a flat im2col with AVX-512 ``vpopcntq``.

For x86 CPUs with ``avx512vpopcntdq`` (znver4, Ice Lake and later);
:func:`bitcompiler.kernels.conv2d_kernel` picks it where :func:`fits` holds and keeps the
register-blocked kernel of :mod:`bitcompiler.kernels.conv_binary` otherwise (and on every other
CPU). Same buffers, layout and numbers as that kernel.

* A **flat im2col** per batch row, ``XK[vector, tap, word, lane]``: the output pixels
  ``oh·OW + ow`` of the whole map in 8-pixel vectors that run across row ends, each vector's
  ``taps x words x 8`` int64 contiguous. The width-im2col of ``conv_binary`` gives each output row
  its own vectors, so a 14-pixel row takes two 8-pixel vectors (16 lanes for 14 pixels); here the
  196 pixels of a 14x14 map take 25 vectors (the last one overlaps the one before, so every vector
  stores whole): 11% fewer popcounts.
* Register block of 8 output channels x 8 pixels: each im2col vector is XOR-ed with the 8
  channels' broadcast weight words and popcounted while in a register, the 8 partial vectors stay
  in registers. Three vector instructions (``vpxorq``, ``vpopcntq``, ``vpaddq``) per 64 pairs of
  64-bit words, the bound of the kernel: on znver4 a C loop of just these runs at 0.42 ns per
  64 pairs, and ``vpternlogq`` (a padding mask folded into the XOR) at 0.52 ns, so the padding is
  corrected in the epilogue instead of masked.
* **Border classes**: padding taps read zero words and so count ``popcount(w)``. Output pixels
  fall into classes by which kernel rows and columns are inside the image (9 for a 3x3 kernel with
  padding 1; :func:`fits` allows 16). Per block, ``E[r, class] = n_valid · cg + 2 · (popcount of
  the weights on the class's padding taps)``, and a pixel's ``acc = E[r, class] - 2 · S``: one
  ``vpermi2q`` lookup (16 int64 entries in two registers) with the per-pixel class vector
  ``CLS``, a shift and a subtract per 8 outputs.
* The epilogues are ``conv_binary``'s (threshold, affine, the next layer's packed input, residual
  plus clip), vectorized over the 8 pixels; with the flat pixel index an affine output's 8 pixels
  are one contiguous store.
* **Threads.** A kernel with less than ``PARALLEL_MIN`` 64-bit word popcounts a sample (a
  ResNet's 1x1 shortcuts) runs on the calling thread. On a map of at least ``PIXEL_SPLIT_MIN``
  (16) pixel vectors the tasks split the pixels: each takes whole chunks of vectors (about 16
  chunks a batch row), builds their im2col in its own buffer and computes every output channel of
  them, so no task reads what another wrote (one parallel region: the tasks first make the
  blocks' tables, split over channel blocks, and meet at a barrier). A task that reads another
  core's im2col pays for every cache line: on a 2-core Xeon VM a one-layer 64->64 3x3 model on 32x32 took 78 us a call at 2 threads
  against 65 us at one with a shared im2col, and 49 us with chunks of pixels (one thread: 64 us
  either way). Smaller maps keep one parallel region: the tasks build one im2col together (split
  over taps), meet at a barrier, take output-channel blocks and meet again. Chunks of pixels also
  keep a ResNet's data where it was made: each block reads the residual and packed input rows
  that the same thread wrote in the block before.
* A residual epilogue can also write its output's signs packed (``packed`` and ``clip``), the
  next block's binary input, instead of a separate ``pack_sign_nchw`` over the float map.
* A ResNet block's first conv (packed output) can also compute the block's 1x1 projection
  shortcut (``shortcut``, :func:`fuses_shortcut`): the shortcut's input pixel ``(oh * S, ow * S)``
  is the first conv's centre tap, already in the im2col, so each task adds the shortcut's output
  channels of its pixels (or its channel blocks) from those words. Alone, the shortcut (a 64 ->
  128 1x1 at 16x16 is 32,768 word popcounts) runs on the calling thread, below ``PARALLEL_MIN``.

One thread, znver4, 256->256 3x3 on 14x14 (padding 1, batch 1), the kernel alone (this thread's
CPU time per call, alternating with ``conv_binary``'s kernel in one process): 127 us -> 107 us; the
whole compiled layer (``cm(x)``) 0.145 -> 0.126 ms. Without the im2col the call takes 2.6 us less,
without the class tables 2.6 us less; the rest is the popcount loop, at the rate of a C loop of
the same three instructions.
"""

from __future__ import annotations

from typing import Any

from tvm import tirx
from tvm.script import tirx as T

from bitcompiler.kernels.conv_pm1 import aff_value, bits_byte, clipped, pm1_conv_func, thr_hit, thr_value
from bitcompiler.kernels.conv_vpop_plan import (
    CHUNK_CHOICES,
    CHUNKS,
    NCLS,
    OB,
    SPLITS,
    VL,
    centre_tap,
    classes,
    default_split,
    fits,
    fuses_shortcut,
    pixel_vectors,
)
from bitcompiler.kernels.spec import ConvSpec
from bitcompiler.kernels.template import Knob, Template, generated

F32, I32, I64, U8 = "float32", "int32", "int64", "uint8"


def _lookup(table_lo: Any, idx: Any, table_hi: Any) -> Any:
    """``vpermi2q``: lane l of the result is entry ``idx[l]`` of the 16 int64 ``table_lo, table_hi``."""
    return T.call_llvm_pure_intrin("int64x8", "llvm.x86.avx512.vpermi2var.q.512", table_lo, idx, table_hi)


def vpop_conv_func(
    spec: ConvSpec,
    packed: bool = False,
    clip: tuple[float, float] | None = None,
    split: str | None = None,
    shortcut: ConvSpec | None = None,
    chunks: int = CHUNKS,
) -> tirx.PrimFunc:
    """The kernel for ``spec`` (:func:`fits`); arguments as
    :func:`bitcompiler.kernels.conv_binary.binary_pm1_func` (``packed``: the next layer's packed
    input; ``clip``: the residual epilogue; both: the residual output and its signs packed).
    ``split`` = ``"pixels"``, ``"channels"`` or ``"serial"`` overrides how the tasks divide the
    work (default: :func:`default_split`); with ``"pixels"`` a batch row is cut into about
    ``chunks`` chunks of pixel vectors. ``shortcut`` (with ``packed``, a
    :func:`fuses_shortcut` spec) also computes that 1x1 conv's affine output from this kernel's
    centre tap; its arguments follow ``TS, TH``: ``SP int32 (1,O,1,1,CWg), SC, OF, BI f32 (O,)``,
    then ``Y`` and the shortcut's ``SY f32 (M,O,OH,OW)``."""
    if not fits(spec):
        raise ValueError(f"the flat-im2col vpopcnt conv does not fit {spec}")
    if shortcut is not None and not (packed and clip is None and fuses_shortcut(spec, shortcut)):
        raise ValueError(f"no shortcut {shortcut} computed in the packed conv {spec}")
    signs = packed and clip is not None  # a residual output and its signs packed
    packed = packed and clip is None
    O, H, W, CG = spec.out_channels, spec.in_h, spec.in_w, spec.cg
    (KH, KW), (SH, SW), (PH, PW), (DH, DW) = spec.kernel, spec.stride, spec.padding, spec.dilation
    CWG, OH, OW = spec.words_per_group, spec.out_h, spec.out_w
    CV, NT, NP, NV = CWG // 2, KH * KW, OH * OW, pixel_vectors(spec)
    NOB = O // OB
    # large maps: tasks take chunks of CHV pixel vectors (NCH chunks a batch row) instead of
    # channel blocks, so that no task reads what another wrote (see the module docstring)
    if split not in (None, *SPLITS):
        raise ValueError(f"split must be 'pixels', 'channels' or 'serial', got {split!r}")
    split = split or default_split(spec)
    if chunks < 1:
        raise ValueError(f"chunks must be at least 1, got {chunks}")
    CHV = -(-NV // chunks)  # (more chunks than vectors: a vector each)
    NCH = -(-NV // CHV)
    ZERO = tirx.const(0, I64)
    valid, rows, cols, ncols = classes(spec)
    lanes = T.ramp(T.int64(0), T.int64(1), VL)
    centre = centre_tap(spec)  # the shortcut's input tap
    high = T.ramp(T.int64(VL), T.int64(1), VL)

    def px(v):
        # first pixel of vector v: the last vector ends at the map's end (it recomputes a few
        # pixels of the one before), so that every vector stores whole
        return tirx.min(v * VL, NP - VL) if NP % VL else v * VL

    def inside(p, a, b):
        # whether tap (a, b) of flat output pixel p lies inside the image
        ih, iw = p // OW * SH - PH + a * DH, p % OW * SW - PW + b * DW
        return tirx.all(ih >= 0, ih < H, iw >= 0, iw < W)

    def pixel_class(p):
        # rows[oh] * ncols + cols[ow], as Selects over the border positions (class 0 elsewhere)
        r = sum((tirx.Select(p // OW == i, c, 0) for i, c in enumerate(rows) if c), tirx.const(0, I32))
        c = sum((tirx.Select(p % OW == i, c, 0) for i, c in enumerate(cols) if c), tirx.const(0, I32))
        return (r * ncols + c).astype(I64)

    def class_table(PC, r, c):
        # class_entry of a loop's class c
        return sum((tirx.Select(c == k, class_entry(PC, r, k), ZERO) for k in range(len(valid))), ZERO)

    def class_entry(PC, r, c):
        # acc = E[class] - 2 * S: n_valid * cg, plus twice the weights' popcount on the padding
        # taps (their zero words counted popcount(w) in S)
        if c >= len(valid):
            return ZERO
        pad = [t for t in range(NT) if t not in valid[c]]
        corr = sum((PC[r, t] for t in pad), tirx.const(0, I64))
        return tirx.const(len(valid[c]) * CG, I64) + 2 * corr

    def tap_count(PV, o, t):
        # the popcount of the weights of one tap: a sum of scalar popcounts (as loops, LLVM
        # vectorizes them over the channels with gathers)
        return sum((T.popcount(PV[o, t, w]) for w in range(1, CV)), T.popcount(PV[o, t, 0]))

    def make(out_value, E0, E1, short=None):
        # short: the shortcut's buffers (weights, scale, bias, output), or None
        def y_at(A, RF, m, o, r, v, l):
            value = out_value(E0, E1, A[r, l].astype(I32), o)
            return clipped(value, RF, (m, o, px(v) + l), clip)

        def sign_byte(YF, m, o0, p):
            return bits_byte([YF[m, o0 + r, p] >= tirx.const(0.0, F32) for r in range(OB)])

        def byte_at(A, o0, l):
            # the threshold outputs of channels o0 .. o0 + 7 as the bits of one byte (1 = +1)
            return bits_byte([thr_hit(E0, E1, A[r, l].astype(I32), o0 + r) for r in range(OB)])

        @T.macro
        def im2col_tap(XV, XK, CLS, m, t, v0, nv):
            # tap t of pixel vectors v0 .. v0 + nv - 1 (XK's vectors 0 .. nv - 1): their CV words
            # per pixel (0 outside the image)
            for j, l in T.grid(nv, T.int64(VL)):
                for w in T.vectorized(T.int64(CV)):
                    XK[j, t, w, l] = T.if_then_else(
                        inside(px(v0 + j) + l, t // KW, t % KW),
                        XV[
                            m,
                            (px(v0 + j) + l) // OW * SH - PH + t // KW * DH,
                            (px(v0 + j) + l) % OW * SW - PW + t % KW * DW,
                            w,
                        ],
                        ZERO,
                    )
            if t == 0:
                for j, l in T.grid(nv, T.int64(VL)):
                    CLS[j, l] = pixel_class(px(v0 + j) + l)

        @T.macro
        def tables(PV, E, ob):
            # E[r, class] of the block's channels (class_entry), from each tap's weight popcount
            PC = T.alloc_buffer((T.int64(OB), T.int64(NT)), I64, scope="global")
            for r in T.unroll(T.int64(OB)):
                for t in range(T.int64(NT)):
                    PC[r, t] = tap_count(PV, ob * OB + r, t)
                for c in T.unroll(NCLS):
                    E[ob, r, c] = class_table(PC, r, c)

        @T.macro
        def epilogue(A, Y, M, RES, YP, m, ob, v):
            # the outputs of pixel vector v from the accumulators A (int64 lanes)
            if packed:
                # one byte per pixel: the OB = 8 channels' +-1 as bits (bit r = channel o0 + r)
                YB = T.decl_buffer((M, T.int64(NP), T.int64(O // 8)), U8, data=Y.data)
                for l in T.vectorized(T.int64(VL)):
                    YB[m, px(v) + l, ob] = byte_at(A, ob * OB, l)
            else:
                YF = T.decl_buffer((M, T.int64(O), T.int64(NP)), F32, data=Y.data)
                RF = T.decl_buffer((M, T.int64(O), T.int64(NP)), F32, data=RES.data)
                for r in T.unroll(T.int64(OB)):
                    for l in T.vectorized(T.int64(VL)):
                        YF[m, ob * OB + r, px(v) + l] = y_at(A, RF, m, ob * OB + r, r, v, l)
                if signs:
                    # the block's signs (bit r = channel o0 + r, 1 = y >= 0) as pack_sign_nchw
                    # packs them: the next binary layer's input
                    YS = T.decl_buffer((M, T.int64(NP), T.int64(O // 8)), U8, data=YP.data)
                    for l in T.vectorized(T.int64(VL)):
                        YS[m, px(v) + l, ob] = sign_byte(YF, m, ob * OB, px(v) + l)

        @T.macro
        def shortcut_block(XK, M, m, ob, v0, nv):
            # the 1x1 shortcut's output channels ob * OB .. ob * OB + OB - 1 from the centre tap's
            # words of XK (always inside the image): acc = CG - 2 * popcount(x ^ w)
            SP, SC, SB, SY = short
            SV = T.decl_buffer((T.int64(O), T.int64(CV)), I64, data=SP.data)
            SF = T.decl_buffer((M, T.int64(O), T.int64(NP)), F32, data=SY.data)
            for j in range(nv):
                S = T.alloc_buffer((T.int64(OB), T.int64(VL)), I64, scope="global")
                for r in T.unroll(T.int64(OB)):
                    for l in T.vectorized(T.int64(VL)):
                        S[r, l] = ZERO
                for w in range(T.int64(CV)):
                    for r in T.unroll(T.int64(OB)):
                        for l in T.vectorized(T.int64(VL)):
                            S[r, l] = S[r, l] + T.popcount(XK[j, centre, w, l] ^ SV[ob * OB + r, w])
                for r in T.unroll(T.int64(OB)):
                    for l in T.vectorized(T.int64(VL)):
                        SF[m, ob * OB + r, px(v0 + j) + l] = aff_value(
                            SC, SB, (tirx.const(CG, I64) - 2 * S[r, l]).astype(I32), ob * OB + r
                        )

        @T.macro
        def block(XK, CLS, PV, E, Y, M, RES, YP, m, ob, v0, nv):
            # output channels ob * OB .. ob * OB + OB - 1 of batch row m, pixel vectors v0 ..
            # v0 + nv - 1 (XK's and CLS's 0 .. nv - 1), with the block's tables E
            for j in range(nv):
                S = T.alloc_buffer((T.int64(OB), T.int64(VL)), I64, scope="global")
                for r in T.unroll(T.int64(OB)):
                    for l in T.vectorized(T.int64(VL)):
                        S[r, l] = ZERO
                for t, w in T.grid(T.int64(NT), T.int64(CV)):
                    for r in T.unroll(T.int64(OB)):
                        for l in T.vectorized(T.int64(VL)):
                            S[r, l] = S[r, l] + T.popcount(XK[j, t, w, l] ^ PV[ob * OB + r, t, w])
                for r in T.unroll(T.int64(OB)):
                    S[r, lanes] = _lookup(E[ob, r, lanes], CLS[j, lanes], E[ob, r, high]) - (
                        S[r, lanes] << T.Broadcast(T.int64(1), VL)
                    )
                epilogue(S, Y, M, RES, YP, m, ob, v0 + j)
            if short is not None:
                shortcut_block(XK, M, m, ob, v0, nv)

        @T.macro
        def chunks_of_pixels(XV, PV, EA, Y, M, RES, YP):
            # tasks that share nothing: each takes whole chunks of CHV pixel vectors (batch rows x
            # chunks), builds their im2col in its own buffers and computes every output channel
            for i in T.parallel(M * T.int64(NCH)):
                XK = T.alloc_buffer((T.int64(CHV), T.int64(NT), T.int64(CV), T.int64(VL)), I64)
                CLS = T.alloc_buffer((T.int64(CHV), T.int64(VL)), I64)
                v0 = i % NCH * CHV  # the chunk's first vector, and its vectors
                nv = T.min(CHV, NV - v0)
                for t in range(T.int64(NT)):
                    im2col_tap(XV, XK, CLS, i // NCH, t, v0, nv)
                for ob in range(T.int64(NOB)):
                    block(XK, CLS, PV, EA, Y, M, RES, YP, i // NCH, ob, v0, nv)

        @T.macro
        def body(XP, P, Y, M, RES, YP):
            XV = T.decl_buffer((M, T.int64(H), T.int64(W), T.int64(CV)), I64, data=XP.data)
            PV = T.decl_buffer((T.int64(O), T.int64(NT), T.int64(CV)), I64, data=P.data)
            if split == "pixels":
                # first the blocks' tables (a few popcounts per weight word), shared by all tasks
                EA = T.alloc_buffer((T.int64(NOB), T.int64(OB), T.int64(NCLS)), I64)
                if NOB > 1:
                    # one parallel region: the tasks make the tables of their channel blocks and
                    # meet at a barrier, then take chunks of pixels (on the calling thread alone,
                    # ResNet-18's tables took 4% of a call at 2 threads)
                    with T.attr(0, "pragma_parallel_launch_point", 1):
                        with T.attr(0, "pragma_parallel_barrier_when_finish", 1):
                            for ob in T.parallel(T.int64(NOB)):
                                tables(PV, EA, ob)
                        chunks_of_pixels(XV, PV, EA, Y, M, RES, YP)
                else:  # (a parallel loop of one iteration would run on every task of a region)
                    tables(PV, EA, T.int64(0))
                    chunks_of_pixels(XV, PV, EA, Y, M, RES, YP)
            elif split == "channels" and NOB > 1:
                # one parallel region (a TVM launch point): per batch row the tasks build the
                # im2col together, wait at a barrier, compute their channel blocks and wait again
                # before the next row overwrites XK (allocated outside the region: shared)
                XK = T.alloc_buffer((T.int64(NV), T.int64(NT), T.int64(CV), T.int64(VL)), I64)
                CLS = T.alloc_buffer((T.int64(NV), T.int64(VL)), I64)
                EA = T.alloc_buffer((T.int64(NOB), T.int64(OB), T.int64(NCLS)), I64)
                with T.attr(0, "pragma_parallel_launch_point", 1):
                    for m in range(M):
                        with T.attr(0, "pragma_parallel_barrier_when_finish", 1):
                            for t in T.parallel(T.int64(NT)):
                                im2col_tap(XV, XK, CLS, m, t, T.int64(0), T.int64(NV))
                        with T.attr(0, "pragma_parallel_barrier_when_finish", 1):
                            for ob in T.parallel(T.int64(NOB)):
                                tables(PV, EA, ob)
                                block(XK, CLS, PV, EA, Y, M, RES, YP, m, ob, T.int64(0), T.int64(NV))
            else:
                XK = T.alloc_buffer((T.int64(NV), T.int64(NT), T.int64(CV), T.int64(VL)), I64)
                CLS = T.alloc_buffer((T.int64(NV), T.int64(VL)), I64)
                EA = T.alloc_buffer((T.int64(NOB), T.int64(OB), T.int64(NCLS)), I64)
                for m in range(M):
                    for t in range(T.int64(NT)):
                        im2col_tap(XV, XK, CLS, m, t, T.int64(0), T.int64(NV))
                    for ob in range(T.int64(NOB)):
                        tables(PV, EA, ob)
                        block(XK, CLS, PV, EA, Y, M, RES, YP, m, ob, T.int64(0), T.int64(NV))

        return body

    if shortcut is None:
        return pm1_conv_func(spec, make, packed, clip, signs)
    G, KH, KW = spec.groups, spec.kernel[0], spec.kernel[1]

    @T.prim_func(s_tir=True)
    def func(
        xp: T.handle,
        p: T.handle,
        ts: T.handle,
        th: T.handle,
        sp: T.handle,
        sc: T.handle,
        of: T.handle,
        bi: T.handle,
        y: T.handle,
        sy: T.handle,
    ):
        M = T.int64()
        XP = T.match_buffer(xp, (M, T.int64(H), T.int64(W), T.int64(G), T.int64(CWG)), I32)
        P = T.match_buffer(p, (T.int64(1), T.int64(O), T.int64(KH), T.int64(KW), T.int64(CWG)), I32)
        TS = T.match_buffer(ts, (T.int64(O),), I32)
        TH = T.match_buffer(th, (T.int64(O),), I32)
        SP = T.match_buffer(sp, (T.int64(1), T.int64(O), T.int64(1), T.int64(1), T.int64(CWG)), I32)
        SC = T.match_buffer(sc, (T.int64(O),), F32)
        T.match_buffer(of, (T.int64(O),), F32)  # pm1 codes carry no offset
        SB = T.match_buffer(bi, (T.int64(O),), F32)
        Y = T.match_buffer(y, (M, T.int64(OH), T.int64(OW), T.int64(1), T.int64(O // 32)), I32)
        SY = T.match_buffer(sy, (M, T.int64(O), T.int64(OH), T.int64(OW)), F32)
        make(thr_value, TS, TH, (SP, SC, SB, SY))(XP, P, Y, M, Y, Y)

    return func


def vpop_template(
    spec: ConvSpec,
    packed: bool = False,
    clip: tuple[float, float] | None = None,
    shortcut: ConvSpec | None = None,
) -> Template:
    """:func:`vpop_conv_func` as a tuning template (:func:`bitcompiler.kernels.template.generated`):
    its choices are how the tasks divide the work (``split``: serial, output-channel blocks or
    chunks of pixel vectors) and, for chunks of pixels, about how many chunks a batch row is cut
    into (``chunks``). The hand schedule is :func:`default_split` with ``CHUNKS``. A knob that
    does not apply (chunks of a channel split) is normalized away, so each kernel is built once."""
    nv = pixel_vectors(spec)
    knobs = [
        Knob("split", tuple(range(len(SPLITS))), SPLITS.index(default_split(spec))),
        Knob("chunks", CHUNK_CHOICES, CHUNKS),
    ]

    def build(split: int, chunks: int) -> tirx.PrimFunc:
        return vpop_conv_func(spec, packed, clip, SPLITS[split], shortcut, chunks)

    def key(split: int, chunks: int) -> tuple[int, int]:
        # the kernel depends on chunks only through the vectors a chunk takes, and only when the
        # tasks split the pixels
        return split, -(-nv // chunks) if SPLITS[split] == "pixels" else 0

    return generated("conv-vpop", knobs, build, key)
