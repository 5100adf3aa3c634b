"""C sources of the Cortex-M dense kernels (:mod:`.dense_c` chooses them): int8 codes x int8
activations (SMLAD / VMLADAVA / MLA), W1A1 (bit counts; Helium byte lanes), 1-bit x float through
partial-sum tables, half-float codes x float (VFMA), the int8 activation quantizer. Every kernel is
one ``BITC_KERNEL`` function of plain pointers; the helpers it calls are in :mod:`.c_prelude`."""

from __future__ import annotations

import math

import numpy as np

from bitcompiler.quant.numerics.core import EPS

ROWS = 4  # output rows a weight block holds (and the kernels accumulate at once)
TABLE_GROUPS = 8  # groups of 8 inputs whose tables one chunk of the float kernel holds


def c_kernel(symbol: str, params: str, body: list[str]) -> str:
    """A C kernel's text: ``BITC_KERNEL void symbol(params) {``, ``body`` indented, ``}``."""
    return "\n".join(
        ["", f"BITC_KERNEL void {symbol}({params}) {{", *("  " + line for line in body), "}", ""]
    )


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


def row_accumulators(isa: str, k: int, packed: bool = False) -> list[str]:
    """C lines: ``a0..a3 += codes(rows) . x`` over one block row, ``w`` advancing; ``packed``
    (DSP, :func:`packed_x`): the int8 ``x`` itself instead of its unpacked pairs ``XU``."""
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
        xs = "const int8_t *xq = x;" if packed else "const int32_t *xu = XU;"
        lines = [xs, "const int32_t *ww = (const int32_t*)w;"]
        lines += [f"#pragma GCC unroll {math.gcd(words, 2)}", f"for (int32_t i = 0; i < {words}; ++i)"]
        lines += [
            "  BITC_SMLAD_4ROWS_Q(a0, a1, a2, a3, ww, xq);"
            if packed
            else "  BITC_SMLAD_4ROWS(a0, a1, a2, a3, ww, xu);"
        ]
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
    return c_kernel(symbol, f"int32_t* XP, int32_t* P, {params}, float* Y", body)


def packed_x(isa: str, k: int) -> bool:
    """A dense layer's DSP loop reads its int8 row as it is (whole words: ``K % 4 == 0``): no
    ``XU`` (2 bytes a value) in RAM, two ``SXTB16`` more per four inputs and four rows."""
    return isa == "dsp" and k % 4 == 0


def unpack(isa: str, k: int, packed: bool = False) -> list[str]:
    """C lines: ``sumx`` of the sample's ``x``; the operands the scalar and DSP loops read (``XU``;
    none when ``packed``)."""
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
    if isa == "dsp" and not packed:  # the pairs SXTB16 gives of x and of x rotated by 8
        lines += ["  XU[2 * i] = (x0 & 0xFFFF) | ((uint32_t)x2 << 16);"]
        lines += ["  XU[2 * i + 1] = (x1 & 0xFFFF) | ((uint32_t)x3 << 16);"]
    elif isa != "dsp":
        lines += [f"  XU[4 * i + {j}] = x{j};" for j in range(4)]
    return [*lines, "}"]


def int8_source(symbol: str, isa: str, rows: int, k: int, n: int, shift: bool) -> str:
    """``XQ (rows, K) int8, XS (rows,), W (stored codes), SC, OF, BI, [XU scratch,] Y (rows, N)``;
    the numerics' epilogue in its order."""
    epi_params = "float* SC, float* OF, float* BI"
    out = "(((SC[n] * XS[m]) * (float)acc) + ((OF[n] * XS[m]) * (float)sumx)) + BI[n]"
    packed = packed_x(isa, k)
    scratch = "" if isa == "mve" or packed else "int32_t* XU, "
    fix = "acc += 128 * sumx; /* codes stored as Q - 128 */" if shift else ""
    body = [
        f"for (int32_t m = 0; m < {rows}; ++m) {{",
        f"  const int8_t *x = XQ + m * {k};",
        "  const int8_t *w = W;",
        "  int32_t sumx = 0;",
        *("  " + line for line in unpack(isa, k, packed)),
        f"  for (int32_t j = 0; j < {n}; j += {ROWS}) {{",
        "    int32_t a0 = 0, a1 = 0, a2 = 0, a3 = 0;",
        *("    " + line for line in row_accumulators(isa, k, packed)),
        "    int32_t accs[4] = {a0, a1, a2, a3};",
        f"    for (int32_t r = 0; r < {ROWS} && j + r < {n}; ++r) {{",
        "      int32_t n = j + r, acc = accs[r];",
        f"      {fix}",
        f"      Y[m * {n} + n] = {out};",
        "    }",
        "  }",
        "}",
    ]
    return c_kernel(symbol, f"int8_t* XQ, float* XS, int8_t* W, {epi_params}, {scratch}float* Y", body)


