"""Dense layers with int8 or float activations on aarch64, in hand-written NEON C.

**int8 activations**: weights as one byte per weight, NEON dot products.

The portable TIR kernel of a ``bitc::bit_linear`` with ``act="int8"`` reads the weight bit-planes
and adds ``x[k] << b`` per set bit, plane by plane: 8 planes cost about 30 instructions a weight.
Here the codes ``Q[n, k]`` (numerics: ``pm1`` in {-1, +1}, ``uint`` in 0..2^B-1) are stored as
int8 (``Q - 128`` when a code exceeds 127; the kernel adds ``128 * sumx`` back, an exact integer
identity), and ``acc = sum_k Q[n,k] x[k]`` runs on NEON: ``sdot`` on cores with the dot-product
extension (A76), else ``smull`` + ``smlal2`` (two products fit int16) + ``sadalp``. The epilogue is
the numerics' float formula in its order, or the integer threshold.

**float activations, 1-bit weights** (``pm1``): ``acc = sum of x[k] over the set bits`` as the
portable kernel computes it, but four inputs a step: each nibble of a weight word selects a
16-byte lane mask from a table, ``and`` keeps the inputs whose bit is set, ``fadd`` sums them in
eight float lanes; then ``y = scale * (2 acc - sumx) + bias``. Float sums in another order: equal
to the reference within float32 rounding, like the portable kernel.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from bitcompiler import ops
from bitcompiler.backends.cortex_m.aot import _Builder
from bitcompiler.backends.cortex_m.kernel_c import Kernel, KernelParam
from bitcompiler.quant.numerics import code_center, planes_to_code

PRELUDE = """
/* sum over k < n of w[k] * x[k], int8 codes x float; four float lanes per 4 codes */
static inline float bitc_dot_s8f(const int8_t *w, const float *x, int32_t n) {
  int32_t k = 0;
  float acc = 0.0f;
#if defined(__aarch64__)
  float32x4_t a0 = vdupq_n_f32(0.0f), a1 = vdupq_n_f32(0.0f), a2 = vdupq_n_f32(0.0f), a3 = vdupq_n_f32(0.0f);
  for (; k + 16 <= n; k += 16) {
    int8x16_t c = vld1q_s8(w + k);
    int16x8_t lo = vmovl_s8(vget_low_s8(c)), hi = vmovl_high_s8(c);
    a0 = vfmaq_f32(a0, vcvtq_f32_s32(vmovl_s16(vget_low_s16(lo))), vld1q_f32(x + k));
    a1 = vfmaq_f32(a1, vcvtq_f32_s32(vmovl_high_s16(lo)), vld1q_f32(x + k + 4));
    a2 = vfmaq_f32(a2, vcvtq_f32_s32(vmovl_s16(vget_low_s16(hi))), vld1q_f32(x + k + 8));
    a3 = vfmaq_f32(a3, vcvtq_f32_s32(vmovl_high_s16(hi)), vld1q_f32(x + k + 12));
  }
  acc = vaddvq_f32(vaddq_f32(vaddq_f32(a0, a1), vaddq_f32(a2, a3)));
#endif
  for (; k < n; ++k) acc += (float)w[k] * x[k];
  return acc;
}

/* lane i of entry v: all ones when bit i of v is set */
static const uint32_t bitc_nibble_masks[16][4] __attribute__((aligned(16))) = {
  {0, 0, 0, 0}, {~0u, 0, 0, 0}, {0, ~0u, 0, 0}, {~0u, ~0u, 0, 0},
  {0, 0, ~0u, 0}, {~0u, 0, ~0u, 0}, {0, ~0u, ~0u, 0}, {~0u, ~0u, ~0u, 0},
  {0, 0, 0, ~0u}, {~0u, 0, 0, ~0u}, {0, ~0u, 0, ~0u}, {~0u, ~0u, 0, ~0u},
  {0, 0, ~0u, ~0u}, {~0u, 0, ~0u, ~0u}, {0, ~0u, ~0u, ~0u}, {~0u, ~0u, ~0u, ~0u},
};

/* sum of x[i] over the set bits i of the packed words p, i < n */
static inline float bitc_masked_sum(const int32_t *p, const float *x, int32_t n) {
  int32_t i = 0;
  float acc = 0.0f;
#if defined(__aarch64__)
  float32x4_t a0 = vdupq_n_f32(0.0f), a1 = vdupq_n_f32(0.0f);
  for (; i + 32 <= n; i += 32) {
    uint32_t w = (uint32_t)p[i / 32];
    for (int32_t j = 0; j < 8; j += 2) {
      uint32x4_t m0 = vld1q_u32(bitc_nibble_masks[(w >> (4 * j)) & 15u]);
      uint32x4_t m1 = vld1q_u32(bitc_nibble_masks[(w >> (4 * j + 4)) & 15u]);
      a0 = vaddq_f32(a0, vreinterpretq_f32_u32(vandq_u32(vreinterpretq_u32_f32(vld1q_f32(x + i + 4 * j)), m0)));
      a1 = vaddq_f32(a1, vreinterpretq_f32_u32(vandq_u32(vreinterpretq_u32_f32(vld1q_f32(x + i + 4 * j + 4)), m1)));
    }
  }
  acc = vaddvq_f32(vaddq_f32(a0, a1));
#endif
  for (; i < n; ++i)
    if (((uint32_t)p[i / 32] >> (i % 32)) & 1u) acc += x[i];
  return acc;
}

