"""Scheduled float direct convolution for the host CPU: the core of every non-binary conv.

Two loop nests, both over a zero-padded copy ``XZ (M, C, HP, WP)`` of the input (no bounds
tests in the reduction) and both writing ``Y (M, O, OH, OW)`` in NCHW:

* **channel lanes** (a group's output channels a multiple of 8): weights laid out as
  ``WL (O/VB, CG, KH, KW, VB)``; a register block of ``NV`` vectors of ``VB`` output channels
  (vector lanes) x ``RH x RW`` output pixels (:func:`register_block`) accumulates its sums; each
  step broadcasts one input value per pixel and multiplies it into ``VB`` weights
  (``vfmadd231ps`` with a broadcast operand). The block's sums stay in registers over the whole
  reduction (``c, kh, kw``); the epilogue then writes them to ``Y``. 1x1 convolutions are this
  GEMM as it stands. On AVX-512 large convolutions run at the multiply-add peak (e.g. 3x3,
  320 -> 320 channels at 16x16: 4.5 ms for 0.47 GFLOP, torch fp32 4.9 ms, both one thread).
* **width lanes** (depthwise, small groups, any other): weights ``(O, CG, KH, KW)`` as exported;
  ``VL`` neighbouring output pixels of one channel in vector lanes, the weight broadcast.

Used for ``aten.conv2d`` on float weights (weights relaid out at compile time, see
:func:`float_conv_kernel`) and, through :func:`decoded_conv_func`, by the bit conv kernels with
float or int8 activations: the k-bit codes are decoded once per call into the layout above, then
the same loop nest runs; int8 activations are widened in the padded copy. Products of int8
activations and integer codes accumulate exactly in float32 while every partial sum stays below
2^24 (the caller checks ``CG*KH*KW*127*qmax < 2^24``), else in int32 (same nest, slower).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from tvm import s_tir, te, tirx

from bitcompiler.kernels._common import as_i32, batch_var, i64, largest_divisor, shape64
from bitcompiler.kernels.spec import ConvSpec

F32 = "float32"
KERNEL_NAME = "bitc_fconv"  # prefix of the Relax function names of these kernels


def lanes(spec: ConvSpec) -> int:
    """Output channels per vector block for the channel-lanes nest, or 0 for width lanes."""
    sums = spec.has_offset and not spec.threshold  # the window sums: Y has a second producer
    if spec.og % 8 and not (spec.groups == 1 and spec.reduction >= 16 and not sums):
        return 0  # (groups 1: the channels padded to a multiple of 8, e.g. a DenseNet's 12)
    if spec.reduction < 4:
        return 0
    return 16 if spec.og % 16 == 0 else 8


def _blocks(spec: ConvSpec, vb: int) -> int:
    """Channel blocks of ``vb`` lanes (the last one zero-padded when ``vb`` does not divide O)."""
    return -(-spec.out_channels // vb)


def _padded(spec: ConvSpec, X: te.Tensor, dtype: str) -> te.Tensor:
    """``X`` zero-padded (and widened to ``dtype``); ``X`` itself when there is nothing to do."""
    C, H, W = spec.in_channels, spec.in_h, spec.in_w
    (PH, PW) = spec.padding
    if PH == 0 and PW == 0 and X.dtype == dtype:
        return X
    M = X.shape[0]

    def inside(r, c):
        return tirx.all(r >= PH, r < PH + H, c >= PW, c < PW + W)

    return te.compute(
        shape64(M, C, H + 2 * PH, W + 2 * PW),
        lambda m, ch, r, c: tirx.if_then_else(
            inside(r, c), X[m, ch, r - PH, c - PW].astype(dtype), tirx.const(0, dtype)
        ),
        name="XZ",
    )


def _accumulate(spec: ConvSpec, XZ: te.Tensor, WT: te.Tensor, vb: int) -> Callable:
    """The accumulator tensor and ``acc(m, o, oh, ow)`` reading it in NCHW order."""
    O, CG, OG = spec.out_channels, spec.cg, spec.og
    (KH, KW), (SH, SW), (DH, DW) = spec.kernel, spec.stride, spec.dilation
    M = XZ.shape[0]
    c = te.reduce_axis((i64(0), i64(CG)), "c")
    kh = te.reduce_axis((i64(0), i64(KH)), "kh")
    kw = te.reduce_axis((i64(0), i64(KW)), "kw")

    def x(m, ch, oh, ow):
        return XZ[m, ch, oh * SH + kh.var * DH, ow * SW + kw.var * DW]

    if vb:
        acc = te.compute(
            shape64(M, _blocks(spec, vb), spec.out_h, spec.out_w, vb),
            lambda m, ob, oh, ow, oi: te.sum(
                x(m, ob * vb // OG * CG + c.var, oh, ow) * WT[ob, c.var, kh.var, kw.var, oi],
                axis=[c, kh, kw],
            ),
            name="acc",
        )
        return lambda m, o, oh, ow: acc[m, o // vb, oh, ow, o % vb]
    acc = te.compute(
        shape64(M, O, spec.out_h, spec.out_w),
        lambda m, o, oh, ow: te.sum(
            x(m, o // OG * CG + c.var, oh, ow) * WT[o, c.var, kh.var, kw.var], axis=[c, kh, kw]
        ),
        name="acc",
    )
    return lambda m, o, oh, ow: acc[m, o, oh, ow]


def _schedule(func: tirx.PrimFunc, spec: ConvSpec, vb: int, extra: tuple[str, ...]) -> tirx.PrimFunc:
    """Y's loops drive: each register block of the accumulator is computed where Y needs it."""
    sch = s_tir.Schedule(func)
    for name in extra:  # the padded copy, the decoded weights: one parallel pass each
        try:
            b = sch.get_sblock(name)
        except Exception:  # noqa: BLE001, S112  (absent when nothing needs it)
            continue
        loops = sch.get_loops(b)
        # the padded copy split over its rows too: a stem's 3 channels at batch 1 are 3 tasks
        sch.parallel(sch.fuse(*loops[: 3 if name == "XZ" else 2]))
    y = sch.get_sblock("Y")
    acc = sch.get_sblock("acc")
    m, o, oh, ow = sch.get_loops(y)
    if vb:
        _schedule_lanes(sch, spec, vb)
    else:
        vl = largest_divisor(spec.out_w, (8, 4, 2))
        owo, owi = sch.split(ow, [None, vl])
        sch.reorder(m, o, oh, owo, owi)
        sch.parallel(sch.fuse(m, o))
        sch.compute_at(acc, owo, preserve_unit_loops=True)  # (global scope: see register_block)
        (*_, a_owi), red = _inner_loops(sch, acc, owo, 4)
        sch.reorder(*red, a_owi)
        sch.unroll(red[-1])
        if spec.cg == 1 and len(red) > 1:
            sch.unroll(red[-2])
        if vl > 1:
            sch.vectorize(a_owi)
            sch.vectorize(owi)
        sch.decompose_reduction(acc, red[0])
    return sch.mod["main"]