def _half_table(name: str, xs: list[str]) -> list[str]:
    """``name[i]`` = the sum of ``xs[b]`` over the set bits ``b`` of ``i`` (16 entries)."""
    lines = [f"float {name}[16];", f"{name}[0] = 0.0f;"]
    for i in range(1, 16):
        low = i & -i
        rest = i - low
        term = xs[low.bit_length() - 1]
        lines.append(f"{name}[{i}] = {term};" if rest == 0 else f"{name}[{i}] = {name}[{rest}] + {term};")
    return lines


def _table_chunk(gc: int, stride: int, kc: int | None, n: int, first: bool, mve: bool) -> list[str]:
    """C lines for one chunk of ``gc`` groups at ``xc``: build its table ``T``, then add one entry
    per group to every row's ``y[j]`` (``first``: the first chunk sets it). ``kc``: the inputs
    left when the chunk's last group is partial (those past it count as 0)."""
    shift = 2 + stride.bit_length() - 1
    xs = [f"x{b}" for b in range(8)]
    load = [f"  float x{b} = xg[{b}];" for b in range(8)]
    if kc is not None:
        load = [f"  float x{b} = (8 * g + {b} < {kc}) ? xg[{b}] : 0.0f;" for b in range(8)]
    fill = [
        "#pragma GCC unroll 16",
        f"    for (int32_t l = 0; l < 16; ++l) t[l * {stride}] = hv + lo[l];",
    ]
    if mve:  # four entries a step: VADD of the low table's quarter, a scatter store
        fill = [
            f"    vstrwq_scatter_shifted_offset_f32(t, bitc_o{q}, vaddq_n_f32(bitc_l{q}, hv));"
            for q in range(4)
        ]
    build = [
        f"for (int32_t g = 0; g < {gc}; ++g) {{",
        "  const float *xg = xc + 8 * g;",
        *load,
        *("  " + line for line in _half_table("lo", xs[:4]) + _half_table("hi", xs[4:])),
        *(f"  float32x4_t bitc_l{q} = vld1q_f32(lo + {4 * q});" for q in range(4) if mve),
        "  for (int32_t h = 0; h < 16; ++h) {",
        f"    float hv = hi[h], *t = T + h * {16 * stride} + g;",
        *fill,
        "  }",
        "}",
    ]
    if mve:
        return build + _gather_rows(gc, stride, n, first)
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


