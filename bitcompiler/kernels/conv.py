"""2-D convolution bit kernel: implicit im2col over channel-packed words.

Output ``Y (M, O, OH, OW)``; output channel ``o`` belongs to group ``g = o // (O / groups)`` and
reads that group's ``cg`` input channels. Tap ``(kh, kw)`` of output ``(oh, ow)`` reads input
row ``ih = oh*sh - ph + kh*dh`` and column ``iw = ow*sw - pw + kw*dw``; a tap outside the image is
zero padding and contributes 0 to both ``acc`` and ``sumx`` (the reference zero-pads the
already-quantized activations); the generic computation guards every load with
``if_then_else(in_bounds, ...)``, the binary pm1 CPU kernel (:mod:`bitcompiler.kernels.conv_binary`) pads instead.

* ``act="binary"``: the activations are packed over channels, ``XP (M, H, W, G, CWg)`` (see
  :func:`bitcompiler.kernels.pack_sign_nchw`), so a tap is ``CWg`` words. pm1:
  ``acc = n_valid * cg - 2 * sum popcount(a ^ w)`` over in-bounds taps, with
  ``n_valid = (#valid kh) * (#valid kw)`` computed in the epilogue; uint:
  ``acc = sum_i 2^i (popcount(P_i & a) - popcount(P_i & ~a))``; ``sumx = 2 popcount(a) - n_valid cg``.
* ``act="int8"`` / ``"float"``: ``X (M, C, H, W)``, the code is unpacked from the planes on the fly.
  :func:`conv2d_c_kernel` reads one ``uint8`` code per weight instead (Cortex-M's C).

The W1A1 CPU kernels (``act="binary"``, pm1 weights): :mod:`bitcompiler.kernels.conv_amx`
(signs expanded to bytes, an int8 matrix product on AMX tiles) where the CPU has AMX and
:func:`~bitcompiler.kernels.conv_amx.fits` holds, :mod:`bitcompiler.kernels.conv_vpop`
(a flat im2col with AVX-512 ``vpopcntq``) where the CPU has ``avx512vpopcntdq`` and
:func:`~bitcompiler.kernels.conv_vpop.fits` holds, else the register-blocked
:mod:`bitcompiler.kernels.conv_binary`. ``act="int8"``/``"float"`` on the CPU decode the codes once per
call and run the scheduled float convolution core (``_decoded_direct``).

Other modes: batch and output channels are fused into one parallel loop; each output pixel
reduces over its taps and words in registers (scalar accumulator) and its epilogue follows.
Any other target kind gets the unscheduled, portable TIR.
"""

from __future__ import annotations

import functools
from typing import Any

from tvm import s_tir, te, tirx

from bitcompiler.kernels import amx_tiles, conv_amx, conv_int8, conv_vpop
from bitcompiler.kernels._common import (
    as_i32,
    batch_var,
    built_once,
    i64,
    shape64,
    target_kind,
)
from bitcompiler.kernels.conv_binary import binary_template
from bitcompiler.kernels.conv_pm1 import fuses_residual, packs_output, packs_residual
from bitcompiler.kernels.dense_avx2 import avx2_target, popcnt512_target
from bitcompiler.kernels.spec import ConvSpec, centered_offset_expr
from bitcompiler.kernels.template import Template, as_kernel

F32 = "float32"