/* sum over k < n of w[k] * x[k], int8 x int8 -> int32 */
static inline int32_t bitc_dot_s8(const int8_t *w, const int8_t *x, int32_t n) {
  int32_t k = 0, acc = 0;
#if defined(__aarch64__)
  int32x4_t s0 = vdupq_n_s32(0), s1 = vdupq_n_s32(0);
  for (; k + 32 <= n; k += 32) {
    int8x16_t w0 = vld1q_s8(w + k), w1 = vld1q_s8(w + k + 16);
    int8x16_t x0 = vld1q_s8(x + k), x1 = vld1q_s8(x + k + 16);
#if defined(__ARM_FEATURE_DOTPROD)
    s0 = vdotq_s32(s0, w0, x0);
    s1 = vdotq_s32(s1, w1, x1);
#else /* |w x| <= 128 * 127: two products fit int16 */
    s0 = vpadalq_s16(s0, vmlal_high_s8(vmull_s8(vget_low_s8(w0), vget_low_s8(x0)), w0, x0));
    s1 = vpadalq_s16(s1, vmlal_high_s8(vmull_s8(vget_low_s8(w1), vget_low_s8(x1)), w1, x1));
#endif
  }
  acc = vaddvq_s32(vaddq_s32(s0, s1));
#endif
  for (; k < n; ++k) acc += (int32_t)w[k] * (int32_t)x[k];
  return acc;
}
"""


def _rows_kernel(symbol: str, params: str, rows: int, k: int, n: int, x: tuple[str, str], body: tuple) -> str:
    """A C kernel over ``rows`` rows of K inputs (``x``: their C type and buffer) and N outputs:
    per row ``sumx``, the sum of its inputs, then per output ``acc = dot`` (``body``: the C type
    of ``acc`` and ``sumx``, the dot product, a fix-up line, the output line)."""
    ctype, buf = x
    acc_t, dot, fix, out = body
    zero = "0" if acc_t == "int32_t" else "0.0f"
    return f"""
