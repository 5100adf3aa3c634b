"""k-bit weights x int8 activations on a GPU with 4-byte dot products (``__dp4a``, sm_61 and newer).

The layer ``Y (M, N)`` of :func:`bitcompiler.kernels.dense_kernel` with ``act="int8"``, computed
from the weight codes stored as signed bytes, four to an int32 word (``W4 (N, K/4)``: pm1 codes
±1, uint codes 0..2^B-1, B <= 7), and the activations' int8 codes read four to a word
(``X4 (M, K/4)``, made by :func:`pack4_func` from the quantizer's ``XQ``)::

    acc[m, n] = sum_w __dp4a(X4[m, w], W4[n, w], 0)      # = sum_k code[n, k] * XQ[m, k], exact

then the same epilogue as the plane-reading kernel (the same float operations in the same order,
so the outputs are equal bit for bit). CUDA has ``__dp4a`` built in; OpenCL gets
:data:`OPENCL_DP4A`, a function of the same name and semantics, so pocl runs the very TIR that
nvcc compiles. The GPU schedule is the W1A1 dense tiling (:func:`schedule_w1a1_dense`).

Convs (groups 1, C a multiple of 4; :func:`dp4a_conv_func`) read the activations as ``X4 (M, C/4,
H, W)`` (four channels of a pixel to a word) and the codes as ``W4 (O, KH, KW, C/4)``; the window
sum of an offset layer is a dot product with ``0x01010101``. Other convs keep the plane kernel.
"""

from __future__ import annotations

import numpy as np
from tvm import te, tirx

from bitcompiler.kernels._common import batch_var, i64, shape64, threshold_output
from bitcompiler.kernels.spec import ConvSpec, DenseSpec

F32 = "float32"
DP4A = "__dp4a"
# OpenCL C: __dp4a(a, b, c) = c + the dot product of a's and b's four signed bytes
OPENCL_DP4A = (
    "inline int __dp4a(int a, int b, int c) {\n"
    "  char4 x = as_char4(a), y = as_char4(b);\n"
    "  return c + x.s0 * y.s0 + x.s1 * y.s1 + x.s2 * y.s2 + x.s3 * y.s3;\n"
    "}\n"
)


def dp4a_fits(spec: DenseSpec) -> bool:
    """int8 activations, K a multiple of 4, codes that fit a signed byte (pm1, or uint with B <= 7)."""
    return spec.act == "int8" and spec.in_features % 4 == 0 and (spec.code == "pm1" or spec.bits <= 7)


def needs_sumx(spec: DenseSpec) -> bool:
    """The epilogue's ``offset * sum x`` term (an offset and no threshold)."""
    return spec.has_offset and not spec.threshold


def conv_fits(spec: ConvSpec) -> bool:
    """:func:`dp4a_fits` for a conv: groups 1 and C a multiple of 4 (four channels to a word)."""
    return (
        spec.act == "int8" and spec.groups == 1 and spec.in_channels % 4 == 0
        and (spec.code == "pm1" or spec.bits <= 7)
    )  # fmt: skip


def dp4a_codes(planes: np.ndarray, k: int, code: str) -> np.ndarray:
    """Bit-planes ``P (B, ..., KW)`` of rows of ``k`` codes -> ``int32 (..., k/4)``: each row's
    codes as signed bytes, four to a word (dense ``(N, K/4)``; conv ``(O, KH, KW, C/4)``)."""
    if k % 4:
        raise ValueError(f"{k} codes per row is not a multiple of 4")
    words = np.ascontiguousarray(planes, dtype=np.int32).view(np.uint32)
    bits = (words[..., None] >> np.arange(32, dtype=np.uint32)) & 1  # (B, ..., KW, 32)
    bits = bits.reshape(*planes.shape[:-1], -1)[..., :k].astype(np.int16)
    codes = 2 * bits[0] - 1 if code == "pm1" else sum(bits[i] << i for i in range(planes.shape[0]))
    return np.ascontiguousarray(np.asarray(codes, dtype=np.int8)).view(np.int32)