def _conv_func(spec: ConvSpec, codes: bool = False, packed: bool = False) -> tirx.PrimFunc:
    C, O, H, W = spec.in_channels, spec.out_channels, spec.in_h, spec.in_w
    (KH, KW), (SH, SW), (PH, PW), (DH, DW) = spec.kernel, spec.stride, spec.padding, spec.dilation
    G, CG, OG, CWG, B = spec.groups, spec.cg, spec.og, spec.words_per_group, spec.bits
    OH, OW = spec.out_h, spec.out_w
    M = batch_var()
    if codes:  # one unsigned byte per weight instead of B bit-planes (see conv2d_c_kernel)
        P = te.placeholder(shape64(O, KH, KW, CG), "uint8", "Q")
    else:
        P = te.placeholder(shape64(B, O, KH, KW, CWG), "int32", "P")
    binary = spec.act == "binary"
    # codes: int8 x code products in int32 (integer multiply-adds; the same sums as float32's,
    # which accumulator_type picks only while they are exact)
    acc_t = "int32" if codes and spec.act == "int8" else accumulator_type(spec)

    def rows(oh, kh):
        return oh * SH - PH + kh * DH

    def cols(ow, kw):
        return ow * SW - PW + kw * DW

    def valid(oh, ow, kh, kw):
        ih, iw = rows(oh, kh), cols(ow, kw)
        return tirx.all(ih >= 0, ih < H, iw >= 0, iw < W)

    def n_valid(oh, ow):
        nh = sum(tirx.Select(tirx.all(rows(oh, k) >= 0, rows(oh, k) < H), 1, 0) for k in range(KH))
        nw = sum(tirx.Select(tirx.all(cols(ow, k) >= 0, cols(ow, k) < W), 1, 0) for k in range(KW))
        return as_i32(nh * nw)

    kh = te.reduce_axis((i64(0), i64(KH)), "kh")
    kw = te.reduce_axis((i64(0), i64(KW)), "kw")
    zero_i = tirx.const(0, "int32")

    XS = None
    if binary:
        XP = te.placeholder(shape64(M, H, W, G, CWG), "int32", "XP")
        inputs = [XP]
        w = te.reduce_axis((i64(0), i64(CWG)), "w")

        def word(m, g, oh, ow, a, b, ww):
            return XP[m, rows(oh, a), cols(ow, b), g, ww]

        if spec.code == "pm1":

            def acc_f(m, o, oh, ow):
                a = word(m, o // OG, oh, ow, kh.var, kw.var, w.var)
                pc = tirx.popcount(a ^ P[0, o, kh.var, kw.var, w.var])
                return te.sum(tirx.if_then_else(valid(oh, ow, kh.var, kw.var), pc, zero_i), axis=[kh, kw, w])

        else:
            i = te.reduce_axis((i64(0), i64(B)), "i")

            def acc_f(m, o, oh, ow):
                a = word(m, o // OG, oh, ow, kh.var, kw.var, w.var)
                p = P[i.var, o, kh.var, kw.var, w.var]
                t = (tirx.popcount(p & a) - tirx.popcount(p & (a ^ tirx.const(-1, "int32")))) << as_i32(i.var)
                return te.sum(
                    tirx.if_then_else(valid(oh, ow, kh.var, kw.var), t, zero_i), axis=[i, kh, kw, w]
                )

        def sumx_f(m, g, oh, ow):
            pc = tirx.popcount(word(m, g, oh, ow, kh.var, kw.var, w.var))
            return te.sum(tirx.if_then_else(valid(oh, ow, kh.var, kw.var), pc, zero_i), axis=[kh, kw, w])

    else:
        if spec.act == "float":
            X = te.placeholder(shape64(M, C, H, W), F32, "X")
            inputs = [X]

            def xval(m, ch, ih, iw):
                return X[m, ch, ih, iw]

        else:
            XQ = te.placeholder(shape64(M, C, H, W), "int8", "XQ")
            XS = te.placeholder(shape64(M), F32, "XS")
            inputs = [XQ, XS]

            def xval(m, ch, ih, iw):
                return XQ[m, ch, ih, iw].astype("int32")

        c = te.reduce_axis((i64(0), i64(CG)), "c")
        zero = tirx.const(0, acc_t)

        def acc_f(m, o, oh, ow):
            g = o // OG
            x = xval(m, g * CG + c.var, rows(oh, kh.var), cols(ow, kw.var))
            wd, sh = c.var // 32, as_i32(c.var % 32)
            if codes:
                q = P[o, kh.var, kw.var, c.var].astype("int32") - spec.center
                t = q.astype(F32) * x if acc_t == F32 else q * x
            elif spec.code == "pm1":
                t = tirx.Select(((P[0, o, kh.var, kw.var, wd] >> sh) & 1) != 0, x, -x)
            else:
                q = (P[0, o, kh.var, kw.var, wd] >> sh) & 1
                for b in range(1, B):
                    q = q + (((P[b, o, kh.var, kw.var, wd] >> sh) & 1) << b)
                q = q - spec.center if spec.center else q
                t = q.astype(F32) * x if acc_t == F32 else q * x
            return te.sum(tirx.if_then_else(valid(oh, ow, kh.var, kw.var), t, zero), axis=[kh, kw, c])

        def sumx_f(m, g, oh, ow):
            x = xval(m, g * CG + c.var, rows(oh, kh.var), cols(ow, kw.var))
            return te.sum(tirx.if_then_else(valid(oh, ow, kh.var, kw.var), x, zero), axis=[kh, kw, c])

    acc = te.compute(shape64(M, O, OH, OW), acc_f, name="acc")
    sumx = None
    if spec.has_offset and not spec.threshold:
        sumx = te.compute(shape64(M, G, OH, OW), sumx_f, name="sumx")

    def acc_value(m, o, oh, ow):
        a = acc[m, o, oh, ow]
        if binary and spec.code == "pm1":
            return n_valid(oh, ow) * CG - 2 * a
        return a

    def sumx_value(m, o, oh, ow):
        assert sumx is not None
        s = sumx[m, o // OG, oh, ow]
        return 2 * s - n_valid(oh, ow) * CG if binary else s

    if packed:
        epi, Y = _packed_output(spec, M, acc_value, sumx_value if sumx is not None else None, XS)
    else:
        epi, Y = _output(spec, M, acc_value, sumx_value if sumx is not None else None, XS)
    return te.create_prim_func([*inputs, P, *epi, Y])


def _packed_output(spec: ConvSpec, M, acc_value, sumx_value, XS) -> tuple[list, te.Tensor]:
    """:func:`_output`'s ``Y`` kept inside the kernel and written as the next binary conv's packed
    input: ``YP int32 (M, OH, OW, 1, ceil(O/32))``, bit ``o % 32`` of word ``o // 32`` set where
    ``Y[o] >= 0`` (as :func:`bitcompiler.kernels.pack_sign_nchw` packs ``Y`` for groups 1; bits
    past ``O`` are 0). ``Y`` is the same expression, so the signs are exactly those of the map."""
    O, OH, OW = spec.out_channels, spec.out_h, spec.out_w
    epi, Y = _output(spec, M, acc_value, sumx_value, XS)

    def word(m, oh, ow, g, wd):
        out = None
        for j in range(32):
            o = wd * 32 + j
            hit = Y[m, tirx.min(o, O - 1), oh, ow] >= tirx.const(0.0, F32)
            if O % 32:
                hit = tirx.all(o < O, hit)
            bit = tirx.Select(hit, tirx.const(1, "int32"), tirx.const(0, "int32")) << tirx.const(j, "int32")
            out = bit if out is None else out | bit
        return out

    return epi, te.compute(shape64(M, OH, OW, 1, (O + 31) // 32), word, name="YP")


def _output(
    spec: ConvSpec, M, acc_value, sumx_value, XS, clip: tuple[float, float | None] | None = None
) -> tuple[list, te.Tensor]:
    """The epilogue parameters and ``Y``: a BN threshold (sign) or ``(SC s) acc + (OF s) sumx + BI``,
    clamped to ``clip = (lo, hi)`` where given (``hi`` None: a ReLU's ``max(y, lo)``)."""
    O, OH, OW = spec.out_channels, spec.out_h, spec.out_w
    if spec.threshold:
        TS = te.placeholder(shape64(O), "int32", "TS")
        TH = te.placeholder(shape64(O), "int32", "TH")

        def y(m, o, oh, ow):
            hit = TS[o].astype("int64") * acc_value(m, o, oh, ow).astype("int64") >= TH[o].astype("int64")
            return tirx.Select(hit, tirx.const(1.0, F32), tirx.const(-1.0, F32))

        return [TS, TH], te.compute(shape64(M, O, OH, OW), y, name="Y")

    SC = te.placeholder(shape64(O), F32, "SC")
    OF = te.placeholder(shape64(O), F32, "OF")
    BI = te.placeholder(shape64(O), F32, "BI")

    def y(m, o, oh, ow):  # type: ignore[no-redef]
        s = XS[m] if spec.act == "int8" else None
        a = SC[o] if s is None else SC[o] * s
        v = a * acc_value(m, o, oh, ow).astype(F32)
        if sumx_value is not None:
            of = centered_offset_expr(spec, OF[o], SC[o])
            b = of if s is None else of * s
            v = v + b * sumx_value(m, o, oh, ow).astype(F32)
        v = v + BI[o]
        if clip is not None:
            v = tirx.max(v, tirx.const(clip[0], F32))
            if clip[1] is not None:
                v = tirx.min(v, tirx.const(clip[1], F32))
        return v

    return [SC, OF, BI], te.compute(shape64(M, O, OH, OW), y, name="Y")


# --------------------------------------------------------------------------- decoded weights (CPU)
def _decoded_direct(spec: ConvSpec, stored: bool = False) -> tirx.PrimFunc:
    """act="int8"/"float" on the CPU: the codes decoded once per call into the scheduled float conv
    core (:mod:`bitcompiler.kernels.conv_float`), accumulating in :func:`accumulator_type`."""
    from bitcompiler.kernels.conv_float import decoded_conv_func

    return decoded_conv_func(spec, accumulator_type(spec), _output, stored)


def accumulator_type(spec: ConvSpec) -> str:
    """float32 for float activations, and for int8 x k-bit products while every partial sum provably
    stays below 2^24 (exact; vfmadd instead of vpmulld + vpaddd, e.g. an RGB stem); else int32."""
    qmax = 1 if spec.code == "pm1" else 2**spec.bits - 1
    exact_f32 = spec.act == "int8" and spec.reduction * 127 * qmax < 2**24
    return F32 if spec.act == "float" or exact_f32 else "int32"


def _schedule(func: tirx.PrimFunc, spec: ConvSpec) -> tirx.PrimFunc:
    sch = s_tir.Schedule(func)
    y = sch.get_sblock("Y")
    m, o, _oh, ow = sch.get_loops(y)
    mo = sch.fuse(m, o)
    sch.compute_at(sch.get_sblock("acc"), ow, preserve_unit_loops=True)
    if spec.has_offset and not spec.threshold:
        sch.compute_at(sch.get_sblock("sumx"), ow, preserve_unit_loops=True)
    sch.parallel(mo)
    return sch.mod["main"]


def conv2d_kernel(
    spec: ConvSpec,
    target: str | dict | Any = "llvm",
    packed_output: bool = False,
    residual_clip: tuple[float, float] | None = None,
    clip: tuple[float, float | None] | None = None,
    shortcut: ConvSpec | None = None,
) -> tirx.PrimFunc:
    """The conv bit kernel for ``spec``; scheduled for the host CPU when ``target`` is LLVM.

    Buffer arguments, in order: the activation inputs for ``spec.act`` (float ``X f32 (M,C,H,W)``;
    int8 ``XQ int8 (M,C,H,W), XS f32 (M,)``; binary ``XP int32 (M,H,W,G,CWg)``),
    ``P int32 (B,O,KH,KW,CWg)``, then ``TS, TH int32 (O,)`` or ``SC, OF, BI f32 (O,)``, and the output
    ``Y f32 (M,O,OH,OW)``. ``M`` is a symbolic int64 batch.

    ``packed_output=True`` (CPU, :func:`packs_output` specs: binary pm1 threshold layers with 32k
    output channels) writes ``Y int32 (M,OH,OW,1,O/32)`` instead: the +-1 outputs already packed
    as :func:`bitcompiler.kernels.pack_sign_nchw` packs them for a groups-1 binary layer.
    ``residual_clip=(lo, hi)`` (CPU, :func:`fuses_residual` specs) adds a residual input ``RES f32
    (M,O,OH,OW)`` after the epilogue buffers and writes ``Y = hardtanh(epilogue + RES, lo, hi)``;
    both options (:func:`packs_residual` specs) write ``Y`` and then its signs packed, ``YP int32
    (M,OH,OW,1,O/32)``: the block's output and the next binary layer's input.
    ``clip=(lo, hi)`` (CPU, :func:`clamps_output` specs: the integer conv of int8 activations)
    writes ``Y = clamp(epilogue, lo, hi)``, ``hi=None`` for a ReLU's ``max(epilogue, lo)``.
    ``shortcut`` (with ``packed_output``, :func:`fuses_shortcut` specs) also computes a ResNet
    block's 1x1 projection shortcut of the same input: its ``P, SC, OF, BI`` follow ``TS, TH``,
    and its ``Y f32 (M,O,OH,OW)`` follows the packed output.

    The W1A1 kernels (but the AMX one) and the int8-activation integer kernels are tuning
    templates (:func:`bitcompiler.kernels.conv_vpop.vpop_template`,
    :func:`bitcompiler.kernels.conv_binary.binary_template`,
    :func:`bitcompiler.kernels.conv_int8.int8_conv_template`): scheduled by the active scheduler
    (:func:`bitcompiler.kernels.template.scheduled`: a tuning record, else by hand).
    """
    made = _conv_kernel(spec, target, packed_output, residual_clip, clip, shortcut)
    return as_kernel(made).with_attr("global_symbol", "main")


@built_once
def _conv_kernel(
    spec: ConvSpec,
    target: str | dict | Any,
    packed_output: bool,
    residual_clip: tuple[float, float] | None,
    clip: tuple[float, float | None] | None,
    shortcut: ConvSpec | None,
) -> tirx.PrimFunc | Template:
    """:func:`conv2d_kernel`'s kernel, or its template (built once: scheduled at each call)."""
    if not isinstance(spec, ConvSpec):
        raise ValueError(f"conv2d_kernel needs a ConvSpec, got {type(spec).__name__}")  # noqa: TRY004
    cpu = target_kind(target) == "llvm"
    if clip is not None:
        if not (cpu and clamps_output(spec, target)) or residual_clip is not None or packed_output:
            raise ValueError(f"no clamped-output conv kernel for {spec} on {target!r}")
        out = functools.partial(_output, clip=clip)
        return conv_int8.int8_conv_template(spec, out, target)
    if residual_clip is not None and not (cpu and fuses_residual(spec)):
        raise ValueError(f"no residual-epilogue conv kernel for {spec} on {target!r}")
    packs = packs_residual(spec) if residual_clip is not None else packs_output(spec)
    if packed_output and not (cpu and packs):
        raise ValueError(f"no packed-output conv kernel for {spec} on {target!r}")
    if shortcut is not None:
        if not (packed_output and fuses_shortcut(spec, shortcut, target)):
            raise ValueError(f"no conv kernel for {spec} that computes the shortcut {shortcut} on {target!r}")
        return conv_vpop.vpop_template(spec, packed=True, shortcut=shortcut)
    if cpu and conv_amx.fits(spec) and (cores := amx_tiles.amx_cores(target)):
        return conv_amx.amx_conv_func(spec, packed=packed_output, clip=residual_clip, cores=cores)
    if cpu and popcnt512_target(target) and conv_vpop.fits(spec):
        return conv_vpop.vpop_template(spec, packed=packed_output, clip=residual_clip)
    if cpu and spec.act == "binary" and spec.code == "pm1":
        return binary_template(
            spec,
            byte_lanes=avx2_target(target),
            packed=packed_output,
            clip=residual_clip,
            popcnt512=popcnt512_target(target),
        )
    if cpu and conv_int8.fits(spec, target):
        return conv_int8.int8_conv_template(spec, _output, target)
    if cpu and spec.act != "binary":
        return _decoded_direct(spec)
    return _schedule(_conv_func(spec), spec) if cpu else _conv_func(spec)


def fuses_shortcut(spec: ConvSpec, shortcut: ConvSpec, target: Any = "llvm") -> bool:
    """Whether :func:`conv2d_kernel` can compute ``shortcut`` (a 1x1 binary conv of the same input)
    in ``spec``'s packed-output kernel (``shortcut=``): the vector-popcount kernel
    (:func:`~bitcompiler.kernels.conv_vpop.fuses_shortcut`), on a CPU without AMX tiles."""
    return (
        target_kind(target) == "llvm"
        and popcnt512_target(target)
        and not (conv_amx.fits(spec) and amx_tiles.amx_cores(target))
        and packs_output(spec)
        and conv_vpop.fuses_shortcut(spec, shortcut)
    )


def clamps_output(spec: ConvSpec, target: Any = "llvm") -> bool:
    """Whether :func:`conv2d_kernel` can clamp ``spec``'s output in its epilogue (``clip=``): the
    integer conv of int8 activations, affine outputs."""
    return target_kind(target) == "llvm" and conv_int8.fits(spec, target)


def codes_conv_fits(spec: ConvSpec) -> bool:
    """Whether :func:`conv2d_c_kernel` can read ``spec``'s weights as codes: int8 or float
    activations, unsigned codes of at most 8 bits."""
    return spec.act != "binary" and spec.code != "pm1" and spec.bits <= 8


def conv2d_c_kernel(spec: ConvSpec, codes: bool = False, packed: bool = False) -> tirx.PrimFunc:
    """The portable conv (:func:`conv2d_kernel`'s buffers, reduction order and epilogue, so equal
    outputs) with two options for targets without scheduled kernels (Cortex-M's C):

    * ``codes``: each weight's code as one byte, ``Q uint8 (O, KH, KW, CG)``
      (:func:`codes_from_planes`), in place of the planes ``P``; int8 activations sum in int32.
      Decoding B planes per multiply is what dominates otherwise (:func:`codes_conv_fits`).
    * ``packed``: the signs of the outputs as the sign words a groups-1 binary conv reads
      (:func:`_packed_output`), in place of the float map and its packing kernel.
    """
    if codes and not codes_conv_fits(spec):
        raise ValueError(f"no codes conv kernel for {spec}: it needs int8/float activations and uint codes")
    return _conv_func(spec, codes=codes, packed=packed).with_attr("global_symbol", "main")


def codes_from_planes(planes: Any, cg: int) -> Any:
    """``P int32 (B, O, KH, KW, CWg)`` uint bit-planes -> ``Q uint8 (O, KH, KW, cg)`` codes, as
    :func:`bitcompiler.quant.numerics.planes_to_code` decodes them (a numpy array)."""
    import numpy as np
    import torch

    from bitcompiler.quant.numerics import planes_to_code

    q = planes_to_code(torch.as_tensor(np.asarray(planes, dtype=np.int32)), cg, "uint")
    return q.numpy().astype(np.uint8)


def stored_codes_conv_kernel(spec: ConvSpec, target: str = "llvm") -> tirx.PrimFunc:
    """The conv reading its weights as :func:`stored_weights` stores them (the integer conv's
    codes, or the float core's sign bytes); buffers as :func:`conv2d_kernel`'s with ``P``
    replaced by those bytes. The integer conv is a tuning template, as in :func:`conv2d_kernel`."""
    made = _stored_codes_conv(spec, target)
    return as_kernel(made).with_attr("global_symbol", "main")


@functools.lru_cache(maxsize=256)
def _stored_codes_conv(spec: ConvSpec, target: str) -> tirx.PrimFunc | Template:
    from bitcompiler.kernels.conv_float import stores_signs

    if conv_int8.stores_codes(spec, target):
        return conv_int8.int8_conv_template(spec, _output, target, stored=True)
    if stores_signs(spec) and target_kind(target) == "llvm":
        return _decoded_direct(spec, stored=True)
    raise ValueError(f"no stored-codes conv kernel for {spec} on {target!r}")


def stored_weights(spec: ConvSpec, target: Any = "llvm") -> tuple[Any, int, str] | None:
    """How the CPU lowering stores this conv's weights when not as its planes: ``(relayout,
    bytes, suffix)`` with ``relayout(spec, planes)`` giving the array
    :func:`stored_codes_conv_kernel` reads and ``suffix`` ending its kernel's name (``_codes``:
    the integer conv, x86 only; ``_signs``: the float core's sign bytes), or None (the planes,
    or their compact stream)."""
    from bitcompiler.kernels import conv_float

    if target_kind(target) != "llvm":
        return None
    if conv_int8.stores_codes(spec, target):
        return conv_int8.relayout_codes, conv_int8.codes_bytes(spec), "_codes"
    if conv_float.stores_signs(spec):
        return conv_float.relayout_signs, conv_float.signs_bytes(spec), "_signs"
    return None
