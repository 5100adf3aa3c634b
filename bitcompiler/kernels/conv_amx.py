"""W1A1 conv (``act="binary"``, pm1 weights, groups 1) as an int8 matrix product on Intel AMX tiles.

For x86 CPUs with AMX (``amx-tile``, ``amx-int8``: Sapphire Rapids and later) where the process
got the tile state (:mod:`bitcompiler.amx`, :func:`~bitcompiler.kernels.amx_tiles.amx_target`); :func:`bitcompiler.kernels.conv2d_kernel`
picks it over :mod:`bitcompiler.kernels.conv_vpop` where :func:`fits` holds. Same buffers, layout
and numbers as that kernel.

A +-1 x +-1 product is a signed byte product, so the layer is ``C (O, P) = W (O, K) X (K, P)``
with every sign bit expanded to one byte (a 1 bit to -1, a 0 bit to +1), and ``tdpbssd`` sums
16 x 16 x 64 of them per instruction. A tap outside the image is zero bytes: it adds nothing, so
``C`` is the layer's integer dot product itself, with no border correction.

* **Expansion** of each sign word to 64 bytes: :func:`bitcompiler.kernels.amx_tiles.expand`.
* **Weights** (the ``A`` tiles, 16 output channels x 64 bytes of one reduction word): each
  channel's words expanded in place, once per call.
* **Input** (the ``B`` tiles, ``tdpbssd``'s layout ``[k / 4][pixel][4 bytes]``): the map with its
  zero border, expanded once per call and stored transposed: per map row and word, row ``q`` holds
  bytes ``4q .. 4q + 3`` of every pixel side by side (16 pixels' expanded words transposed in
  registers: four rounds of two-source shuffles). For a stride-1 row of output pixels the ``B``
  tile of tap ``(kh, kw)`` is then a plain strided tile load at the window's first pixel: no
  im2col. A tile holds :func:`row_tile` pixels of one output row: the largest divisor of ``OW``
  up to 16 (14 on 28- and 56-pixel rows: 64->64 3x3 on 56x56 111 us against 182 for
  ``conv_vpop``, 128->128 on 28x28 90 against 136).
* **The im2col form** (:func:`by_im2col`: small maps, strides along the width, rows no tile of 8
  to 16 pixels divides): a ``B`` tile is 16 flat output pixels' window words, built per pair of
  pixel tiles (expanded, transposed, zero outside the image) and used by every channel pair;
  the weights are expanded one word ahead of their tile loads (as the AMX dense branch does)
  instead of all at once, and the work splits by pixel-tile pairs whatever the output (a
  tile's 16 pixels of a float plane are one cache line). 256->256 3x3 on 8x8 26-28 us against
  34-36; 64->128 3x3 stride 2 from 32x32 19-20 against 23-24; 512->512 on 7x7 109-112 against
  126-130. On 4x4 maps it lost (43-50 against 37: each expanded weight serves one tile), hence
  :data:`MIN_IM2COL_PIXELS`; with 64 output channels too (the im2col serves few channel pairs).
* **Register blocking**: two channel tiles x two pixel tiles in the four accumulator tiles; the
  accumulators go to a small buffer and the epilogue (``conv_vpop``'s: threshold, the next
  layer's packed input, affine, residual plus clip, its signs) reads them per channel, the
  tile's pixels as one vector (the last pair of an odd count repeats its first tile and
  writes nothing for it).
* **Threads**: one parallel loop whose tasks share nothing: each expands the map of the batch
  rows it takes and the weights it uses itself. A float output (threshold, affine, residual) is
  split into ``cores`` chunks of channel-tile pairs, each expanding only its own channels'
  weights and writing planes of its own. A packed output (the next layer's input, the
  residual's signs) is split into ``cores`` chunks of all batch rows' pixel-tile pairs, each
  expanding all the weights: every pixel's packed bytes hold all its channels, so a channel
  split would have both cores write every cache line of them. Each task loads the tile
  configuration (``ldtilecfg``) and releases the tiles itself.

On a 2-core Xeon VM (one thread, the kernel alone, alternating with ``conv_vpop``'s in one
process, every epilogue): 256->256 3x3 on 14x14 85-100 us against 105-112 us (116 against 115
with the residual's signs: its pixel split expands all the weights once per task); 64->64 on 32x32
28-39 us against 52-62; 128->128 on 16x16 30-42 us against 42-46. On 8x8 maps the row form lost
(49-66 against 36-39 us: all the weights expanded for 64 pixels), hence :data:`MIN_PIXELS`.
Binary ResNet-18 (CIFAR), whole call: 1.13x faster at one thread, 1.03-1.07x at two; the im2col
form took its 8x8 and stride-2 layers 30-40 us lower, the whole call 1-2% (the other kernels and
the calls between them ran slower beside more AMX work, in one process).
"""

