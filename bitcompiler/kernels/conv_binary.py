"""Register-blocked W1A1 conv (``act="binary"``, pm1 weights) for the host CPU.

Computes exactly what :mod:`bitcompiler.kernels.conv` documents (same buffers and layout);
:func:`bitcompiler.kernels.conv2d_kernel` picks it for LLVM targets. Which epilogues a layer can
take, their values and the PrimFunc signatures are :mod:`bitcompiler.kernels.conv_pm1`'s, shared
with the AVX-512 kernel :mod:`bitcompiler.kernels.conv_vpop`.

CPU schedule, ``act="binary"`` with pm1 weights (``binary_pm1_func``, written directly as loops):

* Per batch row, a width-im2col of the zero-padded activations is built once,
  ``XK[g, padded_row, kw, word, ow]`` (words read as int64 when ``CWg`` is even), so the ``VL``
  (4 int64 / 8 int32) output pixels of one vector read one contiguous vector per
  ``(kh, kw, word)`` -- no bounds checks in the reduction, strides and dilation folded in.
* Register block of ``OB`` (8) output channels x ``VL`` pixels: each activation vector is
  XOR-ed/popcounted against ``OB`` broadcast weight words while in a register; the ``OB`` partial
  vectors live in a small "global"-scope stack array (registers), as in ``dense_binary.py``.
* **Byte lanes** (AVX2, int64 words, dilation 1; ``byte_lanes=True``): the ``(kh, kw, word)``
  steps are one flat index and the popcounts are summed in uint8 lanes for up to 31 steps (at
  most 8 per byte per step: exact), then widened with one ``vpsadbw`` per chunk, whose 64-bit
  sums are exactly the per-pixel sums. ``popcount(x ^ w)`` is computed as two ``vpshufb`` nibble
  lookups of ``x_lo ^ w_lo`` and ``x_hi ^ w_hi``: x's nibbles are split once per step for all
  ``OB`` channels and w's once per block (``WN``), so a channel-step is 2 broadcast loads, 2 xor,
  2 shuffles and 2 byte adds (the plain form is 10 vector ops with the widening). The lookup
  table is written outside the parallel body so LLVM keeps it in a register instead of
  re-loading it as a constant. One thread, znver3: 64x64 on 32x32 158 -> 122 us, 128x128 on
  16x16 140 -> 111 us, 256x256 on 8x8 135 -> 112 us, 512x512 on 4x4 146 -> 118 us.
* Padding taps read zero words and so count ``popcount(w)`` instead of 0; the epilogue subtracts
  the popcount of those taps' weights, from per-block tables ``PC[r, kh, kw]`` (per tap) and
  ``PCK[r, kw]`` (per column) and a per-(block, row) ``RC``. Pixel vectors whose taps are all
  inside the image horizontally (most of them) skip the per-column selects: one subtract and
  shift per output. The threshold is ``sign(TS)·acc >= TH`` with one multiply.
* Two epilogue variants the CPU fusion passes (``backends/cpu/fusions.py``) pick from the graph: a
  threshold layer feeding only binary layers writes their **packed input** directly (one byte =
  the 8 channels of a block, ``packed=True``; it replaces the float +-1 output and the packing
  kernel), and an affine layer whose only use is ``hardtanh(conv + residual)`` adds the
  **residual** and clamps in its epilogue (``clip=(lo, hi)``; replaces an add and a clip kernel);
  with both, that output is written as floats (the next block's residual) and, once each output
  row is done, its signs packed (the next block's binary input; replaces the packing kernel).
* One parallel region per call (a TVM launch point): per batch row the tasks build the im2col
  together (split over padded rows), meet at a barrier, take output-channel blocks (each builds
  its tables once, rows inside) and meet again; a kernel with one block or one padded row keeps
  the plain parallel loop. At 2 threads nothing runs serially. The epilogue is vectorized over
  the pixels (scalar with a bounds test when the width is not a multiple of ``VL``).
"""

from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

from bitcompiler.kernels._common import as_i32, divisors, largest_divisor
from bitcompiler.kernels.conv_pm1 import (
    bits_byte,
    clipped,
    packs_output,
    packs_residual,
    pm1_conv_func,
    thr_hit,
)
from bitcompiler.kernels.spec import ConvSpec
from bitcompiler.kernels.template import Knob, Template, generated