BITC_KERNEL void {symbol}({params}, float* Y) {{
  for (int32_t m = 0; m < {rows}; ++m) {{
    const {ctype} *x = {buf} + m * {k};
    {acc_t} sumx = {zero};
    for (int32_t i = 0; i < {k}; ++i) sumx += x[i];
    for (int32_t j = 0; j < {n}; ++j) {{
      {acc_t} acc = {dot};
      {fix}
      Y[m * {n} + j] = {out};
    }}
  }}
}}
"""


def dense_source(symbol: str, rows: int, k: int, n: int, shift: bool, threshold: bool) -> str:
    """The C kernel: ``XQ (rows, K) int8, XS (rows,), W (N*K) int8, epilogue args, Y (rows, N)``."""
    if threshold:
        epi_params = "int32_t* TS, int32_t* TH"
        out = "((int64_t)TS[j] * acc >= (int64_t)TH[j]) ? 1.0f : -1.0f"
    else:
        epi_params = "float* SC, float* OF, float* BI"
        out = "(((SC[j] * XS[m]) * (float)acc) + ((OF[j] * XS[m]) * (float)sumx)) + BI[j]"
    fix = "acc += 128 * sumx; /* codes stored as Q - 128 */" if shift else ""
    params = f"int8_t* XQ, float* XS, int8_t* W, {epi_params}"
    body = ("int32_t", f"bitc_dot_s8(W + j * {k}, x, {k})", fix, out)
    return _rows_kernel(symbol, params, rows, k, n, ("int8_t", "XQ"), body)


def float_codes_source(symbol: str, rows: int, k: int, n: int, shift: bool, center: int) -> str:
    """The C kernel: ``X (rows, K) float, W (N*K) int8 codes, SC, OF, BI, Y (rows, N)``. The codes
    are ``Q - center`` with the offset ``OF + center·SC`` (``numerics.code_center``: nothing cancels),
    or with ``shift`` (codes above 127 and no offset) ``Q - 128`` added back as ``128·sumx``."""
    of = f"(OF[j] + (SC[j] * {float(center)!r}f))" if center else "OF[j]"
    fix = "acc += 128.0f * sumx; /* codes stored as Q - 128 */" if shift else ""
    out = f"((SC[j] * acc) + ({of} * sumx)) + BI[j]"
    body = ("float", f"bitc_dot_s8f(W + j * {k}, x, {k})", fix, out)
    return _rows_kernel(
        symbol, "float* X, int8_t* W, float* SC, float* OF, float* BI", rows, k, n, ("float", "X"), body
    )


def float_pm1_source(symbol: str, rows: int, k: int, n: int) -> str:
    """The C kernel: ``X (rows, K) float, P (N, KW) packed signs, SC, OF, BI, Y (rows, N)``."""
    kw = (k + 31) // 32
    body = ("float", f"bitc_masked_sum(P + j * {kw}, x, {k})", "", "(SC[j] * ((acc * 2.0f) - sumx)) + BI[j]")
    return _rows_kernel(
        symbol, "float* X, int32_t* P, float* SC, float* OF, float* BI", rows, k, n, ("float", "X"), body
    )


class Builder(_Builder):
    """The Cortex-M AOT walker with NEON C kernels for int8- and float-activation dense layers."""

    def float_pm1(self, node: torch.fx.Node, call: ops.BoundCall, out_shape: tuple) -> None:
        a: ops.BitLinearAttrs = call.attrs
        x = self.tensors[call.x.name]
        rows = math.prod(x.shape[:-1])
        n = int(call.tensors["planes"].meta["val"].shape[1])
        key = ("dense_float_pm1", a.k, n, rows)
        if key not in self.kernels:
            symbol = f"bitc_dense_float_pm1_{a.k}x{n}_{len(self.kernels)}"
            params = (
                KernelParam("X", "float32", (rows, a.k)),
                KernelParam("P", "int32", (1, n, (a.k + 31) // 32)),
                *(KernelParam(p, "float32", (n,)) for p in ("SC", "OF", "BI")),
                KernelParam("Y", "float32", (rows, n)),
            )
            self.kernels[key] = Kernel(symbol, params, float_pm1_source(symbol, rows, a.k, n))
        y = self.new_tensor(node.name, out_shape, "float32")
        self.call(
            self.kernels[key], [x.name, *self.epilogue_args(call), y.name], [x.name], [y.name], node.name
        )

    def bit_linear(self, node: torch.fx.Node, out_shape: tuple) -> None:
        call = ops.bind(node)
        a: ops.BitLinearAttrs = call.attrs
        if a.float_signs:
            return self.float_pm1(node, call, out_shape)
        if a.act not in ("int8", "float") or a.threshold:
            return super().bit_linear(node, out_shape)
        x = self.tensors[call.x.name]
        rows = math.prod(x.shape[:-1])
        planes = self.state[self.param_of[call.tensors["planes"].name]].detach().cpu()
        q = planes_to_code(planes, a.k, a.code).numpy()  # (N, K) int64
        n = int(q.shape[0])
        center = code_center(planes.shape[0], a.code, a.act, a.has_offset)
        shift = bool(q.max() > 127) and not center
        codes = (q - 128 if shift else q - center).astype(np.int8)
        layer = self.param_of[call.tensors["planes"].name].rpartition(".")[0] or "weights"
        base = self.param_of[call.tensors["planes"].name].replace(".", "_").removesuffix("_planes")
        w = self.constant(f"bitc_w_{base}_codes", codes.reshape(-1), layer)
        act_args = self.quantized_input(x, a.act, rows, (a.k,), None)
        t = call.tensors
        if a.act == "float":
            key: tuple = ("dense_float_codes", a.k, n, rows, shift, center)
            if key not in self.kernels:
                symbol = f"bitc_dense_float_codes_{a.k}x{n}_{len(self.kernels)}"
                params = (
                    KernelParam("X", "float32", (rows, a.k)),
                    KernelParam("W", "int8", (n * a.k,)),
                    *(KernelParam(p, "float32", (n,)) for p in ("SC", "OF", "BI")),
                    KernelParam("Y", "float32", (rows, n)),
                )
                self.kernels[key] = Kernel(
                    symbol, params, float_codes_source(symbol, rows, a.k, n, shift, center)
                )
            epi = [self.weight(t[name], "float32") for name in ("scale", "offset", "bias")]
            y = self.new_tensor(node.name, out_shape, "float32")
            self.call(self.kernels[key], [x.name, w, *epi, y.name], [x.name], [y.name], node.name)
            return None
        epi_params: tuple[KernelParam, ...]
        if a.threshold:
            epi = [self.weight(t["thr_sign"], "int32"), self.weight(t["thr"], "int32")]
            epi_params = (KernelParam("TS", "int32", (n,)), KernelParam("TH", "int32", (n,)))
        else:
            epi = [self.weight(t[name], "float32") for name in ("scale", "offset", "bias")]
            epi_params = tuple(KernelParam(p, "float32", (n,)) for p in ("SC", "OF", "BI"))
        key = ("dense_codes", a.k, n, rows, shift, bool(a.threshold))
        if key not in self.kernels:
            symbol = f"bitc_dense_int8_codes_{a.k}x{n}_{len(self.kernels)}"
            params = (
                KernelParam("XQ", "int8", (rows, a.k)),
                KernelParam("XS", "float32", (rows,)),
                KernelParam("W", "int8", (n * a.k,)),
                *epi_params,
                KernelParam("Y", "float32", (rows, n)),
            )
            self.kernels[key] = Kernel(symbol, params, dense_source(symbol, rows, a.k, n, shift, a.threshold))
        y = self.new_tensor(node.name, out_shape, "float32")
        self.call(self.kernels[key], [*act_args, w, *epi, y.name], act_args, [y.name], node.name)
        return None
