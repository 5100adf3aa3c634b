"""The C helpers of the hand-written Cortex-M kernels (:mod:`.dense_sources`), for ``kernels.c``:
Helium bit counts, the SMLAD step of four rows (Thumb-2 asm), VCVTR rounding and half-float
widening, each with a plain C fallback so that a bundle also builds on the host (sanitizers)."""

PRELUDE = """
/* an int32 view of a float buffer (the W1A1 kernel's integer sums before its float epilogue) */
typedef int32_t bitc_i32_alias __attribute__((may_alias));
/* the W1A1 row loop in Thumb-2 asm (binary_c.py) on optimized builds for DSP cores */
#if defined(__thumb2__) && defined(__ARM_FEATURE_DSP) && defined(__OPTIMIZE__)
#define BITC_W1A1_ASM 1
#else
#define BITC_W1A1_ASM 0
#endif
/* the sign packing in Thumb-2 asm on optimized builds (every Cortex-M but M0) */
#if defined(__thumb2__) && defined(__OPTIMIZE__)
#define BITC_THUMB2_ASM 1
#else
#define BITC_THUMB2_ASM 0
#endif
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
/* The same step reading the activations as int8 (one LDR, two SXTB16 for the four rows): no
   unpacked copy of the row in RAM (a dense layer with K % 4 == 0) */
#define BITC_SMLAD_4ROWS_Q(A0, A1, A2, A3, W, XQ)                                            \\
  do {                                                                                       \\
    int32_t xa_, xb_, c_, t_;                                                                \\
    __asm("ldr %[xb], [%[xq]], #4\\n\\tsxtb16 %[xa], %[xb]\\n\\tsxtb16 %[xb], %[xb], ror #8\\n\\t"    \\
          BITC_SMLAD_ROW(a0) BITC_SMLAD_ROW(a1) BITC_SMLAD_ROW(a2) BITC_SMLAD_ROW(a3)        \\
          : [a0] "+r"(A0), [a1] "+r"(A1), [a2] "+r"(A2), [a3] "+r"(A3), [w] "+r"(W),         \\
            [xq] "+r"(XQ), [xa] "=&r"(xa_), [xb] "=&r"(xb_), [c] "=&r"(c_), [t] "=&r"(t_)    \\
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
#define BITC_SMLAD_4ROWS_Q(A0, A1, A2, A3, W, XQ)                                            \\
  do {                                                                                       \\
    const int8_t *q_ = (const int8_t *)(XQ);                                                 \\
    int32_t xu_[2] = {(q_[0] & 0xFFFF) | (int32_t)((uint32_t)q_[2] << 16),                   \\
                      (q_[1] & 0xFFFF) | (int32_t)((uint32_t)q_[3] << 16)};                  \\
    const int32_t *p_ = xu_;                                                                 \\
    BITC_SMLAD_4ROWS(A0, A1, A2, A3, W, p_);                                                 \\
    (XQ) += 4;                                                                               \\
  } while (0)
#endif
/* acc + lo(a) * lo(b) + hi(a) * hi(b) on signed 16-bit halves: one SMLAD on DSP cores */
static inline int32_t bitc_smlad(int32_t a, int32_t b, int32_t acc) {
#if defined(__ARM_FEATURE_DSP)
  return __smlad(a, b, acc);
#else
  return acc + (int16_t)a * (int16_t)b + (a >> 16) * (b >> 16);
#endif
}
static inline int32_t bitc_smuad(int32_t a, int32_t b) {
#if defined(__ARM_FEATURE_DSP)
  return __smuad(a, b);
#else
  return (int16_t)a * (int16_t)b + (a >> 16) * (b >> 16);
#endif
}
"""