from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

from bitcompiler.kernels.amx_tiles import (
    LANES,
    expand,
    product_2x2,
    store_accumulators,
    tile_config,
    tile_op,
    transpose16,
    zero_accumulators,
)
from bitcompiler.kernels.conv_pm1 import bits_byte, clipped, pm1_conv_func, thr_hit
from bitcompiler.kernels.spec import ConvSpec

F32, I32, I64, U8 = "float32", "int32", "int64", "uint8"
TILE = 16  # rows of a tile: output channels (A, C) or reduction quads (B)
MIN_CHANNELS = 64
MIN_PIXELS = 128
MIN_IM2COL_WORDS = 9  # the im2col form: words of a reduction,
MIN_IM2COL_CHANNELS = 128  # output channels (each pixel pair's im2col serves them all)
MIN_IM2COL_PIXELS = 32  # and output pixels from which it pays


def fits(spec: ConvSpec) -> bool:
    """Binary pm1 weights and activations, groups 1, input channels in whole 64-bit words (no
    padding bits: a 0 bit would count as +1), output channels in pairs of tiles and
    :data:`MIN_CHANNELS` or more, and :func:`by_rows` or :func:`by_im2col` holds."""
    return (
        spec.act == "binary"
        and spec.code == "pm1"
        and spec.groups == 1
        and spec.cg % 64 == 0
        and spec.out_channels % (2 * TILE) == 0
        and spec.out_channels >= MIN_CHANNELS
        and (by_rows(spec) or by_im2col(spec))
    )


def row_tile(ow: int) -> int:
    """Output pixels of one row a tile holds in the row form: the largest divisor of ``ow`` up to 16."""
    return max(d for d in range(1, min(ow, TILE) + 1) if ow % d == 0)