def _gather_rows(gc: int, stride: int, n: int, first: bool) -> list[str]:
    """Helium: each row adds four groups' entries a step (byte indices widened by VLDRB.U32,
    ``idx * stride + g`` by one VMLA, a gather load) into four float lanes kept in ``A``."""
    quarters = range(-(-gc // 4))
    lines = [
        f"const uint32x4_t bitc_g{q} = {{{4 * q}, {4 * q + 1}, {4 * q + 2}, {4 * q + 3}}};" for q in quarters
    ]
    lines.append(f"for (int32_t j = 0; j < {n}; ++j, p += {gc}) {{")
    lines.append(f"  float32x4_t acc = {'vdupq_n_f32(0.0f)' if first else 'vld1q_f32(A + 4 * j)'};")
    for q in quarters:
        g = f"bitc_g{q}"
        if gc - 4 * q >= 4:
            lines.append(
                f"  acc = vaddq_f32(acc, vldrwq_gather_shifted_offset_f32(T, vmlaq_n_u32({g}, vldrbq_u32(p + {4 * q}), {stride})));"
            )
        else:  # the last groups: predicated loads, zero lanes
            pred = f"vctp32q({gc - 4 * q})"
            off = f"vmlaq_n_u32({g}, vldrbq_z_u32(p + {4 * q}, {pred}), {stride})"
            lines.append(f"  acc = vaddq_f32(acc, vldrwq_gather_shifted_offset_z_f32(T, {off}, {pred}));")
    return [*lines, "  vst1q_f32(A + 4 * j, acc);", "}"]


def float_pm1_source(symbol: str, rows: int, k: int, n: int, mve: bool = False) -> str:
    """``X (rows, K) float, P (sign bytes), SC, BI, T (table scratch), Y (rows, N)``; ``mve``: the
    Helium table fill and row sums (four lanes per row in ``A``, after the table in ``T``)."""
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
    if mve:
        body += [f"  float *A = T + {256 * stride};"]
        body += [
            f"  const uint32x4_t bitc_o{q} = {{{', '.join(str((4 * q + i) * stride) for i in range(4))}}};"
            for q in range(4)
        ]
    for start, stop in ((0, min(full, 1)), (1, full)):  # the first chunk sets y, the others add
        if stop > start:
            body += [
                f"  for (int32_t c = {start}; c < {stop}; ++c) {{",
                f"    const float *xc = x + {8 * stride} * c;",
                *("    " + line for line in _table_chunk(stride, stride, None, n, start == 0, mve)),
                "  }",
            ]
    if last:
        kc = k - 8 * stride * full if partial else None
        body += [
            "  {",
            f"    const float *xc = x + {8 * stride * full};",
            *("    " + line for line in _table_chunk(last, stride, kc, n, full == 0, mve)),
            "  }",
        ]
    if mve:  # the four lanes of each row
        body += [
            f"  for (int32_t j = 0; j < {n}; ++j) {{",
            "    float32x4_t a = vld1q_f32(A + 4 * j);",
            "    y[j] = (vgetq_lane_f32(a, 0) + vgetq_lane_f32(a, 1)) + (vgetq_lane_f32(a, 2) + vgetq_lane_f32(a, 3));",
            "  }",
        ]
    body += [
        f"  for (int32_t j = 0; j < {n}; ++j) y[j] = (SC[j] * ((y[j] * 2.0f) - sumx)) + BI[j];",
        "}",
    ]
    return c_kernel(symbol, "float* X, uint8_t* P, float* SC, float* BI, float* T, float* Y", body)


def _stride(k: int) -> int:
    """Groups one table row holds: the chunk's groups, rounded up to a power of two (a shift)."""
    return min(TABLE_GROUPS, 1 << (-(-k // 8) - 1).bit_length())


def float_codes_source(symbol: str, rows: int, k: int, n: int, center: int = 0) -> str:
    """``X (rows, K) float, W (codes as fp16 pairs, [N/4][K/2][4 rows]), SC, OF, BI, Y (rows, N)``:
    four rows a step share two inputs; each row's word holds its two codes as half floats (exact:
    integers below 2048), widened by VCVTB / VCVTT; ``fmaf`` is one VFMA. ``center``: the codes
    stored are ``Q - center`` and the offset is ``OF + center·SC`` (``numerics.code_center``)."""
    of = f"(OF[n] + (SC[n] * {float(center)!r}f))" if center else "OF[n]"
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
        f"      Y[m * {n} + n] = ((SC[n] * accs[r]) + ({of} * sumx)) + BI[n];",
        "    }",
        "  }",
        "}",
    ]
    return c_kernel(symbol, "float* X, int32_t* W, float* SC, float* OF, float* BI, float* Y", body)


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
    return c_kernel(symbol, "float* X, int8_t* XQ, float* XS", body)


def table_floats(k: int, n: int, mve: bool) -> int:
    """Floats of the float kernel's scratch: 256 entries per group of one chunk (Helium: then
    four partial sums per row)."""
    return 256 * _stride(k) + (4 * n if mve else 0)
