"""2-D convolution bit kernel: implicit im2col over channel-packed words.

Output ``Y (M, O, OH, OW)``; output channel ``o`` belongs to group ``g = o // (O / groups)`` and
reads that group's ``cg`` input channels. Tap ``(kh, kw)`` of output ``(oh, ow)`` reads input
row ``ih = oh*sh - ph + kh*dh`` and column ``iw = ow*sw - pw + kw*dw``; a tap outside the image is
zero padding and contributes 0 to both ``acc`` and ``sumx`` (the reference zero-pads the
already-quantized activations), so every load is guarded by ``if_then_else(in_bounds, ...)``.

* ``act="binary"``: the activations are packed over channels, ``XP (M, H, W, G, CWg)`` (see
  :func:`bitcompiler.kernels.pack_sign_nchw`), so a tap is ``CWg`` words. pm1:
  ``acc = n_valid * cg - 2 * sum popcount(a ^ w)`` over in-bounds taps, with
  ``n_valid = (#valid kh) * (#valid kw)`` computed in the epilogue; uint:
  ``acc = sum_i 2^i (popcount(P_i & a) - popcount(P_i & ~a))``; ``sumx = 2 popcount(a) - n_valid cg``.
* ``act="int8"`` / ``"float"``: ``X (M, C, H, W)``, the code is unpacked from the planes on the fly.

CPU schedule: batch and output channels are fused into one parallel loop (enough parallel work
even at batch 1); each output pixel reduces over its taps and words in registers
(``compute_at`` under the pixel loop, scalar accumulator) and its epilogue follows at once. The
tap-validity test depends only on (oh, kh) / (ow, kw), which LLVM hoists out of the word loop.
Any other target kind gets the unscheduled, portable TIR.
"""

from __future__ import annotations

from tvm import s_tir, te, tirx

from bitcompiler.kernels._common import as_i32, batch_var, i64, shape64, target_kind
from bitcompiler.kernels.spec import ConvSpec

F32 = "float32"


def _conv_func(spec: ConvSpec) -> tirx.PrimFunc:
    C, O, H, W = spec.in_channels, spec.out_channels, spec.in_h, spec.in_w
    (KH, KW), (SH, SW), (PH, PW), (DH, DW) = spec.kernel, spec.stride, spec.padding, spec.dilation
    G, CG, OG, CWG, B = spec.groups, spec.cg, spec.og, spec.words_per_group, spec.bits
    OH, OW = spec.out_h, spec.out_w
    M = batch_var()
    P = te.placeholder(shape64(B, O, KH, KW, CWG), "int32", "P")
    binary = spec.act == "binary"
    acc_t = F32 if spec.act == "float" else "int32"

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
            if spec.code == "pm1":
                t = tirx.Select(((P[0, o, kh.var, kw.var, wd] >> sh) & 1) != 0, x, -x)
            else:
                q = (P[0, o, kh.var, kw.var, wd] >> sh) & 1
                for b in range(1, B):
                    q = q + (((P[b, o, kh.var, kw.var, wd] >> sh) & 1) << b)
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
        s = sumx[m, o // OG, oh, ow]
        return 2 * s - n_valid(oh, ow) * CG if binary else s

    if spec.threshold:
        TS = te.placeholder(shape64(O), "int32", "TS")
        TH = te.placeholder(shape64(O), "int32", "TH")
        epi = [TS, TH]

        def y(m, o, oh, ow):
            hit = TS[o].astype("int64") * acc_value(m, o, oh, ow).astype("int64") >= TH[o].astype("int64")
            return tirx.Select(hit, tirx.const(1.0, F32), tirx.const(-1.0, F32))

    else:
        SC = te.placeholder(shape64(O), F32, "SC")
        OF = te.placeholder(shape64(O), F32, "OF")
        BI = te.placeholder(shape64(O), F32, "BI")
        epi = [SC, OF, BI]

        def y(m, o, oh, ow):
            s = XS[m] if spec.act == "int8" else None
            a = SC[o] if s is None else SC[o] * s
            v = a * acc_value(m, o, oh, ow).astype(F32)
            if sumx is not None:
                b = OF[o] if s is None else OF[o] * s
                v = v + b * sumx_value(m, o, oh, ow).astype(F32)
            return v + BI[o]

    Y = te.compute(shape64(M, O, OH, OW), y, name="Y")
    return te.create_prim_func([*inputs, P, *epi, Y])


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


def conv2d_kernel(spec: ConvSpec, target: str = "llvm") -> tirx.PrimFunc:
    """The conv bit kernel for ``spec``; scheduled for the host CPU when ``target`` is LLVM.

    Buffer arguments, in order: the activation inputs for ``spec.act`` (float ``X f32 (M,C,H,W)``;
    int8 ``XQ int8 (M,C,H,W), XS f32 (M,)``; binary ``XP int32 (M,H,W,G,CWg)``),
    ``P int32 (B,O,KH,KW,CWg)``, then ``TS, TH int32 (O,)`` or ``SC, OF, BI f32 (O,)``, and the output
    ``Y f32 (M,O,OH,OW)``. ``M`` is a symbolic int64 batch.
    """
    if not isinstance(spec, ConvSpec):
        raise ValueError(f"conv2d_kernel needs a ConvSpec, got {type(spec).__name__}")  # noqa: TRY004
    func = _conv_func(spec)
    if target_kind(target) == "llvm":
        func = _schedule(func, spec)
    return func.with_attr("global_symbol", "main")
