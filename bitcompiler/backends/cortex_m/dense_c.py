"""Dense layers with int8 or float activations on Cortex-M, in hand-written C.

The portable TIR kernel of a ``bitc::bit_linear`` reads the weight bit-planes: with int8
activations it adds ``x[k] << b`` per set bit, plane by plane (about 30 instructions a weight at
8 bits), and with float activations it adds ``x[k]`` per set bit. These kernels replace both.

**int8 activations** (any code that fits a byte: ``uniform:bits<=8``, the default scheme's first
and last layers). The codes ``Q[n, k]`` are stored as int8 (``Q - 128`` when a code exceeds 127;
the kernel adds ``128 * sumx`` back, an exact integer identity), four rows at a time in the order
the kernel reads them, and ``acc = sum_k Q[n,k] x[k]`` is an exact int32 sum on every core:

* ``dsp`` (M4, M7, M33-class): the activations are unpacked once per sample into 16-bit pairs
  ``(x0, x2), (x1, x3)`` as CMSIS does (``SXTB16`` and ``SXTB16`` of the word rotated by 8);
  each weight word of four codes then costs one load, two ``SXTB16`` and two ``SMLAD`` (dual
  16-bit multiply-accumulates), with the activation pairs shared by four rows;
* ``mve`` (M55, Helium): 16 codes a step, ``VMLADAVA.S8`` per row, the activation vector shared
  by four rows, the tail predicated (``VCTP8``);
* ``scalar`` (M3): a plain ``MLA`` loop over the same stored order.

**float activations, 1-bit weights** (``pm1``, no offset): a table of partial sums over groups
of 8 inputs, shared by all output rows (T-MAC style). For each chunk of up to 8 groups the
kernel builds ``T[b][g]`` = the sum of the inputs of group ``g`` whose bit is set in ``b``
(256 entries a group: two 16-entry half tables added), then each row adds one table entry per
group: a byte load, an address, a float load and an add per 8 weights, no per-weight branch.
``y = scale * (2 acc - sumx) + bias``. Float sums in another order than the reference's: equal
within float32 rounding, like the portable kernel.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from bitcompiler import ops
from bitcompiler.backends.cortex_m.aot import _Builder
from bitcompiler.backends.cortex_m.kernel_c import Kernel, KernelParam
from bitcompiler.quant.numerics import planes_to_code
from bitcompiler.quant.numerics.core import EPS

PRELUDE = """
#if defined(__ARM_FEATURE_MVE)
#include <arm_mve.h>
/* bit counts of the 32 nibbles of v (each 0..4) */
static inline uint8x16_t bitc_nibble_counts_v(uint8x16_t v) {
  v = vsubq_u8(v, vandq_u8(vshrq_n_u8(v, 1), vdupq_n_u8(0x55)));
  return vaddq_u8(vandq_u8(v, vdupq_n_u8(0x33)), vandq_u8(vshrq_n_u8(v, 2), vdupq_n_u8(0x33)));
}
/* acc + the sum of the nibbles of n (each at most 15) */
static inline uint32_t bitc_nibbles_acc_v(uint32_t acc, uint8x16_t n) {
  return vaddvaq_u8(acc, vandq_u8(vaddq_u8(n, vshrq_n_u8(n, 4)), vdupq_n_u8(0x0F)));
}
#endif
/* the 32 bits at p in a float register (one VLDR: a may_alias float read of the int32 word) */
typedef float bitc_float_alias __attribute__((may_alias));
static inline float bitc_word_float(const int32_t *p) { return *(const bitc_float_alias *)p; }
#if defined(__ARM_FP)
/* v rounded to the nearest integer, ties to even (the FPSCR default), as int32: one VCVTR */
static inline int32_t bitc_round_s32(float v) {
  float r;
  __asm("vcvtr.s32.f32 %0, %1" : "=t"(r) : "t"(v));
  int32_t i;
  __builtin_memcpy(&i, &r, 4);
  return i;
}
/* the low / high half float of a word held in a float register, widened: one VCVTB / VCVTT */
static inline float bitc_f16_lo(float w) {
  float r;
  __asm("vcvtb.f32.f16 %0, %1" : "=t"(r) : "t"(w));
  return r;
}
static inline float bitc_f16_hi(float w) {
  float r;
  __asm("vcvtt.f32.f16 %0, %1" : "=t"(r) : "t"(w));
  return r;
}
#else /* host builds (sanitizers): the same in C */
static inline float bitc_half(uint32_t h) {
  uint32_t e = (h >> 10) & 31u, m = h & 1023u, bits;
  if (e == 0) {
    float v = (float)m * (1.0f / 16777216.0f);
    return (h & 0x8000u) ? -v : v;
  }
  bits = ((h & 0x8000u) << 16) | (e == 31 ? 0x7F800000u : (e + 112u) << 23) | (m << 13);
  float f;
  __builtin_memcpy(&f, &bits, 4);
  return f;
}
static inline float bitc_f16_lo(float w) {
  uint32_t u;
  __builtin_memcpy(&u, &w, 4);
  return bitc_half(u & 0xFFFFu);
}
static inline float bitc_f16_hi(float w) {
  uint32_t u;
  __builtin_memcpy(&u, &w, 4);
  return bitc_half(u >> 16);
}
/* nearbyintf, clamped to the int8 range first */
static inline int32_t bitc_round_s32(float v) {
  v = nearbyintf(v);
  return (int32_t)(v < -128.0f ? -128.0f : v > 127.0f ? 127.0f : v);
}
#endif
#if defined(__ARM_FEATURE_DSP)
#include <arm_acle.h>
/* One step of four rows: a_r += codes(row r, 4 inputs) . x, the codes of the four rows in one
   stored run at w, the activations as the pairs (x0, x2), (x1, x3) at xu. In asm because gcc 12
   spills the unrolled loop's pointers and has no ACLE __ror to fold into SXTB16's rotation: one
   LDR, two SXTB16 and two SMLAD a row, 21 instructions for 16 multiply-accumulates. */
