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
"""

from __future__ import annotations

import numpy as np
from tvm import te, tirx

from bitcompiler.kernels._common import batch_var, i64, shape64, threshold_output
from bitcompiler.kernels.spec import DenseSpec

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


def dp4a_codes(planes: np.ndarray, spec: DenseSpec) -> np.ndarray:
    """Bit-planes ``P (B, N, KW)`` -> ``W4 int32 (N, K/4)``: each row's codes as signed bytes."""
    if not dp4a_fits(spec):
        raise ValueError(f"no dp4a kernel for {spec}")
    k = spec.in_features
    words = np.ascontiguousarray(planes, dtype=np.int32).view(np.uint32)
    bits = (words[..., None] >> np.arange(32, dtype=np.uint32)) & 1  # (B, N, KW, 32)
    bits = bits.reshape(*planes.shape[:2], -1)[..., :k].astype(np.int16)
    if spec.code == "pm1":
        codes = 2 * bits[0] - 1
    else:
        codes = sum(bits[i] << i for i in range(spec.bits))
    return np.ascontiguousarray(np.asarray(codes, dtype=np.int8)).view(np.int32)


def pack4_func(k: int) -> tirx.PrimFunc:
    """``XQ int8 (M, K) -> X4 int32 (M, K/4)``: four codes to a word, the first in the low byte."""
    if k % 4:
        raise ValueError(f"K={k} is not a multiple of 4")
    m = batch_var()
    xq = te.placeholder(shape64(m, k), "int8", "XQ")

    def word(a, w):
        out = None
        for j in range(4):
            byte = xq[a, w * 4 + j].astype("int32") & tirx.const(255, "int32")
            part = byte << tirx.const(8 * j, "int32") if j else byte
            out = part if out is None else out | part
        return out

    x4 = te.compute(shape64(m, k // 4), word, name="X4")
    return te.create_prim_func([xq, x4]).with_attr("global_symbol", "main")


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
    zero = tirx.const(0, "int32")
    acc = te.compute(
        shape64(m, n),
        lambda a, b: te.sum(tirx.call_pure_extern("int32", DP4A, x4[a, w], w4[b, w], zero), axis=[w]),
        name="acc",
    )
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
