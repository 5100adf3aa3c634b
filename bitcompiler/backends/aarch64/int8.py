"""int8-activation dense layers on aarch64: weights as one byte per weight, NEON dot products.

The portable TIR kernel of a ``bitc::bit_linear`` with ``act="int8"`` reads the weight bit-planes
and adds ``x[k] << b`` per set bit, plane by plane: 8 planes cost about 30 instructions a weight.
Here the codes ``Q[n, k]`` (numerics: ``pm1`` in {-1, +1}, ``uint`` in 0..2^B-1) are stored as
int8 (``Q - 128`` when a code exceeds 127; the kernel adds ``128 * sumx`` back, an exact integer
identity), and ``acc = sum_k Q[n,k] x[k]`` runs on NEON: ``sdot`` on cores with the dot-product
extension (A76), else ``smull`` + ``smlal2`` (two products fit int16) + ``sadalp``. The epilogue is
the numerics' float formula in its order, or the integer threshold.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from bitcompiler import ops
from bitcompiler.backends.cortex_m.aot import _Builder
from bitcompiler.backends.cortex_m.kernel_c import Kernel, KernelParam
from bitcompiler.quant.numerics import planes_to_code

PRELUDE = """
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


def dense_source(symbol: str, rows: int, k: int, n: int, shift: bool, threshold: bool) -> str:
    """The C kernel: ``XQ (rows, K) int8, XS (rows,), W (N*K) int8, epilogue args, Y (rows, N)``."""
    if threshold:
        epi_params = "int32_t* TS, int32_t* TH"
        out = "Y[m * %(n)d + j] = ((int64_t)TS[j] * acc >= (int64_t)TH[j]) ? 1.0f : -1.0f;"
    else:
        epi_params = "float* SC, float* OF, float* BI"
        out = "Y[m * %(n)d + j] = (((SC[j] * XS[m]) * (float)acc) + ((OF[j] * XS[m]) * (float)sumx)) + BI[j];"
    fix = "acc += 128 * sumx; /* codes stored as Q - 128 */" if shift else ""
    return f"""
BITC_KERNEL void {symbol}(int8_t* XQ, float* XS, int8_t* W, {epi_params}, float* Y) {{
  for (int32_t m = 0; m < {rows}; ++m) {{
    const int8_t *x = XQ + m * {k};
    int32_t sumx = 0;
    for (int32_t i = 0; i < {k}; ++i) sumx += x[i];
    for (int32_t j = 0; j < {n}; ++j) {{
      int32_t acc = bitc_dot_s8(W + j * {k}, x, {k});
      {fix}
      {out % {"n": n}}
    }}
  }}
}}
"""


class Builder(_Builder):
    """The Cortex-M AOT walker with int8-activation dense layers on byte codes."""

    def bit_linear(self, node: torch.fx.Node, out_shape: tuple) -> None:
        call = ops.bind(node)
        a: ops.BitLinearAttrs = call.attrs
        if a.act != "int8":
            return super().bit_linear(node, out_shape)
        x = self.tensors[call.x.name]
        rows = math.prod(x.shape[:-1])
        planes = self.state[self.param_of[call.tensors["planes"].name]].detach().cpu()
        q = planes_to_code(planes, a.k, a.code).numpy()  # (N, K) int64
        n = int(q.shape[0])
        shift = bool(q.max() > 127)
        codes = (q - 128 if shift else q).astype(np.int8)
        layer = self.param_of[call.tensors["planes"].name].rpartition(".")[0] or "weights"
        base = self.param_of[call.tensors["planes"].name].replace(".", "_").removesuffix("_planes")
        w = self.constant(f"bitc_w_{base}_codes", codes.reshape(-1), layer)
        act_args = self.quantized_input(x, a.act, rows, (a.k,), None)
        t = call.tensors
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


def split_kernels(kernels: list[Kernel]) -> tuple[list[Kernel], list[str]]:
    """TVM kernels (a PrimFunc) and C kernels (their source)."""
    return [k for k in kernels if not isinstance(k.func, str)], [
        k.func for k in kernels if isinstance(k.func, str)
    ]