def by_rows(spec: ConvSpec) -> bool:
    """The B tiles as strided loads of the transposed map: stride 1 along the width,
    :data:`MIN_PIXELS` output pixels or more, output rows cut in tiles of 8 to 16 pixels (or a row
    of fewer: :func:`row_tile`)."""
    nw = row_tile(spec.out_w)
    return (
        spec.out_h * spec.out_w >= MIN_PIXELS
        and spec.stride[1] == 1
        and (nw >= TILE // 2 or nw == spec.out_w)
    )


def by_im2col(spec: ConvSpec) -> bool:
    """The B tiles from an im2col of 16 output pixels at a time (any stride, any map): where
    :func:`by_rows` does not hold, with :data:`MIN_IM2COL_WORDS` words of reduction,
    :data:`MIN_IM2COL_CHANNELS` output channels and :data:`MIN_IM2COL_PIXELS` output pixels."""
    return (
        not by_rows(spec)
        and spec.kernel[0] * spec.kernel[1] * spec.cg // 64 >= MIN_IM2COL_WORDS
        and spec.out_channels >= MIN_IM2COL_CHANNELS
        and spec.out_h * spec.out_w >= MIN_IM2COL_PIXELS
    )


def amx_conv_func(
    spec: ConvSpec,
    packed: bool = False,
    clip: tuple[float, float] | None = None,
    cores: int = 2,
) -> tirx.PrimFunc:
    """The kernel for ``spec`` (:func:`fits`); arguments as
    :func:`bitcompiler.kernels.conv_vpop.vpop_conv_func`. ``cores``: how many tasks split the work
    (chunks of channel-tile pairs for a float output, of pixel-tile pairs for a packed one; of
    pixel-tile pairs for any output in the im2col form)."""
    if not fits(spec):
        raise ValueError(f"the AMX conv does not fit {spec}")
    signs = packed and clip is not None
    packed = packed and clip is None
    O, H, W = spec.out_channels, spec.in_h, spec.in_w
    (KH, KW), (SH, _), (PH, PW), (DH, DW) = spec.kernel, spec.stride, spec.padding, spec.dilation
    CV, OH, OW = spec.words_per_group // 2, spec.out_h, spec.out_w
    NT, NP = KH * KW, OH * OW
    flat = by_im2col(spec)  # B tiles from an im2col of 16 flat output pixels (else map rows)
    NW = TILE if flat else row_tile(OW)  # output pixels a tile holds: its columns
    NWT = 1 if flat else OW // NW  # tiles per output row
    HP = H + 2 * PH
    WP = -(-(W + 2 * PW) // TILE) * TILE  # the zero-bordered map, rows in whole 16-pixel chunks
    KT = NT * CV  # 64-bit words (64-byte tile columns) of the reduction
    NOT = O // TILE  # channel tiles
    NU = -(-NP // TILE) if flat else OH * NWT  # pixel tiles a batch row
    NUP = -(-NU // 2)  # pairs of them
    by_channels = not (packed or signs)
    NCC = max(1, min(cores, NOT // 2))  # tasks of a float output: chunks of channel-tile pairs
    NCP = max(1, cores)  # tasks of a packed output: chunks of all batch rows' pixel-tile pairs
    NA = 2 * -(-(NOT // 2) // NCC) if by_channels else NOT  # channel tiles a task expands
    lanes16 = T.ramp(T.int64(0), T.int64(1), 16)
    zero16 = tirx.Broadcast(tirx.const(0, I32), 16)

    def make(out_value, E0, E1):
        def y_at(C, RF, m, o, p, c, r, l):
            return clipped(out_value(E0, E1, C[c, r, l], o), RF, (m, o, p), clip)

        def sign_bytes(YF, m, o0, p):
            return bits_byte([YF[m, o0 + r, p] >= tirx.const(0.0, F32) for r in range(8)])

        def map_word(XV, m, hp, col, w):
            # word w of the zero-bordered map's pixel (hp, col), expanded (zeros on the border)
            inside = tirx.all(hp >= PH, hp < PH + H, col >= PW, col < PW + W)
            ih, iw = T.min(T.max(hp - PH, 0), H - 1), T.min(T.max(col - PW, 0), W - 1)
            return tirx.Select(inside, expand(XV[m, ih, iw, w]), zero16)

        def pixel_word(XV, m, pf, kt):
            # word kt (tap t, word w) of the window of flat output pixel pf, expanded (zeros outside)
            t, w = kt // CV, kt % CV
            ih = pf // OW * SH - PH + t // KW * DH
            iw = pf % OW * spec.stride[1] - PW + t % KW * DW
            inside = tirx.all(pf < NP, ih >= 0, ih < H, iw >= 0, iw < W)
            cih, ciw = T.min(T.max(ih, 0), H - 1), T.min(T.max(iw, 0), W - 1)
            return tirx.Select(inside, expand(XV[m, cih, ciw, w]), zero16)

        def b_tile(XT, u, t, w):
            # the B tile of pixel tile u (clamped to the last), tap t, word w: a strided load
            u = T.min(u, NU - 1)
            return T.address_of(XT[u // NWT * SH + t // KW * DH, w, 0, u % NWT * NW + t % KW * DW])

        # tiles 0-3 (C) and 6-7 (B): 16 rows x NW pixels; 4-5 (A): 16 x 64 bytes
        config = tile_config([4 * NW] * 4 + [64, 64] + [4 * NW] * 2)

        @T.macro
        def map_row(XV, XT, V, m, hp):
            # row hp of the zero-bordered map, each word's 16 int32 of every pixel transposed into
            # XT[hp, w, q, :] (dword q of each pixel: a B tile's row q, pixels side by side)
            for w, c in T.grid(T.int64(CV), T.int64(WP // TILE)):
                for p in T.unroll(8):
                    V[0, p, LANES] = map_word(XV, m, hp, c * TILE + p, w)
                    V[1, p, LANES] = map_word(XV, m, hp, c * TILE + p + 8, w)
                transpose16(V)
                for q in T.unroll(8):
                    XT[hp, w, q, T.ramp(c * TILE, T.int64(1), 16)] = V[0, q, LANES]
                    XT[hp, w, q + 8, T.ramp(c * TILE, T.int64(1), 16)] = V[1, q, LANES]

        @T.macro
        def im2col_pair(XV, XT, V, m, up):
            # pixel tiles 2 up, 2 up + 1 of batch row m (the second clamped to the last): word kt of
            # 16 flat output pixels' windows, transposed into XT[s, kt, q, :] (a B tile)
            for s, kt in T.grid(2, T.int64(KT)):
                for p in T.unroll(8):
                    V[0, p, LANES] = pixel_word(XV, m, T.min(up * 2 + s, NU - 1) * TILE + p, kt)
                    V[1, p, LANES] = pixel_word(XV, m, T.min(up * 2 + s, NU - 1) * TILE + p + 8, kt)
                transpose16(V)
                for q in T.unroll(8):
                    XT[s, kt, q, LANES] = V[0, q, LANES]
                    XT[s, kt, q + 8, LANES] = V[1, q, LANES]

        @T.macro
        def weights(PV, AW, op, kt):
            # word kt of channel tiles 2 op, 2 op + 1 expanded into AW[kt % 2]
            for a, r in T.grid(2, TILE):
                AW[kt % 2, a, r, LANES] = expand(PV[(op * 2 + a) * TILE + r, kt])

        @T.macro
        def outputs(C, Y, M, RES, YP, m, ot, p0, c, l):
            # channel tile ot x output pixel p0 + l from accumulator tile c (l: lanes or one)
            if packed:
                YB = T.decl_buffer((M, T.int64(NP), T.int64(O // 8)), U8, data=Y.data)
                for b in range(2):
                    YB[m, p0 + l, ot * 2 + b] = bits_byte(
                        [thr_hit(E0, E1, C[c, b * 8 + r, l], ot * TILE + b * 8 + r) for r in range(8)]
                    )
            else:
                YF = T.decl_buffer((M, T.int64(O), T.int64(NP)), F32, data=Y.data)
                RF = T.decl_buffer((M, T.int64(O), T.int64(NP)), F32, data=RES.data)
                for r in T.unroll(TILE):
                    YF[m, ot * TILE + r, p0 + l] = y_at(C, RF, m, ot * TILE + r, p0 + l, c, r, l)
                if signs:
                    YS = T.decl_buffer((M, T.int64(NP), T.int64(O // 8)), U8, data=YP.data)
                    for b in range(2):
                        YS[m, p0 + l, ot * 2 + b] = sign_bytes(YF, m, ot * TILE + b * 8, p0 + l)

        @T.macro
        def epilogue(C, Y, M, RES, YP, m, ot, u, c):
            if flat:
                if u * TILE + TILE <= NP:
                    for l in T.vectorized(TILE):
                        outputs(C, Y, M, RES, YP, m, ot, u * TILE, c, l)
                elif u < NU:  # the last tile, part of it
                    for l in range(TILE):
                        if u * TILE + l < NP:
                            outputs(C, Y, M, RES, YP, m, ot, u * TILE, c, l)
            elif u < NU:
                for l in T.vectorized(NW):
                    outputs(C, Y, M, RES, YP, m, ot, u // NWT * OW + u % NWT * NW, c, l)

        @T.macro
        def block(XT, AW, C, Y, M, RES, YP, m, up, op, a0):
            # channel tiles 2 op, 2 op + 1 (AW[a0], AW[a0 + 1]) x pixel tiles 2 up, 2 up + 1 of row m
            zero_accumulators()
            for t, w in T.grid(T.int64(NT), T.int64(CV)):
                product_2x2(
                    T.address_of(AW[a0, t * CV + w, 0, 0]),
                    T.address_of(AW[a0 + 1, t * CV + w, 0, 0]),
                    b_tile(XT, up * 2, t, w),
                    b_tile(XT, up * 2 + 1, t, w),
                    T.int64(4 * WP),
                )
            store_accumulators(C, T.int64(4 * NW))
            for c in range(4):
                epilogue(C, Y, M, RES, YP, m, op * 2 + c // 2, up * 2 + c % 2, c)

        @T.macro
        def block_im2col(XT, PV, AW, C, Y, M, RES, YP, m, up, op):
            # channel tiles 2 op, 2 op + 1 x pixel tiles 2 up, 2 up + 1 (XT[0], XT[1]) of row m
            zero_accumulators()
            weights(PV, AW, op, T.int64(0))
            for kt in range(T.int64(KT)):
                if kt + 1 < KT:  # the next word's, while this word's tiles load
                    weights(PV, AW, op, kt + 1)
                product_2x2(
                    T.address_of(AW[kt % 2, 0, 0, 0]),
                    T.address_of(AW[kt % 2, 1, 0, 0]),
                    T.address_of(XT[0, kt, 0, 0]),
                    T.address_of(XT[1, kt, 0, 0]),
                    T.int64(64),
                )
            store_accumulators(C, T.int64(64))
            for c in range(4):
                epilogue(C, Y, M, RES, YP, m, op * 2 + c // 2, up * 2 + c % 2, c)

        @T.macro
        def body_im2col(XV, PV, Y, M, RES, YP):
            # tasks that share nothing, each a chunk of all batch rows' pixel-tile pairs, whatever
            # the output: a pair's im2col is built once for every channel pair, the weights are
            # expanded a word ahead of their loads anyway, and a tile's 16 pixels of a channel's
            # float plane are one cache line
            for i in T.parallel(T.int64(NCP)):
                XT = T.alloc_buffer((2, T.int64(KT), T.int64(TILE), T.int64(16)), I32)
                AW = T.alloc_buffer((2, 2, TILE, 16), I32)
                CFG = T.alloc_buffer((64,), U8)
                C = T.alloc_buffer((4, TILE, TILE), I32)
                V = T.alloc_buffer((4, 8, 16), I32)  # transposes' rows
                config(CFG)
                per = (M * NUP + NCP - 1) // NCP  # pixel-tile pairs a task
                for k in range(per):
                    if i * per + k < M * NUP:
                        im2col_pair(XV, XT, V, (i * per + k) // NUP, (i * per + k) % NUP)
                        for op in range(T.int64(NOT // 2)):
                            block_im2col(
                                XT, PV, AW, C, Y, M, RES, YP, (i * per + k) // NUP, (i * per + k) % NUP, op
                            )
                T.evaluate(tile_op("tilerelease"))

        @T.macro
        def body_rows(XV, PV, Y, M, RES, YP):
            # one launch, tasks that share nothing: each expands the map of the batch rows it
            # takes (the B tiles, transposed) and the weights it uses (the A tiles) itself. A
            # float output (planes per channel) splits by chunks of channel-tile pairs; a packed
            # output (every pixel's bytes hold all its channels: a channel split would have both
            # cores write every cache line) by chunks of pixel-tile pairs
            for i in T.parallel(T.int64(NCC) if by_channels else T.int64(NCP)):
                XT = T.alloc_buffer((T.int64(HP), T.int64(CV), T.int64(TILE), T.int64(WP)), I32)
                AW = T.alloc_buffer((T.int64(NA), T.int64(KT), T.int64(TILE), T.int64(16)), I32)
                CFG = T.alloc_buffer((64,), U8)
                C = T.alloc_buffer((4, TILE, NW), I32)
                V = T.alloc_buffer((4, 8, 16), I32)  # transposes' rows
                for a, kt, r in T.grid(T.int64(NA), T.int64(KT), T.int64(TILE)):
                    if not by_channels or i * NA + a < NOT:
                        AW[a, kt, r, lanes16] = expand(
                            PV[T.min((i * NA if by_channels else 0) + a, NOT - 1) * TILE + r, kt]
                        )
                config(CFG)
                if by_channels:
                    for m in range(M):
                        for hp in range(T.int64(HP)):
                            map_row(XV, XT, V, m, hp)
                        for up, j in T.grid(T.int64(NUP), T.int64(NA // 2)):
                            if i * (NA // 2) + j < NOT // 2:
                                block(XT, AW, C, Y, M, RES, YP, m, up, i * (NA // 2) + j, j * 2)
                else:
                    per = (M * NUP + NCP - 1) // NCP  # pixel-tile pairs a task
                    for k in range(per):
                        if i * per + k < M * NUP:
                            if k == 0 or (i * per + k) % NUP == 0:  # a batch row's first pair
                                for hp in range(T.int64(HP)):
                                    map_row(XV, XT, V, (i * per + k) // NUP, hp)
                            for op in range(T.int64(NOT // 2)):
                                block(
                                    XT,
                                    AW,
                                    C,
                                    Y,
                                    M,
                                    RES,
                                    YP,
                                    (i * per + k) // NUP,
                                    (i * per + k) % NUP,
                                    op,
                                    op * 2,
                                )
                T.evaluate(tile_op("tilerelease"))

        @T.macro
        def body(XP, P, Y, M, RES, YP):
            XV = T.decl_buffer((M, T.int64(H), T.int64(W), T.int64(CV)), I64, data=XP.data)
            PV = T.decl_buffer((T.int64(O), T.int64(KT)), I64, data=P.data)
            if flat:
                body_im2col(XV, PV, Y, M, RES, YP)
            else:
                body_rows(XV, PV, Y, M, RES, YP)

        return body

    return pm1_conv_func(spec, make, packed, clip, signs)