def pack4_func(rest: tuple[int, ...]) -> tirx.PrimFunc:
    """``XQ int8 (M, *rest) -> X4 int32 (M, rest[0]/4, *rest[1:])``: four codes of consecutive
    features (channels) to a word, the first in the low byte."""
    if rest[0] % 4:
        raise ValueError(f"{rest[0]} features (channels) is not a multiple of 4")
    m = batch_var()
    xq = te.placeholder(shape64(m, *rest), "int8", "XQ")

    def word(a, w, *idx):
        out = None
        for j in range(4):
            byte = xq[(a, w * 4 + j, *idx)].astype("int32") & tirx.const(255, "int32")
            part = byte << tirx.const(8 * j, "int32") if j else byte
            out = part if out is None else out | part
        return out

    x4 = te.compute(shape64(m, rest[0] // 4, *rest[1:]), word, name="X4")
    return te.create_prim_func([xq, x4]).with_attr("global_symbol", "main")


def _dot(a: tirx.PrimExpr, b: tirx.PrimExpr) -> tirx.PrimExpr:
    return tirx.call_pure_extern("int32", DP4A, a, b, tirx.const(0, "int32"))


def dp4a_conv_func(spec: ConvSpec) -> tirx.PrimFunc:
    """The int8 conv of :func:`bitcompiler.kernels.conv2d_kernel` on ``__dp4a``. Buffers: ``X4 int32
    (M, C/4, H, W)`` (:func:`pack4_func`), ``XS f32 (M,)``, ``W4 int32 (O, KH, KW, C/4)``, then
    its epilogue's (``TS, TH`` or ``SC, OF, BI``) and ``Y``; the same epilogue expression."""
    from bitcompiler.kernels.conv import _output

    if not conv_fits(spec):
        raise ValueError(f"no dp4a conv kernel for {spec}")
    c4, o, h, w = spec.in_channels // 4, spec.out_channels, spec.in_h, spec.in_w
    (kh_, kw_), (sh, sw), (ph, pw), (dh, dw) = spec.kernel, spec.stride, spec.padding, spec.dilation
    m = batch_var()
    x4 = te.placeholder(shape64(m, c4, h, w), "int32", "X4")
    xs = te.placeholder(shape64(m), F32, "XS")
    w4 = te.placeholder(shape64(o, kh_, kw_, c4), "int32", "W4")
    kh, kw, c = (te.reduce_axis((i64(0), i64(n)), name) for n, name in ((kh_, "kh"), (kw_, "kw"), (c4, "c")))

    def window(a, oh, ow, weight):
        ih, iw = oh * sh - ph + kh.var * dh, ow * sw - pw + kw.var * dw
        valid = tirx.all(ih >= 0, ih < h, iw >= 0, iw < w)
        t = tirx.if_then_else(valid, _dot(x4[a, c.var, ih, iw], weight), tirx.const(0, "int32"))
        return te.sum(t, axis=[kh, kw, c])

    acc = te.compute(
        shape64(m, o, spec.out_h, spec.out_w),
        lambda a, b, oh, ow: window(a, oh, ow, w4[b, kh.var, kw.var, c.var]),
        name="acc",
    )
    sumx = None
    if spec.has_offset and not spec.threshold:  # the codes' sum over the window: a dot with 1,1,1,1
        ones = tirx.const(0x01010101, "int32")
        sumx = te.compute(
            shape64(m, 1, spec.out_h, spec.out_w), lambda a, _g, oh, ow: window(a, oh, ow, ones), name="sumx"
        )
    epi, y = _output(
        spec,
        m,
        lambda a, b, oh, ow: acc[a, b, oh, ow],
        (lambda a, _b, oh, ow: sumx[a, 0, oh, ow]) if sumx is not None else None,
        xs,
    )
    return te.create_prim_func([x4, xs, w4, *epi, y]).with_attr("global_symbol", "main")


def dp4a_dense_func(spec: DenseSpec) -> tirx.PrimFunc:
    """Buffers: ``X4 int32 (M, K/4), XS f32 (M,), W4 int32 (N, K/4)``, ``SX int32 (M,)`` (the sum of
    the activation codes, only when :func:`needs_sumx`), then ``TS, TH`` or ``SC, OF, BI``, ``Y``."""
    if not dp4a_fits(spec):
        raise ValueError(f"no dp4a kernel for {spec}")
    n, kw = spec.out_features, spec.in_features // 4
    m = batch_var()
    x4 = te.placeholder(shape64(m, kw), "int32", "X4")
    xs = te.placeholder(shape64(m), F32, "XS")
    w4 = te.placeholder(shape64(n, kw), "int32", "W4")
    sx = te.placeholder(shape64(m), "int32", "SX") if needs_sumx(spec) else None
    w = te.reduce_axis((i64(0), i64(kw)), "w")
    acc = te.compute(shape64(m, n), lambda a, b: te.sum(_dot(x4[a, w], w4[b, w]), axis=[w]), name="acc")
    if spec.threshold:
        epi, y = threshold_output(m, n, lambda a, b: acc[a, b])
    else:
        sc, of, bi = (te.placeholder(shape64(n), F32, name) for name in ("SC", "OF", "BI"))
        epi = [sc, of, bi]

        def out(a, b):  # the plane-reading kernel's epilogue, operation for operation
            v = (sc[b] * xs[a]) * acc[a, b].astype(F32)
            if sx is not None:
                v = v + (of[b] * xs[a]) * sx[a].astype(F32)
            return v + bi[b]

        y = te.compute(shape64(m, n), out, name="Y")
    args = [x4, xs, w4, *([sx] if sx is not None else []), *epi, y]
    return te.create_prim_func(args).with_attr("global_symbol", "main")