#define BITC_SMLAD_4ROWS(A0, A1, A2, A3, W, XU)                                              \\
  do {                                                                                       \\
    int32_t xa_, xb_, c_, t_;                                                                \\
    __asm("ldrd %[xa], %[xb], [%[xu]], #8\\n\\t" BITC_SMLAD_ROW(a0) BITC_SMLAD_ROW(a1)          \\
              BITC_SMLAD_ROW(a2) BITC_SMLAD_ROW(a3)                                          \\
          : [a0] "+r"(A0), [a1] "+r"(A1), [a2] "+r"(A2), [a3] "+r"(A3), [w] "+r"(W),         \\
            [xu] "+r"(XU), [xa] "=&r"(xa_), [xb] "=&r"(xb_), [c] "=&r"(c_), [t] "=&r"(t_)    \\
          :                                                                                  \\
          : "memory");                                                                       \\
  } while (0)
#define BITC_SMLAD_ROW(a)                                                                      \\
  "ldr %[c], [%[w]], #4\\n\\t"                                                                   \\
  "sxtb16 %[t], %[c]\\n\\t"                                                                      \\
  "smlad %[" #a "], %[t], %[xa], %[" #a "]\\n\\t"                                                \\
  "sxtb16 %[c], %[c], ror #8\\n\\t"                                                              \\
  "smlad %[" #a "], %[c], %[xb], %[" #a "]\\n\\t"
#else /* host builds (sanitizers): the same sums in C */
static inline int32_t bitc_smlad_row(int32_t c, int32_t xa, int32_t xb, int32_t a) {
  a += (int32_t)(int8_t)c * (int16_t)xa + (int32_t)(int8_t)(c >> 16) * (int16_t)(xa >> 16);
  return a + (int32_t)(int8_t)(c >> 8) * (int16_t)xb + (int32_t)(int8_t)(c >> 24) * (int16_t)(xb >> 16);
}
#define BITC_SMLAD_4ROWS(A0, A1, A2, A3, W, XU)                                              \\
  do {                                                                                       \\
    int32_t xa_ = (XU)[0], xb_ = (XU)[1];                                                    \\
    A0 = bitc_smlad_row((W)[0], xa_, xb_, A0);                                               \\
    A1 = bitc_smlad_row((W)[1], xa_, xb_, A1);                                               \\
    A2 = bitc_smlad_row((W)[2], xa_, xb_, A2);                                               \\
    A3 = bitc_smlad_row((W)[3], xa_, xb_, A3);                                               \\
    (XU) += 2;                                                                               \\
    (W) += 4;                                                                                \\
  } while (0)
