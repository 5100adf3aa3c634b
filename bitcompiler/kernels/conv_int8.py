"""Integer convolution for int8 activations and k-bit unsigned codes (W2A8 and its kind) on x86.

``acc = sum_{c, kh, kw} x[c, ih, iw] * q[o, c, kh, kw]`` is computed in int32 with byte dot
products instead of float multiply-adds:

* the input, zero-padded, as ``XZ (M, C/4, HP, WP, 4) int8``: four neighbouring channels of a
  pixel are one 32-bit word, broadcast to every lane;
* the codes decoded once per call from the stored planes into ``WQ (O/VB, C/4, KH, KW, VB, 4)
  uint8``: ``VB`` output channels x four input channels, one 256-bit load per 8 channels;
* each step multiplies the broadcast word into the codes of 8 output channels and adds each
  lane's four products into its int32 sum: ``vpdpbusd`` where the CPU has AVX-512 VNNI (one
  instruction; a 512-bit one for a block of 16 channels; exact for 8-bit codes too, so the 8-bit
  first layers take it), else ``vpmaddubsw`` (u8 code x s8 activation, pairs summed in int16:
  exact, since ``2 * 128 * (2^B - 1) < 2^15`` for B <= 7) then ``vpmaddwd`` by ones and ``vpaddd``.
  An ImageNet stem (3 -> 64, 7x7, stride 2 at 224x224, 8-bit codes with an offset, one thread)
  took 2.5 ms on the decoded float conv and takes 0.8 ms here; the CIFAR stem (3x3 at 32x32)
  47 -> 28 us.
* where a stem's rows of outputs are whole vectors of 16 pixels at stride 1 (:func:`pixel_lanes`,
  512-bit VNNI), the lanes are pixels instead: 16 neighbouring words of the input row (16 pixels
  x four channels) times one output channel's four codes broadcast, so the epilogue takes whole
  vectors of one channel's pixels (:func:`_schedule_pixels`; the CIFAR stem 36 -> 18-21 us, the
  kernel alone, one thread).

A register block of ``VB`` output channels x ``RW`` pixels of one output row (a stack array under
1 KiB, which LLVM promotes to registers) stays in registers over the whole reduction, then the bit conv's own epilogue (``(SC s) acc + (OF s) sumx + BI`` or
the threshold) writes ``Y (M, O, OH, OW)``. Channels are zero-padded to multiples of 4 (input) and
``VB`` (output); a zero code or a zero activation adds nothing, so every sum is the reference's.
The window sums ``sumx`` of affine codes are a separate int32 pass: each word's four bytes summed,
then the window over those sums.

Threads: the dot products' tasks take output rows (every channel block of a row), so that the rows
a thread writes are the pixels it packs and reads in the binary conv after a stem (which splits
its pixels the same way). The input copy, the decoded codes and the window sums run in parallel
only when they are ``PARALLEL_MIN`` work a sample; a CIFAR stem's are 1-2 us each, less than the
thread pool's launch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
from tvm import s_tir, te, tirx

from bitcompiler.kernels._common import as_i32, batch_var, i64, largest_divisor, loops_pay, shape64
from bitcompiler.kernels.dense_avx2 import x86_features
from bitcompiler.kernels.dot_int8 import DOT_AVX2, DOT_PIXELS, DOT_VNNI, DOT_VNNI512, LANES, PIXELS, register
from bitcompiler.kernels.spec import ConvSpec
from bitcompiler.kernels.template import Choose, Template, hand, scheduled

F32 = "float32"
MAX_BITS = 7  # u8 codes up to 127: a vpmaddubsw pair sum (2 * 128 * 127) stays below 2^15
MAX_BITS_VNNI = 8  # vpdpbusd adds its four u8 x s8 products in int32: any byte code
PIXEL_BLOCK = 4  # output channels of its register block (see _schedule_pixels)
PIXEL_MAX_CHANNELS = 16  # input channels up to which it is taken (see pixel_lanes)


def fits(spec: ConvSpec, target: Any = "llvm") -> bool:
    """Whether ``spec`` runs on this kernel for ``target`` (an x86 CPU with AVX2)."""
    return (
        spec.act == "int8"
        and spec.code == "uint"
        and spec.bits <= (MAX_BITS_VNNI if uses_vnni(target) else MAX_BITS)
        and not spec.threshold
        and spec.groups == 1
        and spec.out_channels >= LANES
        and spec.reduction >= 16
        and x86_features(target, "avx2")
    )


def uses_vnni(target: Any = "llvm") -> bool:
    return x86_features(target, "avx2", "avx512vnni", "avx512vl")


def pixel_lanes(spec: ConvSpec, target: Any = "llvm") -> bool:
    """Whether ``spec`` takes the pixel-lanes schedule: 512-bit VNNI, few input channels (a stem:
    its epilogue is most of the time), stride 1 along the rows (16 neighbouring outputs read 16
    neighbouring words) and whole vectors of pixels and channel blocks. With more channels the
    channel lanes are as fast or faster (W2A8 3x3 64 -> 64 at 32x32: 0.257 against 0.270 ms; 128
    -> 128 at 16x16, one vector of pixels a row: 0.235 against 0.221 ms)."""
    return (
        uses_vnni(target)
        and spec.in_channels <= PIXEL_MAX_CHANNELS
        and spec.stride[1] == 1
        and spec.out_w % PIXELS == 0
        and spec.out_channels % PIXEL_BLOCK == 0
    )


def _vb(spec: ConvSpec) -> int:
    """Output channels per register block: 16 (two registers) when a 16-lane block has a register
    width above 1, else 8."""
    wide = spec.out_w == 1 or largest_divisor(spec.out_w, (6, 4, 5, 3, 2)) > 1
    return 16 if spec.out_channels % 16 == 0 and wide else LANES


def _register_width(spec: ConvSpec, vb: int, zmm: bool = False) -> int:
    """Output pixels per register block: a 16-channel block takes two 256-bit registers a pixel,
    or one 512-bit register (``zmm``)."""
    return largest_divisor(spec.out_w, (6, 4, 5, 3, 2) if vb == 16 and not zmm else (12, 8, 7, 6, 5, 4, 3, 2))


def int8_conv_func(
    spec: ConvSpec, output: Callable, target: Any = "llvm", stored: bool = False
) -> tirx.PrimFunc:
    """The kernel for ``spec`` (:func:`fits`); arguments as :func:`bitcompiler.kernels.conv2d_kernel`
    documents for int8 activations: ``XQ, XS, P``, the epilogue buffers, ``Y``. ``output`` builds
    the epilogue (the bit conv's). ``stored=True`` (:func:`stores_codes` specs) takes the codes in
    :func:`relayout_codes`' order instead of ``P``. Scheduled by the active scheduler
    (:func:`bitcompiler.kernels.template.scheduled`) from :func:`int8_conv_template`."""
    return scheduled(int8_conv_template(spec, output, target, stored))


def int8_conv_template(
    spec: ConvSpec, output: Callable, target: Any = "llvm", stored: bool = False
) -> Template:
    """:func:`int8_conv_func` as a tuning template: the unscheduled function and its schedule,
    whose choices are the register block's pixels (channel lanes, ``rw``) or its output
    channels and vectors of pixels (pixel lanes, ``block`` and ``vectors``)."""
    func = unscheduled_func(spec, output, target, stored)
    vb = _vb(spec)
    intrin = (DOT_VNNI512 if vb == 16 else DOT_VNNI) if uses_vnni(target) else DOT_AVX2

    def apply(sch: s_tir.Schedule, choose: Choose) -> None:
        _schedule_inputs(sch, spec, stored)
        if pixel_lanes(spec, target):
            _schedule_pixels(sch, spec, choose)
        else:
            _schedule(sch, spec, vb, intrin, choose)

    return Template("conv-int8", func, apply)


def unscheduled_func(
    spec: ConvSpec, output: Callable, target: Any = "llvm", stored: bool = False
) -> tirx.PrimFunc:
    """:func:`int8_conv_template`'s function: the padded input, the decoded codes, the sums (and
    window sums) and ``output``'s epilogue as TE stages, not scheduled."""
    register()
    C, O, H, W = spec.in_channels, spec.out_channels, spec.in_h, spec.in_w
    (KH, KW), (SH, SW), (PH, PW), (DH, DW) = spec.kernel, spec.stride, spec.padding, spec.dilation
    B = spec.bits
    vb = _vb(spec)
    C4, OB = -(-C // 4), -(-O // vb)
    M = batch_var()
    XQ = te.placeholder(shape64(M, C, H, W), "int8", "XQ")
    XS = te.placeholder(shape64(M), F32, "XS")
    if stored:
        P = te.placeholder(shape64(*codes_shape(spec)), "uint8", "WP")
    else:
        P = te.placeholder(shape64(B, O, KH, KW, spec.words_per_group), "int32", "P")

    def inside(c, r, w):
        return tirx.all(c < C, r >= PH, r < PH + H, w >= PW, w < PW + W)

    XZ = te.compute(
        shape64(M, C4, H + 2 * PH, W + 2 * PW, 4),
        lambda m, c4, r, w, ci: tirx.if_then_else(
            inside(c4 * 4 + ci, r, w),
            XQ[m, tirx.min(c4 * 4 + ci, C - 1), r - PH, w - PW],
            tirx.const(0, "int8"),
        ),
        name="XZ",
    )

    def decode(o, c, kh, kw):
        wd, sh = c // 32, as_i32(c % 32)
        q = (P[0, o, kh, kw, wd] >> sh) & 1
        for b in range(1, B):
            q = q | (((P[b, o, kh, kw, wd] >> sh) & 1) << b)
        return q.astype("uint8")

    if stored:
        per = 8 // B

        def unpack(ob, c4, kh, kw, oi, ci):
            step = (c4 * KH + kh) * KW + kw
            shift = (step % per * B).astype("uint8")
            o = ob * vb + oi
            return (P[o // LANES, step // per, o % LANES, ci] >> shift) & tirx.const(2**B - 1, "uint8")

        WQ = te.compute(shape64(OB, C4, KH, KW, vb, 4), unpack, name="WQ")
    else:
        WQ = te.compute(
            shape64(OB, C4, KH, KW, vb, 4),
            lambda ob, c4, kh, kw, oi, ci: tirx.if_then_else(
                tirx.all(ob * vb + oi < O, c4 * 4 + ci < C),
                decode(tirx.min(ob * vb + oi, O - 1), tirx.min(c4 * 4 + ci, C - 1), kh, kw),
                tirx.const(0, "uint8"),
            ),
            name="WQ",
        )
    c4 = te.reduce_axis((i64(0), i64(C4)), "c4")
    kh = te.reduce_axis((i64(0), i64(KH)), "kh")
    kw = te.reduce_axis((i64(0), i64(KW)), "kw")
    ci = te.reduce_axis((i64(0), i64(4)), "ci")
    pixels = pixel_lanes(spec, target)
    if pixels:  # one sum per output channel and pixel, in the output's order
        acc = te.compute(
            shape64(M, O, spec.out_h, spec.out_w),
            lambda m, o, oh, ow: te.sum(
                XZ[m, c4.var, oh * SH + kh.var * DH, ow + kw.var * DW, ci.var].astype("int32")
                * WQ[o // vb, c4.var, kh.var, kw.var, o % vb, ci.var].astype("int32"),
                axis=[c4, kh, kw, ci],
            ),
            name="acc",
        )
    else:
        acc = te.compute(
            shape64(M, OB, spec.out_h, spec.out_w, vb),
            lambda m, ob, oh, ow, oi: te.sum(
                XZ[m, c4.var, oh * SH + kh.var * DH, ow * SW + kw.var * DW, ci.var].astype("int32")
                * WQ[ob, c4.var, kh.var, kw.var, oi, ci.var].astype("int32"),
                axis=[c4, kh, kw, ci],
            ),
            name="acc",
        )
    sumx_value = None
    if spec.has_offset:
        # the four channels of each word summed first (contiguous bytes), then the window: a
        # vector of pixels over the interleaved bytes needed a gather per byte
        c_i = te.reduce_axis((i64(0), i64(4)), "ci")
        XW = te.compute(
            shape64(M, C4, H + 2 * PH, W + 2 * PW),
            lambda m, c4, r, w: te.sum(XZ[m, c4, r, w, c_i].astype("int32"), axis=[c_i]),
            name="XW",
        )
        r = [te.reduce_axis((i64(0), i64(n)), nm) for n, nm in ((C4, "c4"), (KH, "kh"), (KW, "kw"))]
        sumx = te.compute(
            shape64(M, spec.out_h, spec.out_w),
            lambda m, oh, ow: te.sum(
                XW[m, r[0].var, oh * SH + r[1].var * DH, ow * SW + r[2].var * DW], axis=r
            ),
            name="sumx",
        )
        sumx_value = lambda m, o, oh, ow: sumx[m, oh, ow]
    if pixels:
        acc_value = lambda m, o, oh, ow: acc[m, o, oh, ow]
    else:
        acc_value = lambda m, o, oh, ow: acc[m, o // vb, oh, ow, o % vb]
    epi, Y = output(spec, M, acc_value, sumx_value, XS)
    return te.create_prim_func([XQ, XS, P, *epi, Y])


def codes_shape(spec: ConvSpec) -> tuple[int, int, int, int]:
    """``(O/8, S/T, 8, 4)``: the codes of ``T = 8/B`` consecutive reduction steps (a step is four
    input channels of one tap, ``S = C/4 * KH * KW`` of them) share a byte, step ``t`` in bits
    ``[B t, B t + B)``; 32 bytes hold one step's codes of 8 output channels x 4 input channels.
    The layout does not depend on the image size (the report computes it from the layer alone)."""
    per = 8 // spec.bits
    steps = -(-spec.in_channels // 4) * spec.kernel[0] * spec.kernel[1]
    return (-(-spec.out_channels // LANES), -(-steps // per), LANES, 4)


def stores_codes(spec: ConvSpec, target: Any = "llvm") -> bool:
    """Whether the lowering stores this conv's codes in :func:`relayout_codes`' order: ``B`` divides
    8 and the padding (channels to 4 and ``VB``, steps to ``8/B``) adds at most 5% to the bits."""
    if not fits(spec, target) or 8 % spec.bits:
        return False
    return codes_bytes(spec) * 8 <= 1.05 * spec.bits * spec.out_channels * spec.reduction


def codes_bytes(spec: ConvSpec) -> int:
    return math.prod(codes_shape(spec))


def relayout_codes(spec: ConvSpec, planes: np.ndarray) -> np.ndarray:
    """The planes ``(B, O, KH, KW, CWg) int32`` as :func:`codes_shape` bytes (same codes; padding 0)."""
    B, O, C = spec.bits, spec.out_channels, spec.in_channels
    (KH, KW), vb = spec.kernel, LANES
    ob, groups, _, _ = codes_shape(spec)
    bits = np.unpackbits(np.ascontiguousarray(planes).view(np.uint8), axis=-1, bitorder="little")[..., :C]
    q = np.tensordot(1 << np.arange(B, dtype=np.int64), bits, axes=1)  # (O, KH, KW, C)
    c4 = -(-C // 4)
    full = np.zeros((ob * vb, KH, KW, c4 * 4), np.int64)
    full[:O, :, :, :C] = q
    # (OB, vb, KH, KW, C4, 4) -> (OB, C4, KH, KW, vb, 4) -> (OB, S, vb, 4)
    steps = full.reshape(ob, vb, KH, KW, c4, 4).transpose(0, 4, 2, 3, 1, 5).reshape(ob, -1, vb, 4)
    per = 8 // B
    padded = np.zeros((ob, groups * per, vb, 4), np.int64)
    padded[:, : steps.shape[1]] = steps
    padded = padded.reshape(ob, groups, per, vb, 4)
    out = np.zeros(padded.shape[:2] + padded.shape[3:], np.int64)
    for t in range(per):
        out |= padded[:, :, t] << (B * t)
    return np.ascontiguousarray(out.astype(np.uint8))


def _schedule_inputs(sch: Any, spec: ConvSpec, stored: bool) -> None:
    """The input copy, the decoded codes and the window sums."""
    for name in ("XZ", "WQ"):
        b = sch.get_sblock(name)
        loops = sch.get_loops(b)
        if loops_pay(sch, loops):  # a CIFAR stem's (3 channels, 64 of 3x3) are a launch each for 1-2 us
            sch.parallel(sch.fuse(*loops[:3]))
        if name == "WQ" and stored:  # one step's 8 x 4 bytes: a shift and a mask
            _, inner = sch.split(loops[-2], [None, LANES])
            sch.vectorize(sch.fuse(inner, loops[-1]))
    if spec.has_offset:
        xw = sch.get_sblock("XW")
        m, c4, r, _w, ci = xw_loops = sch.get_loops(xw)
        if loops_pay(sch, xw_loops):
            sch.parallel(sch.fuse(m, c4, r))
        sch.decompose_reduction(xw, ci)
        b = sch.get_sblock("sumx")
        m, oh, ow, *red = sumx_loops = sch.get_loops(b)
        pays = loops_pay(sch, sumx_loops)
        # pixels in vector lanes where they are contiguous (stride 1), else one at a time
        vl = largest_divisor(spec.out_w, (8, 4, 2)) if spec.stride[1] == 1 else 1
        wo, wi = sch.split(ow, [None, vl])
        sch.reorder(m, oh, wo, *red, wi)
        if pays:
            sch.parallel(sch.fuse(m, oh))
        if vl > 1:
            sch.vectorize(wi)
        sch.decompose_reduction(b, red[0])


def _schedule_pixels(sch: Any, spec: ConvSpec, choose: Choose = hand) -> None:
    """The pixel-lanes schedule (:func:`pixel_lanes`): a register block of ``PIXEL_BLOCK`` output
    channels x ``PIXELS`` (or twice as many) pixels of one row, a ``vpdpbusd`` per channel, tap and
    vector of pixels with the channel's four codes broadcast; the epilogue reads and writes whole
    vectors of one channel's pixels. The channel-lanes block's epilogue gathers each channel's
    pixels from the block (16 gathers a block: half of a CIFAR stem's time). 4 channels x 32
    pixels (512 bytes of sums) was the fastest block on znver4 (CIFAR stem 3 -> 64, 8-bit codes,
    one thread, the kernel alone: 18.3 us; 2 x 32 19.5, 4 x 16 20.2, 8 x 16 32, channel lanes
    36.3); 8 x 32 is 1 KiB, which TVM allocates on the heap instead of the stack."""
    acc, y = sch.get_sblock("acc"), sch.get_sblock("Y")
    wide = spec.out_w % (2 * PIXELS) == 0
    nv = choose("vectors", (1, 2) if wide else (1,), 2 if wide else 1)
    block = choose("block", tuple(b for b in (2, 4, 8) if spec.out_channels % b == 0), PIXEL_BLOCK)
    m, o, oh, ow = sch.get_loops(y)
    ob, oi = sch.split(o, [None, block])
    owo, owi = sch.split(ow, [None, nv * PIXELS])
    sch.reorder(m, oh, ob, owo, oi, owi)  # tasks take rows, as in _schedule
    sch.parallel(sch.fuse(m, oh, ob))
    # the block's sums in the global scope: a stack array LLVM keeps in registers (see _schedule)
    sch.compute_at(acc, owo, preserve_unit_loops=True)
    sch.unroll(oi)
    sch.vectorize(sch.split(owi, [None, PIXELS])[1])
    a_oi, a_oh, a_ow, c4, kh, kw, ci = sch.get_loops(acc)[-7:]
    a_owv, a_owl = sch.split(a_ow, [None, PIXELS])
    sch.reorder(c4, kh, kw, a_oi, a_oh, a_owv, a_owl, ci)
    init = sch.decompose_reduction(acc, c4)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.unroll(a_oi)
    sch.unroll(a_owv)
    sch.tensorize(a_owl, DOT_PIXELS)


def _schedule(sch: Any, spec: ConvSpec, vb: int, intrin: str, choose: Choose = hand) -> None:
    """The channel-lanes schedule: a register block of ``vb`` output channels in vector lanes."""
    # the register block (acc, vb x rw int32 sums, at most 384 bytes) stays in the global scope:
    # inside the parallel loop a small global buffer is a stack array LLVM promotes to registers,
    # where a "local" one becomes a heap workspace and every dot product stores its sums
    acc, y = sch.get_sblock("acc"), sch.get_sblock("Y")
    rw = _register_width(spec, vb, intrin == DOT_VNNI512)
    # (tuning: any width dividing the row whose sums stay within 384 bytes, or the hand width)
    widths = (1, 2, 3, 4, 5, 6, 7, 8, 12)
    rw = choose("rw", tuple(w for w in widths if spec.out_w % w == 0 and w <= max(rw, 96 // vb)), rw)
    if spec.out_channels % vb == 0:
        m, o, _oh, ow = sch.get_loops(y)
        ob, oi = sch.split(o, [None, vb])
        owo, owi = sch.split(ow, [None, rw])
        # tasks take rows (every channel block of them), as a binary conv after this one takes
        # chunks of pixels: the rows a thread writes here are those it packs and reads next
        sch.reorder(m, _oh, ob, owo, oi, owi)
        sch.parallel(sch.fuse(m, _oh, ob))
        sch.compute_at(acc, owo, preserve_unit_loops=True)
        # the epilogue in vectors of the block's pixels (contiguous in Y): the fenced products
        # (backends/exact_float.py) stop LLVM's SLP vectorizer, and unrolled scalar code took
        # as long as the dot products (CIFAR stem 3 -> 64: 58 us against 29)
        sch.unroll(oi)
        sch.vectorize(owi)
        loops = sch.get_loops(acc)
        a_owi, a_oi, c4, kh, kw, ci = loops[-6:]
    else:
        m, ob, oh, ow, oi, c4, kh, kw, ci = sch.get_loops(acc)
        owo, a_owi = sch.split(ow, [None, rw])
        sch.reorder(m, ob, oh, owo, a_owi, oi)
        sch.parallel(sch.fuse(m, ob, oh))
        a_oi = oi
        if spec.has_offset:  # Y reads the window sums too: a pass of its own after the sums
            sch.reverse_compute_at(sch.cache_write(acc, 0, "global"), owo)
            y_m, y_o, y_oh, y_ow = sch.get_loops(y)
            sch.parallel(sch.fuse(y_m, y_o))
            # in vectors, as above (a plane's pixels are contiguous)
            if (v := largest_divisor(spec.out_h * spec.out_w, (16, 8, 4))) > 1:
                sch.vectorize(sch.split(sch.fuse(y_oh, y_ow), [None, v])[1])
        else:
            sch.reverse_compute_at(y, owo)
    sch.reorder(c4, kh, kw, a_owi, a_oi, ci)
    oio, oii = sch.split(a_oi, [None, 16 if intrin == DOT_VNNI512 else LANES])
    init = sch.decompose_reduction(acc, c4)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.unroll(a_owi)
    sch.unroll(oio)
    sch.tensorize(oii, intrin)