F32 = "float32"


def _lanes(spec: ConvSpec) -> int:
    """Output pixels per 256-bit vector: 4 int64 lanes (an even count of 32-bit words a tap) or 8
    int32 lanes."""
    return 4 if spec.words_per_group % 2 == 0 else 8


def _input_rows(spec: ConvSpec) -> int:
    """The input rows a batch row's whole output map reads (padding included)."""
    return (spec.out_h - 1) * spec.stride[0] + (spec.kernel[0] - 1) * spec.dilation[0] + 1


def binary_pm1_func(
    spec: ConvSpec,
    byte_lanes: bool = False,
    packed: bool = False,
    clip: tuple[float, float] | None = None,
    popcnt512: bool = False,
    block: int | None = None,
    region: bool | None = None,
) -> tirx.PrimFunc:
    """Register-blocked act="binary", code="pm1" conv for the host CPU (see the module docstring);
    ``byte_lanes`` (AVX2) sums the popcounts in uint8 lanes where the shape allows. ``packed``
    (threshold layers, :func:`packs_output`) writes ``Y int32 (M, OH, OW, 1, O/32)`` in the layout
    :func:`bitcompiler.kernels.pack_sign_nchw` gives (groups 1) instead of +-1 floats. ``clip =
    (lo, hi)`` (affine layers) takes a residual ``RES f32 (M, O, OH, OW)`` before ``Y`` and writes
    ``Y = hardtanh(epilogue + RES, lo, hi)``: a ResNet block's add and activation in the epilogue;
    with ``packed`` too (:func:`packs_residual`) a second output ``YP int32 (M, OH, OW, 1, O/32)``
    after ``Y`` holds Y's signs packed as :func:`bitcompiler.kernels.pack_sign_nchw` packs them.
    ``block`` (output channels per register block) and ``region`` (one parallel region with
    barriers, where the shape has more than one channel block and padded row) override the hand
    choices (:func:`binary_template`'s knobs)."""
    if clip is not None and spec.threshold:
        raise ValueError("a residual epilogue needs the float (non-threshold) output")
    if clip is not None and packed and not packs_residual(spec):
        raise ValueError("a packed residual output needs a binary pm1 affine conv with 32k output channels")
    if clip is None and packed and not packs_output(spec):
        raise ValueError("a packed output needs a binary pm1 threshold conv with 32k output channels")
    signs = packed and clip is not None  # Y and its packed signs
    packed = packed and clip is None
    O, H, W = spec.out_channels, spec.in_h, spec.in_w
    (KH, KW), (SH, SW), (PH, PW), (DH, DW) = spec.kernel, spec.stride, spec.padding, spec.dilation
    G, CG, OG, CWG = spec.groups, spec.cg, spec.og, spec.words_per_group
    OH, OW = spec.out_h, spec.out_w
    wide = CWG % 2 == 0
    WT = "int64" if wide else "int32"
    CV = CWG // 2 if wide else CWG
    VL = _lanes(spec)  # output pixels per vector
    if popcnt512 and spec.out_w >= 2 * VL:
        VL *= 2  # 512-bit vectors: vpopcntq / vpopcntd on 8 / 16 pixels
    NV = (OW + VL - 1) // VL
    OWP = max(OW, VL)  # im2col columns: the last vector overlaps the one before when VL does not divide OW
    HP = _input_rows(spec)
    OB = block or largest_divisor(OG, (8, 4, 2))  # output channels per register block
    if OG % OB or ((packed or signs) and OB != 8):
        raise ValueError(
            f"block must divide the {OG} output channels of a group (8 for a packed output), got {OB}"
        )
    NOB = O // OB
    # one launch for the im2col and the channel blocks, unless a loop has one iteration: TVM drops
    # such a loop, and its body would then run on every task of the region
    region = (NOB > 1 and HP > 1) if region is None else region and NOB > 1 and HP > 1
    ZERO = tirx.const(0, WT)
    I32, U8 = "int32", "uint8"
    STEPS = KH * KW * CV
    CH = max(c for c in range(1, min(STEPS, 31) + 1) if STEPS % c == 0)  # steps per uint8 chunk
    byte_lanes = byte_lanes and not popcnt512 and wide and DH == 1 and CH >= 4
    NIB = tirx.const(0x0F0F0F0F0F0F0F0F, "int64")

    def px(v):
        # first output pixel of vector v: the last vector ends at the row's end (it recomputes a few
        # pixels of the one before) so that every vector stores whole, unless the row is shorter
        return tirx.min(v * VL, OW - VL) if OW >= VL and OW % VL else v * VL

    def row_ok(oh, kh):
        ih = oh * SH - PH + kh * DH
        return tirx.all(ih >= 0, ih < H)

    def col_ok(ow, kw):
        iw = ow * SW - PW + kw * DW
        return tirx.all(iw >= 0, iw < W)

    def n_rows(oh):
        return sum(tirx.Select(row_ok(oh, k), 1, 0) for k in range(KH))

    def acc_value(S, RC, PCK, r, l, oh, ow):
        # sum over valid taps of popcount(a ^ w) = S - (popcount of the weights on padding taps)
        nw = sum(tirx.Select(col_ok(ow, b), 1, 0) for b in range(KW))
        corr = sum(tirx.Select(col_ok(ow, b), RC[r, b], PCK[r, b]) for b in range(KW))
        return (n_rows(oh) * nw) * CG - 2 * (as_i32(S[r, l]) - corr)

    def packed_byte(TS, TH, accs, o0):
        # the threshold outputs of channels o0 .. o0 + 7 (accumulators ``accs``) as the bits of one
        # byte (1 = +1), i.e. exactly what pack_sign_nchw makes of them
        return bits_byte([thr_hit(TS, TH, a, o0 + r) for r, a in enumerate(accs)])

    def interior(v):
        # all VL pixels of vector v are real outputs whose KW taps all lie inside the image
        first, last = px(v), px(v) + (VL - 1)
        return tirx.all(first * SW - PW >= 0, last * SW - PW + (KW - 1) * DW < W, last < OW)

    def acc_inner(S, RC, r, l, oh):
        # acc_value where every column is valid: a vector subtract and shift per output
        return (n_rows(oh) * KW) * CG - 2 * (as_i32(S[r, l]) - sum(RC[r, b] for b in range(KW)))

    @T.macro
    def reduce_words(XK, PV, S, o0, row0, p0):
        # S[r, l] += popcount(x ^ w) in WT lanes, one lane per output pixel
        for a, b, w in T.grid(T.int64(KH), T.int64(KW), T.int64(CV)):
            for r in T.unroll(T.int64(OB)):
                for l in T.vectorized(T.int64(VL)):
                    S[r, l] = S[r, l] + T.popcount(
                        XK[o0 // OG, row0 + a * DH, b, w, p0 + l] ^ PV[o0 + r, a, b, w]
                    )

    def tap_count(PV, o, a, b):
        # the popcount of the weights of one tap as one sum of scalar popcounts, the block's
        # channels unrolled: as loops, LLVM vectorized them over the channels with gathers and
        # scatters (AVX-512, one thread: 512x512 on 4x4 56 -> 46 us a call, 256x256 on 14x14
        # 132 -> 130 us)
        return sum(
            (T.Cast(I32, T.popcount(PV[o, a, b, w])) for w in range(1, CV)),
            T.Cast(I32, T.popcount(PV[o, a, b, 0])),
        )

    @T.macro
    def block_tables(PV, WN, PC, PCK, o0):
        # per block of OB output channels: PC[r, kh, kw] = popcount of the weights of one tap,
        # PCK[r, kw] = the same summed over kh (for the padding correction), and with byte lanes
        # WN[r, 0 | 1, s] = the low | high nibbles of weight word s
        PF = T.decl_buffer((T.int64(O), T.int64(STEPS)), WT, data=PV.data)
        for r in T.unroll(T.int64(OB)):
            if byte_lanes:
                for j in T.vectorized(T.int64(STEPS)):
                    WN[r, 0, j] = PF[o0 + r, j] & NIB
                    WN[r, 1, j] = (PF[o0 + r, j] >> T.int64(4)) & NIB
            for a, b in T.grid(T.int64(KH), T.int64(KW)):
                PC[r, a, b] = tap_count(PV, o0 + r, a, b)
            for b in range(T.int64(KW)):
                PCK[r, b] = 0
                for a in range(T.int64(KH)):
                    PCK[r, b] = PCK[r, b] + PC[r, a, b]

    def lut_shuffle(lut, idx):
        return T.call_llvm_pure_intrin(
            "uint8x32", "llvm.x86.avx2.pshuf.b", lut, T.reinterpret("uint8x32", idx)
        )

    @T.macro
    def reduce_bytes(XK, WN, LUT, S, o0, row0, p0):
        # the (kh, kw, word) steps are one flat index (dilation 1). popcount(x ^ w) is the table
        # lookup of x's low nibbles ^ w's plus that of the high nibbles: x's nibbles are split once
        # per step for all OB channels, w's once per block (WN). The byte counts are summed in
        # uint8 lanes for CH steps (at most 8 per byte per step: exact), then widened with one
        # vpsadbw per chunk.
        XF = T.decl_buffer((T.int64(G), T.int64(HP * KW * CV), T.int64(OWP)), WT, data=XK.data)
        S8 = T.alloc_buffer((T.int64(OB), T.int64(32)), U8, scope="global")
        for c in range(T.int64(STEPS // CH)):
            for r in T.unroll(T.int64(OB)):
                S8[r, T.ramp(0, 1, 32)] = T.Broadcast(T.uint8(0), 32)
            for j in range(T.int64(CH)):
                x = T.bind(XF[o0 // OG, row0 * (KW * CV) + c * CH + j, T.ramp(p0, 1, 4)])
                xl = T.bind(x & T.Broadcast(NIB, 4))
                xh = T.bind((x >> T.Broadcast(T.int64(4), 4)) & T.Broadcast(NIB, 4))
                for r in T.unroll(T.int64(OB)):
                    S8[r, T.ramp(0, 1, 32)] = (
                        S8[r, T.ramp(0, 1, 32)]
                        + lut_shuffle(LUT[T.ramp(0, 1, 32)], xl ^ T.Broadcast(WN[r, 0, c * CH + j], 4))
                        + lut_shuffle(LUT[T.ramp(0, 1, 32)], xh ^ T.Broadcast(WN[r, 1, c * CH + j], 4))
                    )
            for r in T.unroll(T.int64(OB)):
                S[r, T.ramp(0, 1, 4)] = S[r, T.ramp(0, 1, 4)] + T.call_llvm_pure_intrin(
                    "int64x4", "llvm.x86.avx2.psad.bw", S8[r, T.ramp(0, 1, 32)], T.Broadcast(T.uint8(0), 32)
                )

    def make(out_value, E0, E1):
        def acc_at(S, RC, PCK, t, v, r, l, inner):
            # output row t % OH, pixel px(v) + l, channel r of the block: the short form when the
            # whole vector is interior
            if inner:
                return acc_inner(S, RC, r, l, t % OH)
            return acc_value(S, RC, PCK, r, l, t % OH, px(v) + l)

        def y_at(E0, E1, S, RC, PCK, RES, m, t, v, r, l, inner):
            o = t // OH * OB + r
            value = out_value(E0, E1, acc_at(S, RC, PCK, t, v, r, l, inner), o)
            return clipped(value, RES, (m, o, t % OH, px(v) + l), clip)

        def byte_at(E0, E1, S, RC, PCK, t, v, l, inner):
            return packed_byte(
                E0, E1, [acc_at(S, RC, PCK, t, v, r, l, inner) for r in range(OB)], t // OH * OB
            )

        def sign_byte(Y, m, t, x):
            # the signs (1 = y >= 0) of the OB = 8 channels of block t // OH at one pixel as the bits
            # of one byte, as pack_sign_nchw packs them
            return bits_byte([Y[m, t // OH * OB + r, t % OH, x] >= tirx.const(0.0, F32) for r in range(OB)])

        @T.macro
        def sign_bytes(Y, YP, M, m, t):
            # the packed signs of the output row just written to Y, 8 pixels a step (one 256-bit
            # compare per channel), the rest of the row one pixel a step
            YS = T.decl_buffer((M, T.int64(OH), T.int64(OW), T.int64(O // 8)), U8, data=YP.data)
            for j in range(T.int64(OW // 8)):
                for l in T.vectorized(T.int64(8)):
                    YS[m, t % OH, j * 8 + l, t // OH] = sign_byte(Y, m, t, j * 8 + l)
            for l in range(T.int64(OW % 8)):
                YS[m, t % OH, OW // 8 * 8 + l, t // OH] = sign_byte(Y, m, t, OW // 8 * 8 + l)

        @T.macro
        def im2col_row(XV, XK, m, r):
            # row r of the width-im2col of the padded activations: XK[g, r, kw, word, ow]
            for g, b, w, l in T.grid(T.int64(G), T.int64(KW), T.int64(CV), T.int64(OWP)):
                XK[g, r, b, w, l] = T.if_then_else(
                    r >= PH
                    and r < PH + H
                    and l < OW
                    and l * SW - PW + b * DW >= 0
                    and l * SW - PW + b * DW < W,
                    XV[m, r - PH, l * SW - PW + b * DW, g, w],
                    ZERO,
                )

        @T.macro
        def block(XK, PV, LUT, Y, M, RES, YP, m, ob):
            # output channels ob * OB .. ob * OB + OB - 1 of batch row m, all rows and pixels
            WN = T.alloc_buffer(
                (T.int64(OB), T.int64(2), T.int64(STEPS if byte_lanes else 1)),
                WT,
                scope="global",
            )
            PC = T.alloc_buffer((T.int64(OB), T.int64(KH), T.int64(KW)), I32, scope="global")
            PCK = T.alloc_buffer((T.int64(OB), T.int64(KW)), I32, scope="global")
            block_tables(PV, WN, PC, PCK, ob * OB)
            for t in range(ob * OH, ob * OH + OH):
                RC = T.alloc_buffer((T.int64(OB), T.int64(KW)), I32, scope="global")
                for r, b in T.grid(T.int64(OB), T.int64(KW)):
                    RC[r, b] = 0
                    for a in range(T.int64(KH)):
                        RC[r, b] = RC[r, b] + T.Select(row_ok(t % OH, a), 0, PC[r, a, b])
                for v in range(T.int64(NV)):
                    S = T.alloc_buffer((T.int64(OB), T.int64(VL)), WT, scope="global")
                    for r in T.unroll(T.int64(OB)):
                        for l in T.vectorized(T.int64(VL)):
                            S[r, l] = ZERO
                    if byte_lanes:
                        reduce_bytes(XK, WN, LUT, S, t // OH * OB, t % OH * SH, px(v))
                    else:
                        reduce_words(XK, PV, S, t // OH * OB, t % OH * SH, px(v))
                    if packed:
                        # one byte per pixel: the OB = 8 channels' +-1 as bits (bit r = channel o0 + r)
                        YB = T.decl_buffer((M, T.int64(OH), T.int64(OW), T.int64(O // 8)), U8, data=Y.data)
                        if interior(v):
                            for l in T.vectorized(T.int64(VL)):
                                YB[m, t % OH, px(v) + l, t // OH] = byte_at(E0, E1, S, RC, PCK, t, v, l, True)
                        elif OWP == OW:
                            for l in T.vectorized(T.int64(VL)):
                                YB[m, t % OH, px(v) + l, t // OH] = byte_at(
                                    E0, E1, S, RC, PCK, t, v, l, False
                                )
                        else:
                            for l in range(T.int64(VL)):
                                if px(v) + l < OW:
                                    YB[m, t % OH, px(v) + l, t // OH] = byte_at(
                                        E0, E1, S, RC, PCK, t, v, l, False
                                    )
                    elif interior(v):
                        # every tap of these VL pixels is inside the image horizontally
                        for r in T.unroll(T.int64(OB)):
                            for l in T.vectorized(T.int64(VL)):
                                Y[m, t // OH * OB + r, t % OH, px(v) + l] = y_at(
                                    E0, E1, S, RC, PCK, RES, m, t, v, r, l, True
                                )
                    elif OWP == OW:
                        for r in T.unroll(T.int64(OB)):
                            for l in T.vectorized(T.int64(VL)):
                                Y[m, t // OH * OB + r, t % OH, px(v) + l] = y_at(
                                    E0, E1, S, RC, PCK, RES, m, t, v, r, l, False
                                )
                    else:
                        for r, l in T.grid(T.int64(OB), T.int64(VL)):
                            if px(v) + l < OW:
                                Y[m, t // OH * OB + r, t % OH, px(v) + l] = y_at(
                                    E0, E1, S, RC, PCK, RES, m, t, v, r, l, False
                                )
                if signs:
                    sign_bytes(Y, YP, M, m, t)

        @T.macro
        def body(XP, P, Y, M, RES, YP):
            XV = T.decl_buffer((M, T.int64(H), T.int64(W), T.int64(G), T.int64(CV)), WT, data=XP.data)
            PV = T.decl_buffer((T.int64(O), T.int64(KH), T.int64(KW), T.int64(CV)), WT, data=P.data)
            # the nibble popcount table, written here and read in the parallel body (a separate
            # function): LLVM keeps it in a register there instead of reloading it as a constant
            LUT = T.alloc_buffer((T.int64(32),), U8)
            for i in range(T.int64(32)):
                LUT[i] = T.Cast(U8, T.popcount(i % 16))
            XK = T.alloc_buffer((T.int64(G), T.int64(HP), T.int64(KW), T.int64(CV), T.int64(OWP)), WT)
            if region:
                # one parallel region for the whole call (a TVM launch point): per batch row the
                # tasks build XK together (split over padded rows), wait at a barrier, compute their
                # output-channel blocks and wait again before the next row overwrites XK (which is
                # allocated outside the region, so all tasks share it)
                with T.attr(0, "pragma_parallel_launch_point", 1):
                    for m in range(M):
                        with T.attr(0, "pragma_parallel_barrier_when_finish", 1):
                            for r in T.parallel(T.int64(HP)):
                                im2col_row(XV, XK, m, r)
                        with T.attr(0, "pragma_parallel_barrier_when_finish", 1):
                            for ob in T.parallel(T.int64(NOB)):
                                block(XK, PV, LUT, Y, M, RES, YP, m, ob)
            else:
                for m in range(M):
                    for r in range(T.int64(HP)):
                        im2col_row(XV, XK, m, r)
                    for ob in T.parallel(T.int64(NOB)):
                        block(XK, PV, LUT, Y, M, RES, YP, m, ob)

        return body

    return pm1_conv_func(spec, make, packed, clip, signs)


def binary_template(
    spec: ConvSpec,
    byte_lanes: bool = False,
    packed: bool = False,
    clip: tuple[float, float] | None = None,
    popcnt512: bool = False,
) -> Template:
    """:func:`binary_pm1_func` as a tuning template (:func:`bitcompiler.kernels.template.generated`):
    its choices are the output channels per register block (``block``: 8, 4 or 2 dividing a
    group's; 8 for a packed output), one parallel region with barriers or a parallel loop per
    stage (``region``), and, where the CPU has ``vpopcntq``, 512- or 256-bit vectors of pixels
    (``lanes512``). The hand schedule is the function's defaults."""
    blocks = (8,) if packed else tuple(divisors(spec.og, (8, 4, 2)))
    lanes512 = (1, 0) if popcnt512 and spec.out_w >= 2 * _lanes(spec) else (int(popcnt512),)
    rows = _input_rows(spec)
    knobs = [
        Knob("block", blocks, blocks[0]),
        Knob("region", (1, 0) if rows > 1 else (0,), int(rows > 1)),
        Knob("lanes512", lanes512, lanes512[0]),
    ]

    def build(block: int, region: int, lanes512: int) -> tirx.PrimFunc:
        return binary_pm1_func(spec, byte_lanes, packed, clip, bool(lanes512), block, bool(region))

    def key(block: int, region: int, lanes512: int) -> tuple:
        return block, bool(region) and spec.out_channels > block, lanes512  # (one block: no region)

    return generated("conv-binary", knobs, build, key)