#endif
"""

ROWS = 4  # output rows a weight block holds (and the kernels accumulate at once)
BINARY_C = ("mve", "dsp")  # the cores whose W1A1 dense runs the C kernel (else the TIR one)
TABLE_GROUPS = 8  # groups of 8 inputs whose tables one chunk of the float kernel holds


def int8_block(isa: str) -> int:
    """Codes per row in one stored block: 16 (a Helium vector) or 4 (a 32-bit word)."""
    return 16 if isa == "mve" else 4


def store_int8_codes(codes: np.ndarray, block: int) -> np.ndarray:
    """``(N, K)`` int8 codes -> the kernel's order ``[N/4][K/block][4 rows][block]``, zero padded."""
    n, k = codes.shape
    np_, kp = -(-n // ROWS) * ROWS, -(-k // block) * block
    padded = np.zeros((np_, kp), np.int8)
    padded[:n, :k] = codes
    return padded.reshape(np_ // ROWS, ROWS, kp // block, block).transpose(0, 2, 1, 3).reshape(-1)


def store_sign_bytes(planes: np.ndarray, k: int) -> np.ndarray:
    """1-bit pm1 planes ``(1, N, KW)`` int32 -> bytes ``[chunk][N][groups of the chunk]``: byte
    ``g`` of a row holds the signs of inputs ``8g .. 8g+7`` (bit set: ``+1``)."""
    n = planes.shape[1]
    groups = -(-k // 8)
    data = np.ascontiguousarray(planes[0].astype("<i4")).view(np.uint8).reshape(n, -1)[:, :groups]
    chunks = [data[:, c : c + TABLE_GROUPS] for c in range(0, groups, TABLE_GROUPS)]
    return np.concatenate([c.reshape(-1) for c in chunks])


def _epilogue(threshold: bool) -> tuple[str, str]:
    """C parameters and the store of output ``n`` from ``acc`` (the numerics' formula, in order)."""
    if threshold:
        return "int32_t* TS, int32_t* TH", "((int64_t)TS[n] * acc >= (int64_t)TH[n]) ? 1.0f : -1.0f"
    return (
        "float* SC, float* OF, float* BI",
        "(((SC[n] * XS[m]) * (float)acc) + ((OF[n] * XS[m]) * (float)sumx)) + BI[n]",
    )


def _row_accumulators(isa: str, k: int) -> list[str]:
    """C lines: ``a0..a3 += codes(rows) . x`` over one block row, ``w`` advancing."""
    if isa == "mve":
        full, tail = divmod(k, 16)
        lines = [f"for (int32_t i = 0; i < {full}; ++i) {{", "  int8x16_t vx = vldrbq_s8(x + 16 * i);"]
        lines += [f"  a{r} = vmladavaq_s8(a{r}, vx, vldrbq_s8(w + {16 * r}));" for r in range(ROWS)]
        lines += ["  w += 64;", "}"]
        if tail:
            lines += [f"{{ int8x16_t vx = vldrbq_z_s8(x + {16 * full}, vctp8q({tail}));"]
            lines += [f"  a{r} = vmladavaq_s8(a{r}, vx, vldrbq_s8(w + {16 * r}));" for r in range(ROWS)]
            lines += ["  w += 64; }"]
        return lines
    words = -(-k // 4)
    if isa == "dsp":
        lines = ["const int32_t *xu = XU, *ww = (const int32_t*)w;"]
        lines += [f"#pragma GCC unroll {math.gcd(words, 2)}", f"for (int32_t i = 0; i < {words}; ++i)"]
        lines += ["  BITC_SMLAD_4ROWS(a0, a1, a2, a3, ww, xu);"]
        return [*lines, f"w += {words * ROWS * 4};"]
    lines = ["const int32_t *xu = XU;", f"for (int32_t i = 0; i < {words}; ++i, xu += 4, w += 16) {{"]
    for j in range(4):
        lines.append(f"  {{ int32_t xj = xu[{j}];")
        lines += [f"    a{r} += (int32_t)w[{4 * r + j}] * xj;" for r in range(ROWS)]
        lines.append("  }")
    return [*lines, "}"]


def _binary_row(isa: str, kw: int) -> list[str]:
    """C lines: ``a`` = the mismatching bits of the packed activations ``x`` and the row ``p``."""
    if isa != "mve":
        words = [f"x[{w}] ^ p[{w}]" for w in range(kw)]
        lines = []
        for i in range(0, kw, 3):  # three words' nibble counts share one byte fold
            group = words[i : i + 3]
            call = f"bitc_popcount_acc{len(group)}(a, {', '.join(group)})" if len(group) > 1 else None
            lines.append(f"a = {call or f'a + bitc_popcount({group[0]})'};")
        return lines
    vectors, tail = divmod(kw, 4)
    loads = [
        f"veorq_u32(vldrwq_u32((const uint32_t*)x + {4 * v}), vldrwq_u32((const uint32_t*)p + {4 * v}))"
        for v in range(vectors)
    ]
    if tail:  # both zeroed past the row: no mismatch
        pred = f"vctp32q({tail})"
        loads.append(
            f"veorq_u32(vldrwq_z_u32((const uint32_t*)x + {4 * vectors}, {pred}), "
            f"vldrwq_z_u32((const uint32_t*)p + {4 * vectors}, {pred}))"
        )
    lines = []
    for i in range(0, len(loads), 3):  # three vectors' nibble counts (<= 12) before the fold
        terms = [f"bitc_nibble_counts_v(vreinterpretq_u8_u32({v}))" for v in loads[i : i + 3]]
        total = terms[0]
        for t in terms[1:]:
            total = f"vaddq_u8({total}, {t})"
        lines.append(f"a = bitc_nibbles_acc_v(a, {total});")
    return lines


def binary_source(symbol: str, isa: str, rows: int, k: int, n: int, threshold: bool) -> str:
    """W1A1, pm1, no offset: ``XP (rows, KW) packed signs, P (1, N, KW), epilogue, Y (rows, N)``;
    ``acc = K - 2 popcount(x ^ p)`` (bits past K are 0 in both); the portable kernel's epilogue
    in its order (``OF`` is its unused offset parameter)."""
    kw = -(-k // 32)
    if threshold:
        params, out = "int32_t* TS, int32_t* TH", "((int64_t)TS[j] * acc >= (int64_t)TH[j]) ? 1.0f : -1.0f"
    else:
        params, out = "float* SC, float* OF, float* BI", "(SC[j] * (float)acc) + BI[j]"
    body = [
        f"for (int32_t m = 0; m < {rows}; ++m) {{",
        f"  const int32_t *x = XP + m * {kw}, *p = P;",
        f"  for (int32_t j = 0; j < {n}; ++j, p += {kw}) {{",
        "    uint32_t a = 0;",
        *("    " + line for line in _binary_row(isa, kw)),
        f"    int32_t acc = {k} - 2 * (int32_t)a;",
        f"    Y[m * {n} + j] = {out};",
        "  }",
        "}",
    ]
    head = f"BITC_KERNEL void {symbol}(int32_t* XP, int32_t* P, {params}, float* Y) {{"
    return "\n".join(["", head, *("  " + line for line in body), "}", ""])


def _unpack(isa: str, k: int) -> list[str]:
    """C lines: ``sumx`` of the sample's ``x``; the operands the scalar and DSP loops read (``XU``)."""
    if isa == "mve":
        full, tail = divmod(k, 16)
        lines = [f"for (int32_t i = 0; i < {full}; ++i) sumx = vaddvaq_s8(sumx, vldrbq_s8(x + 16 * i));"]
        if tail:
            lines.append(f"sumx = vaddvaq_s8(sumx, vldrbq_z_s8(x + {16 * full}, vctp8q({tail})));")
        return lines
    words = -(-k // 4)
    lines = [f"for (int32_t i = 0; i < {words}; ++i) {{"]
    lines += ["  int32_t x0 = x[4 * i], x1 = 0, x2 = 0, x3 = 0;"]
    guard = lambda j: "" if k % 4 == 0 else f"if (4 * i + {j} < {k}) "
    lines += [f"  {guard(j)}x{j} = x[4 * i + {j}];" for j in (1, 2, 3)]
    lines.append("  sumx += x0 + x1 + x2 + x3;")
    if isa == "dsp":  # the pairs SXTB16 gives of x and of x rotated by 8
        lines += ["  XU[2 * i] = (x0 & 0xFFFF) | ((uint32_t)x2 << 16);"]
        lines += ["  XU[2 * i + 1] = (x1 & 0xFFFF) | ((uint32_t)x3 << 16);"]
    else:
        lines += [f"  XU[4 * i + {j}] = x{j};" for j in range(4)]
    return [*lines, "}"]


def int8_source(symbol: str, isa: str, rows: int, k: int, n: int, shift: bool, threshold: bool) -> str:
    """``XQ (rows, K) int8, XS (rows,), W (stored codes), epilogue, [XU scratch,] Y (rows, N)``."""
    epi_params, out = _epilogue(threshold)
    scratch = "" if isa == "mve" else "int32_t* XU, "
    fix = "acc += 128 * sumx; /* codes stored as Q - 128 */" if shift else ""
    body = [
        f"for (int32_t m = 0; m < {rows}; ++m) {{",
        f"  const int8_t *x = XQ + m * {k};",
        "  const int8_t *w = W;",
        "  int32_t sumx = 0;",
        *("  " + line for line in _unpack(isa, k)),
        f"  for (int32_t j = 0; j < {n}; j += {ROWS}) {{",
        "    int32_t a0 = 0, a1 = 0, a2 = 0, a3 = 0;",
        *("    " + line for line in _row_accumulators(isa, k)),
        "    int32_t accs[4] = {a0, a1, a2, a3};",
        f"    for (int32_t r = 0; r < {ROWS} && j + r < {n}; ++r) {{",
        "      int32_t n = j + r, acc = accs[r];",
        f"      {fix}",
        f"      Y[m * {n} + n] = {out};",
        "    }",
        "  }",
        "}",
    ]
    head = f"BITC_KERNEL void {symbol}(int8_t* XQ, float* XS, int8_t* W, {epi_params}, {scratch}float* Y) {{"
    return "\n".join(["", head, *("  " + line for line in body), "}", ""])


def _half_table(name: str, xs: list[str]) -> list[str]:
    """``name[i]`` = the sum of ``xs[b]`` over the set bits ``b`` of ``i`` (16 entries)."""
    lines = [f"float {name}[16];", f"{name}[0] = 0.0f;"]
    for i in range(1, 16):
        low = i & -i
        rest = i - low
        term = xs[low.bit_length() - 1]
        lines.append(f"{name}[{i}] = {term};" if rest == 0 else f"{name}[{i}] = {name}[{rest}] + {term};")
    return lines


def _table_chunk(gc: int, stride: int, kc: int | None, n: int, first: bool) -> list[str]:
    """C lines for one chunk of ``gc`` groups at ``xc``: build its table ``T``, then add one entry
    per group to every row's ``y[j]`` (``first``: the first chunk sets it). ``kc``: the inputs
    left when the chunk's last group is partial (those past it count as 0)."""
    shift = 2 + stride.bit_length() - 1
    xs = [f"x{b}" for b in range(8)]
    load = [f"  float x{b} = xg[{b}];" for b in range(8)]
    if kc is not None:
        load = [f"  float x{b} = (8 * g + {b} < {kc}) ? xg[{b}] : 0.0f;" for b in range(8)]
    build = [
        f"for (int32_t g = 0; g < {gc}; ++g) {{",
        "  const float *xg = xc + 8 * g;",
        *load,
        *("  " + line for line in _half_table("lo", xs[:4]) + _half_table("hi", xs[4:])),
        "  for (int32_t h = 0; h < 16; ++h) {",
        f"    float hv = hi[h], *t = T + h * {16 * stride} + g;",
        "#pragma GCC unroll 16",
        f"    for (int32_t l = 0; l < 16; ++l) t[l * {stride}] = hv + lo[l];",
        "  }",
        "}",
    ]
    rows_loop = [
        f"for (int32_t j = 0; j < {n}; ++j, p += {gc}) {{",
        f"  float acc = {'0.0f' if first else 'y[j]'};",
        # the entry's address is T + byte * 4 * stride; the group's 4 * g is the load's offset
        *(
            f"  acc += ((const float*)((const char*)T + ((uint32_t)p[{g}] << {shift})))[{g}];"
            for g in range(gc)
        ),
        "  y[j] = acc;",
        "}",
    ]
    return build + rows_loop


def float_pm1_source(symbol: str, rows: int, k: int, n: int) -> str:
    """``X (rows, K) float, P (sign bytes), SC, BI, T (table scratch), Y (rows, N)``."""
    groups = -(-k // 8)
    stride = _stride(k)
    full, last = divmod(groups, stride)
    partial = k % 8 != 0
    if partial and last == 0:  # the last full chunk holds the partial group: peel it
        full, last = full - 1, stride
    body = [
        f"for (int32_t m = 0; m < {rows}; ++m) {{",
        f"  const float *x = X + m * {k};",
        f"  float *y = Y + m * {n}, sumx = 0.0f;",
        f"  for (int32_t i = 0; i < {k}; ++i) sumx += x[i];",
        "  const uint8_t *p = P;",
    ]
    for start, stop in ((0, min(full, 1)), (1, full)):  # the first chunk sets y, the others add
        if stop > start:
            body += [
                f"  for (int32_t c = {start}; c < {stop}; ++c) {{",
                f"    const float *xc = x + {8 * stride} * c;",
                *("    " + line for line in _table_chunk(stride, stride, None, n, start == 0)),
                "  }",
            ]
    if last:
        kc = k - 8 * stride * full if partial else None
        body += [
            "  {",
            f"    const float *xc = x + {8 * stride * full};",
            *("    " + line for line in _table_chunk(last, stride, kc, n, full == 0)),
            "  }",
        ]
    body += [
        f"  for (int32_t j = 0; j < {n}; ++j) y[j] = (SC[j] * ((y[j] * 2.0f) - sumx)) + BI[j];",
        "}",
    ]
    head = f"BITC_KERNEL void {symbol}(float* X, uint8_t* P, float* SC, float* BI, float* T, float* Y) {{"
    return "\n".join(["", head, *("  " + line for line in body), "}", ""])


def _stride(k: int) -> int:
    """Groups one table row holds: the chunk's groups, rounded up to a power of two (a shift)."""
    return min(TABLE_GROUPS, 1 << (-(-k // 8) - 1).bit_length())


def float_codes_source(symbol: str, rows: int, k: int, n: int) -> str:
    """``X (rows, K) float, W (codes as fp16 pairs, [N/4][K/2][4 rows]), SC, OF, BI, Y (rows, N)``:
    four rows a step share two inputs; each row's word holds its two codes as half floats (exact:
    integers below 2048), widened by VCVTB / VCVTT; ``fmaf`` is one VFMA."""
    pairs, odd = divmod(k, 2)
    fma = [
        f"      {{ float w = bitc_word_float(W2 + {r}); a{r} = fmaf(bitc_f16_hi(w), x1, fmaf(bitc_f16_lo(w), x0, a{r})); }}"
        for r in range(ROWS)
    ]
    body = [
        f"for (int32_t m = 0; m < {rows}; ++m) {{",
        f"  const float *x = X + m * {k};",
        "  const int32_t *W2 = (const int32_t*)W;",
        "  float sumx = 0.0f;",
        f"  for (int32_t i = 0; i < {k}; ++i) sumx += x[i];",
        f"  for (int32_t j = 0; j < {n}; j += {ROWS}) {{",
        "    float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;",
        f"    for (int32_t i = 0; i < {2 * pairs}; i += 2, W2 += {ROWS}) {{",
        "      float x0 = x[i], x1 = x[i + 1];",
        *fma,
        "    }",
        *(
            [f"    {{ float x0 = x[{k - 1}], x1 = 0.0f;", *("  " + f for f in fma), f"      W2 += {ROWS}; }}"]
            if odd
            else []
        ),
        "    float accs[4] = {a0, a1, a2, a3};",
        f"    for (int32_t r = 0; r < {ROWS} && j + r < {n}; ++r) {{",
        "      int32_t n = j + r;",
        f"      Y[m * {n} + n] = ((SC[n] * accs[r]) + (OF[n] * sumx)) + BI[n];",
        "    }",
        "  }",
        "}",
    ]
    head = f"BITC_KERNEL void {symbol}(float* X, int32_t* W, float* SC, float* OF, float* BI, float* Y) {{"
    return "\n".join(["", head, *("  " + line for line in body), "}", ""])


def store_half_codes(q: np.ndarray) -> np.ndarray:
    """``(N, K)`` integer codes -> int32 words ``[N/4][K/2][4 rows]``, each the row's two codes as
    IEEE half floats (low half: the even input), zero padded."""
    n, k = q.shape
    np_, kp = -(-n // ROWS) * ROWS, -(-k // 2) * 2
    padded = np.zeros((np_, kp), np.float16)
    padded[:n, :k] = q
    words = padded.view(np.uint32).astype(np.uint32)  # (np_, kp / 2): little endian, even input low
    return words.reshape(np_ // ROWS, ROWS, kp // 2).transpose(0, 2, 1).reshape(-1).view(np.int32)


def quantize_source(symbol: str, rows: int, n: int) -> str:
    """``X (rows, n) float -> XQ (rows, n) int8, XS (rows,)``: the numerics' per-sample int8,
    ``q = clamp(round_half_even(x / s), -127, 127)`` with ``s = max(amax, EPS) / 127``, each value
    one division and one VCVTR (the portable kernel calls ``nearbyintf``)."""
    body = [
        f"for (int32_t m = 0; m < {rows}; ++m) {{",
        f"  const float *x = X + m * {n};",
        f"  int8_t *q = XQ + m * {n};",
        "  float amax = 0.0f;",
        f"  for (int32_t i = 0; i < {n}; ++i) {{ float a = fabsf(x[i]); amax = a > amax ? a : amax; }}",
        f"  float s = (amax > {EPS!r}f ? amax : {EPS!r}f) / 127.0f;",
        "  XS[m] = s;",
        f"  for (int32_t i = 0; i < {n}; ++i) {{",
        "    int32_t v = bitc_round_s32(x[i] / s);",
        "    q[i] = (int8_t)(v < -127 ? -127 : v > 127 ? 127 : v);",
        "  }",
        "}",
    ]
    head = f"BITC_KERNEL void {symbol}(float* X, int8_t* XQ, float* XS) {{"
    return "\n".join(["", head, *("  " + line for line in body), "}", ""])


def table_floats(k: int) -> int:
    """Floats of the float kernel's table scratch: 256 entries per group of one chunk."""
    return 256 * _stride(k)


class Builder(_Builder):
    """The AOT walker with C kernels for int8- and float-activation dense layers (``isa``: the
    core's ``scalar``, ``dsp`` or ``mve`` code path)."""

    isa = "scalar"

    def _c_kernel(self, key: tuple, name: str, params: tuple[KernelParam, ...], source: Any) -> Kernel:
        if key not in self.kernels:
            symbol = f"{name}_{len(self.kernels)}"
            self.kernels[key] = Kernel(symbol, params, source(symbol))
        return self.kernels[key]

    def _stored(self, call: ops.BoundCall, suffix: str, array: np.ndarray) -> str:
        qual = self.param_of[call.tensors["planes"].name]
        base = qual.replace(".", "_").removesuffix("_planes")
        return self.constant(f"bitc_w_{base}_{suffix}", array, qual.rpartition(".")[0] or "weights")

    def float_pm1(self, node: torch.fx.Node, call: ops.BoundCall, out_shape: tuple) -> None:
        a: ops.BitLinearAttrs = call.attrs
        x = self.tensors[call.x.name]
        rows = math.prod(x.shape[:-1])
        planes = self.state[self.param_of[call.tensors["planes"].name]].detach().cpu().numpy()
        n = int(planes.shape[1])
        p = self._stored(call, "signs", store_sign_bytes(planes, a.k))
        params = (
            KernelParam("X", "float32", (rows, a.k)),
            KernelParam("P", "uint8", (self.weights[p].array.size,)),
            *(KernelParam(q, "float32", (n,)) for q in ("SC", "BI")),
            KernelParam("T", "float32", (table_floats(a.k),)),
            KernelParam("Y", "float32", (rows, n)),
        )
        kern = self._c_kernel(
            ("dense_float_table", a.k, n, rows),
            f"bitc_dense_float_table_{a.k}x{n}",
            params,
            lambda s: float_pm1_source(s, rows, a.k, n),
        )
        t = call.tensors
        epi = [self.weight(t["scale"], "float32"), self.weight(t["bias"], "float32")]
        table = self.new_tensor(f"{node.name}_table", (table_floats(a.k),), "float32")
        y = self.new_tensor(node.name, out_shape, "float32")
        self.call(
            kern, [x.name, p, *epi, table.name, y.name], [x.name], [table.name, y.name], self.label(node)
        )

    def float_codes(self, node: torch.fx.Node, call: ops.BoundCall, out_shape: tuple, q: np.ndarray) -> None:
        x = self.tensors[call.x.name]
        rows, (n, k) = math.prod(x.shape[:-1]), q.shape
        stored = store_half_codes(q)
        w = self._stored(call, "hcodes", stored)
        params = (
            KernelParam("X", "float32", (rows, k)),
            KernelParam("W", "int32", (stored.size,)),
            *(KernelParam(p, "float32", (n,)) for p in ("SC", "OF", "BI")),
            KernelParam("Y", "float32", (rows, n)),
        )
        kern = self._c_kernel(
            ("dense_float_codes", k, n, rows),
            f"bitc_dense_float_codes_{k}x{n}",
            params,
            lambda s: float_codes_source(s, rows, k, n),
        )
        epi = [self.weight(call.tensors[p], "float32") for p in ("scale", "offset", "bias")]
        y = self.new_tensor(node.name, out_shape, "float32")
        self.call(kern, [x.name, w, *epi, y.name], [x.name], [y.name], self.label(node))

    def int8_codes(self, node: torch.fx.Node, call: ops.BoundCall, out_shape: tuple, q: np.ndarray) -> None:
        a: ops.BitLinearAttrs = call.attrs
        x = self.tensors[call.x.name]
        rows, (n, k), isa = math.prod(x.shape[:-1]), q.shape, self.isa
        shift = bool(q.max() > 127)
        stored = store_int8_codes((q - 128 if shift else q).astype(np.int8), int8_block(isa))
        w = self._stored(call, "codes", stored)
        act_args = self.quantized_input(x, "int8", rows, (k,), None)
        t = call.tensors
        if a.threshold:
            epi = [self.weight(t["thr_sign"], "int32"), self.weight(t["thr"], "int32")]
            names = ("TS", "TH")
        else:
            epi = [self.weight(t[name], "float32") for name in ("scale", "offset", "bias")]
            names = ("SC", "OF", "BI")
        words = {"scalar": 4 * -(-k // 4), "dsp": 2 * -(-k // 4)}.get(isa, 0)
        params = (
            KernelParam("XQ", "int8", (rows, k)),
            KernelParam("XS", "float32", (rows,)),
            KernelParam("W", "int8", (stored.size,)),
            *(KernelParam(p, "int32" if a.threshold else "float32", (n,)) for p in names),
            *((KernelParam("XU", "int32", (words,)),) if words else ()),
            KernelParam("Y", "float32", (rows, n)),
        )
        kern = self._c_kernel(
            ("dense_int8_codes", isa, k, n, rows, shift, bool(a.threshold)),
            f"bitc_dense_int8_{isa}_{k}x{n}",
            params,
            lambda s: int8_source(s, isa, rows, k, n, shift, bool(a.threshold)),
        )
        scratch = [self.new_tensor(f"{node.name}_xu", (words,), "int32").name] if words else []
        y = self.new_tensor(node.name, out_shape, "float32")
        args = [*act_args, w, *epi, *scratch, y.name]
        self.call(kern, args, act_args, [*scratch, y.name], self.label(node))

    def kernel(self, key: Any, build: Any, symbol: str, unroll: bool = False) -> Kernel:
        """W1A1 dense kernels (pm1 layers and the row kernels of tiled layers) in C on the cores
        of ``BINARY_C``; every other kernel from TIR."""
        if key[0] == "q8" and self.isa != "scalar":  # FPU cores: VCVTR rounds
            (rest, rows), n = key[1:], math.prod(key[1])
            params = (
                KernelParam("X", "float32", (rows, *rest)),
                KernelParam("XQ", "int8", (rows, *rest)),
                KernelParam("XS", "float32", (rows,)),
            )
            return self._c_kernel(
                key, f"bitc_quantize_int8_{n}", params, lambda s: quantize_source(s, rows, n)
            )
        spec = key[1] if key[0] == "dense" else None
        w1a1 = spec is not None and (spec.act, spec.code, spec.bits, spec.has_offset) == (
            "binary",
            "pm1",
            1,
            False,
        )
        if not w1a1 or self.isa not in BINARY_C:
            return super().kernel(key, build, symbol, unroll)
        rows, k, n, kw = key[-1], spec.in_features, spec.out_features, -(-spec.in_features // 32)
        names, dtype = (("TS", "TH"), "int32") if spec.threshold else (("SC", "OF", "BI"), "float32")
        params = (
            KernelParam("XP", "int32", (rows, kw)),
            KernelParam("P", "int32", (1, n, kw)),
            *(KernelParam(q, dtype, (n,)) for q in names),
            KernelParam("Y", "float32", (rows, n)),
        )
        isa = self.isa
        if key not in self.kernels:  # the TIR kernel's name, the code path after bitc_
            name = symbol.replace("bitc_", f"bitc_{isa}_", 1)
            source = binary_source(name, isa, rows, k, n, spec.threshold)
            self.kernels[key] = Kernel(name, params, source)
        return self.kernels[key]

    def bit_linear(self, node: torch.fx.Node, out_shape: tuple) -> None:
        call = ops.bind(node)
        a: ops.BitLinearAttrs = call.attrs
        bits = int(call.tensors["planes"].meta["val"].shape[0])
        if a.act == "float" and a.code == "pm1" and bits == 1 and not a.threshold and not a.has_offset:
            return self.float_pm1(node, call, out_shape)
        # int8 or float activations with a float epilogue (the float codes need an FPU)
        if a.act in ("int8", "float") and not a.threshold and not (a.act == "float" and self.isa == "scalar"):
            planes = self.state[self.param_of[call.tensors["planes"].name]].detach().cpu()
            q = planes_to_code(planes, a.k, a.code).numpy()  # (N, K) int64
            if a.act == "float" and np.abs(q).max() <= 2048:  # FPU cores: codes as half floats, VFMA
                return self.float_codes(node, call, out_shape, q)
            lo, hi = int(q.min()), int(q.max())
            if lo >= -128 and (hi <= 127 or (lo >= 0 and hi <= 255)):
                return self.int8_codes(node, call, out_shape, q)
        return super().bit_linear(node, out_shape)


def builder_for(features: frozenset[str]) -> type[Builder]:
    """The walker for a core with these capability features (``mve``, ``dsp``)."""
    isa = "mve" if "mve" in features else "dsp" if "dsp" in features else "scalar"
    return type(f"Builder_{isa}", (Builder,), {"isa": isa})