def register_block(spec: ConvSpec, vb: int) -> tuple[int, int, int]:
    """``(nv, rh, rw)``: a register block of ``nv`` channel vectors (``vb`` lanes each) x ``rh`` output
    rows x ``rw`` output columns, ``nv*rh*rw`` accumulators.

    The block is a stack array LLVM promotes to registers only while it is under 1 KiB (larger
    ones become heap workspaces, and every multiply-add then stores its sum): at most 15 vectors
    of 16 lanes, or 24 of 8 (the registers). Columns that divide the row (a ragged last block
    costs more than a smaller one), then rows, then channel vectors, up to that count; measured
    on AVX-512, 8 to 15 accumulators all reach the multiply-add peak on large convolutions."""
    cap = 15 if vb == 16 else 24
    rw = max(d for d in range(1, min(cap, spec.out_w) + 1) if spec.out_w % d == 0)
    rh = max(d for d in range(1, cap // rw + 1) if spec.out_h % d == 0) if rw < 8 else 1
    nv = 2 if rh * rw * 2 <= cap and _blocks(spec, vb) % 2 == 0 else 1
    return nv, rh, rw


def _schedule_lanes(sch: s_tir.Schedule, spec: ConvSpec, vb: int) -> None:
    """Channel lanes: Y's loops drive; each register block of the accumulator (``nv`` vectors of
    ``vb`` output channels x ``rh`` rows x ``rw`` columns, :func:`register_block`) is computed
    where Y needs it and stays in registers over the whole reduction. Padded output channels
    (``vb`` not dividing O) are computed and not stored."""
    nv, rh, rw = register_block(spec, vb)
    y, acc = sch.get_sblock("Y"), sch.get_sblock("acc")
    m, o, oh, ow = sch.get_loops(y)
    ob, oj, oi = sch.split(o, [None, nv, vb])
    oho, ohi = sch.split(oh, [None, rh])
    owo, owi = sch.split(ow, [None, rw])
    sch.reorder(m, ob, oho, owo, ohi, oj, oi, owi)
    sch.parallel(sch.fuse(m, ob, oho))
    # the block's buffer stays in the global scope: a small one inside a parallel loop is a stack
    # array LLVM promotes to registers, where a "local" one becomes a heap workspace
    sch.compute_at(acc, owo, preserve_unit_loops=True)
    (_, a_ob, a_oh, a_ow, a_oi), red = _inner_loops(sch, acc, owo, 5)
    block_loops = [a_ob, a_oh, a_ow]
    sch.reorder(*red, *block_loops, a_oi)
    sch.vectorize(a_oi)
    for lp in block_loops:
        sch.unroll(lp)
    sch.decompose_reduction(acc, red[0])
    for lp in (ohi, oj, oi):
        sch.unroll(lp)
    # the epilogue stores rw neighbouring pixels of a channel as one vector: left to LLVM it stays
    # scalar where the kernel is built beside other functions (the Relax VM's module, no noalias
    # arguments) and reloads its scale and bias for every output (W8A8 3 -> 64 stem on 32x32, one
    # thread: 87 -> 57 us)
    sch.vectorize(owi)


def _inner_loops(sch: s_tir.Schedule, block: Any, outer: Any, n_spatial: int) -> tuple[list, list]:
    """The loops of ``block`` (computed at ``outer``, unit loops kept) below ``outer``: its
    ``n_spatial`` spatial ones, then its reduction ones."""
    loops = sch.get_loops(block)
    below = loops[[sch.get(lp).same_as(sch.get(outer)) for lp in loops].index(True) + 1 :]
    return below[:n_spatial], below[n_spatial:]


def float_conv_kernel(spec: ConvSpec, bias: bool) -> tirx.PrimFunc:
    """Float conv ``Y = conv(X, W) (+ BI)``: arguments ``X f32 (M,C,H,W)``, the weights in the
    layout :func:`relayout_weights` writes, ``BI f32 (O,)`` when ``bias``, ``Y f32 (M,O,OH,OW)``."""
    return _float_conv_kernel(spec, bias)


@functools.lru_cache(maxsize=256)
def _float_conv_kernel(spec: ConvSpec, bias: bool) -> tirx.PrimFunc:
    vb = lanes(spec)
    M = batch_var()
    X = te.placeholder(shape64(M, spec.in_channels, spec.in_h, spec.in_w), F32, "X")
    (KH, KW), CG, O = spec.kernel, spec.cg, spec.out_channels
    wshape = (_blocks(spec, vb), CG, KH, KW, vb) if vb else (O, CG, KH, KW)
    WT = te.placeholder(shape64(*wshape), F32, "WT")
    acc = _accumulate(spec, _padded(spec, X, F32), WT, vb)
    args = [X, WT]
    if bias:
        BI = te.placeholder(shape64(O), F32, "BI")
        args.append(BI)
        Y = te.compute(
            shape64(M, O, spec.out_h, spec.out_w), lambda m, o, oh, ow: acc(m, o, oh, ow) + BI[o], name="Y"
        )
    else:
        Y = te.compute(shape64(M, O, spec.out_h, spec.out_w), acc, name="Y")
    func = te.create_prim_func([*args, Y])
    return _schedule(func, spec, vb, ("XZ",)).with_attr("global_symbol", "main")


def relayout_weights(spec: ConvSpec, weight: Any) -> Any:
    """``weight (O, CG, KH, KW)`` (numpy) in the order :func:`float_conv_kernel` reads it."""
    import numpy as np

    w = np.ascontiguousarray(weight, dtype="float32")
    vb = lanes(spec)
    if not vb:
        return w
    O, CG, KH, KW = w.shape
    w = np.concatenate([w, np.zeros((_blocks(spec, vb) * vb - O, CG, KH, KW), "float32")])
    return np.ascontiguousarray(w.reshape(-1, vb, CG, KH, KW).transpose(0, 2, 3, 4, 1))


def stores_signs(spec: ConvSpec) -> bool:
    """Whether the lowering stores this conv's 1-bit pm1 weights as :func:`relayout_signs` bytes
    (channel lanes, output channels padded to 8 by at most 5%): decoded 8 lanes at a time instead
    of one gathered bit per weight. Depends on no image size (the report asks it per layer)."""
    return (
        spec.code == "pm1"
        and spec.bits == 1
        and spec.act in ("float", "int8")
        and lanes(spec) > 0
        and -(-spec.out_channels // 8) * 8 <= 1.05 * spec.out_channels
    )


def signs_bytes(spec: ConvSpec) -> int:
    return -(-spec.out_channels // 8) * spec.cg * spec.kernel[0] * spec.kernel[1]


def relayout_signs(spec: ConvSpec, planes: Any) -> Any:
    """The plane ``P (1, O, KH, KW, CWg) int32`` as ``WB (O/8, CG, KH, KW) uint8``: bit ``t`` of
    byte ``[j, c, kh, kw]`` is the sign bit of output channel ``8j + t`` (padding channels 0)."""
    import numpy as np

    O, CG, (KH, KW) = spec.out_channels, spec.cg, spec.kernel
    bits = np.unpackbits(np.ascontiguousarray(planes[0]).view(np.uint8), axis=-1, bitorder="little")[..., :CG]
    full = np.zeros((-(-O // 8) * 8, KH, KW, CG), np.uint8)
    full[:O] = bits
    by_lane = full.reshape(-1, 8, KH, KW, CG).transpose(0, 4, 2, 3, 1)  # (O/8, CG, KH, KW, 8)
    return np.ascontiguousarray(np.packbits(by_lane, axis=-1, bitorder="little")[..., 0])


def decoded_conv_func(spec: ConvSpec, acc_t: str, output: Callable, stored: bool = False) -> tirx.PrimFunc:
    """The bit conv (``act`` float or int8) on this core: ``P int32 (B,O,KH,KW,CWg)`` decoded to
    ``acc_t`` codes in the core's weight layout once per call; ``output(spec, M, acc_value,
    sumx_value, XS)`` builds the epilogue (the bit conv's, unchanged). Arguments as
    :func:`bitcompiler.kernels.conv2d_kernel` documents for the spec."""
    C, O, H, W = spec.in_channels, spec.out_channels, spec.in_h, spec.in_w
    (KH, KW), CG, OG, B = spec.kernel, spec.cg, spec.og, spec.bits
    (SH, SW), (DH, DW) = spec.stride, spec.dilation
    vb = lanes(spec)
    M = batch_var()
    if stored:  # stores_signs specs: relayout_signs bytes
        P = te.placeholder(shape64(-(-O // 8), CG, KH, KW), "uint8", "WB")
    else:
        P = te.placeholder(shape64(B, O, KH, KW, spec.words_per_group), "int32", "P")
    if spec.act == "float":
        X = te.placeholder(shape64(M, C, H, W), F32, "X")
        inputs, XS = [X], None
    else:
        X = te.placeholder(shape64(M, C, H, W), "int8", "XQ")
        XS = te.placeholder(shape64(M), F32, "XS")
        inputs = [X, XS]

    def decode(o, c, kh, kw):
        if stored:
            bit = (P[o // 8, c, kh, kw] >> (o % 8).astype("uint8")) & tirx.const(1, "uint8")
            return tirx.Select(bit != tirx.const(0, "uint8"), 1, -1).astype(acc_t)
        wd, sh = c // 32, as_i32(c % 32)
        if spec.code == "pm1":
            return tirx.Select(((P[0, o, kh, kw, wd] >> sh) & 1) != 0, 1, -1).astype(acc_t)
        q = (P[0, o, kh, kw, wd] >> sh) & 1
        for b in range(1, B):
            q = q | (((P[b, o, kh, kw, wd] >> sh) & 1) << b)
        return (q - spec.center if spec.center else q).astype(acc_t)

    if vb:
        WT = te.compute(
            shape64(_blocks(spec, vb), CG, KH, KW, vb),
            lambda ob, c, kh, kw, oi: tirx.if_then_else(
                ob * vb + oi < O, decode(tirx.min(ob * vb + oi, O - 1), c, kh, kw), tirx.const(0, acc_t)
            ),
            name="WQ",
        )
    else:
        WT = te.compute(shape64(O, CG, KH, KW), decode, name="WQ")
    XZ = _padded(spec, X, acc_t)
    acc = _accumulate(spec, XZ, WT, vb)
    sumx_value = None
    if spec.has_offset and not spec.threshold:
        c = te.reduce_axis((i64(0), i64(CG)), "c")
        kh = te.reduce_axis((i64(0), i64(KH)), "kh")
        kw = te.reduce_axis((i64(0), i64(KW)), "kw")
        sumx = te.compute(
            shape64(M, spec.groups, spec.out_h, spec.out_w),
            lambda m, g, oh, ow: te.sum(
                XZ[m, g * CG + c.var, oh * SH + kh.var * DH, ow * SW + kw.var * DW], axis=[c, kh, kw]
            ),
            name="sumx",
        )
        sumx_value = lambda m, o, oh, ow: sumx[m, o // OG, oh, ow]
    epi, Y = output(spec, M, acc, sumx_value, XS)
    func = te.create_prim_func([*inputs, P, *epi, Y])
    func = _schedule(func, spec, vb, ("XZ", "WQ"))
    if sumx_value is not None:
        func = _schedule_sumx(func, spec)
    return func


def _schedule_sumx(func: tirx.PrimFunc, spec: ConvSpec) -> tirx.PrimFunc:
    """The per-group window sums: width in vector lanes, the reduction outside them."""
    sch = s_tir.Schedule(func)
    b = sch.get_sblock("sumx")
    m, g, oh, ow, c, kh, kw = sch.get_loops(b)
    vl = largest_divisor(spec.out_w, (8, 4, 2))
    wo, wi = sch.split(ow, [None, vl])
    sch.reorder(m, g, oh, wo, c, kh, kw, wi)
    sch.parallel(sch.fuse(m, g, oh))  # (groups 1 at batch 1 would be one task)
    if vl > 1:
        sch.vectorize(wi)
    sch.decompose_reduction(b, c)
    return sch.mod["main"]
