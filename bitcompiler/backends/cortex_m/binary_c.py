"""The W1A1 dense kernel of the M3, M4 and M7 (Helium cores: dense_sources), two output rows per
pass over the activations, and the sign packing of float activations for every Cortex-M.

``acc = K - 2 popcount(x ^ p)`` over the packed signs. Cortex-M has no popcount instruction, so the
bits are counted in SWAR steps (pairs, then nibbles: 5 instructions a word), and the words of a
row are taken in groups of three:

* a **carry-save adder** turns a group's three words ``d, e, f`` into ``ones = d ^ e ^ f`` and
  ``twos = maj(d, e, f)`` (``pc(d) + pc(e) + pc(f) = pc(ones) + 2 pc(twos)``): two SWAR counts
  instead of three. The weights of a group are stored as ``p0, p0 ^ p1, p0 ^ p2`` and the
  activations prepared once per sample as ``x0, x0 ^ x1, x0 ^ x2``, so that ``d ^ e`` and
  ``d ^ f`` are one ``EOR`` each: the adder with its three XORs is 7 instructions;
* the group's nibble counts (each at most ``4 + 2 * 4 = 12``) are summed by two ``USADA8``:
  ``A += bytes(n)`` and ``C += bytes(n & 0xF0F0F0F0)``, and ``pc = A - C + C / 16`` at the end
  of the row (no nibble-to-byte step). The M3 has no ``USADA8``: its nibbles are folded to bytes
  and added, and the bytes folded every ten groups and at the end of the row.

Two rows share each group of activation words (``LDRD`` from the packed words in place, through
``r7``, saved with the loop's end in an 8-byte frame: a group of three is prepared by two
``EOR`` a pass, which keeps no copy of the words in RAM), their weights are stored interleaved group by group so that one ``LDM`` with
write-back loads a row's group; the integer ``acc`` of every row goes to ``Y`` first, and a
second pass applies the float epilogue eight rows at a time (``VLDM``, ``VCVT``, ``VMUL``,
``VADD``, ``VSTM``) in the reference's order. The row loop is Thumb-2 asm (gcc keeps neither the
activation words nor the pointers in registers, and has no way to ask for ``LDM``); a plain C
loop over the same stored order runs everywhere else (host builds, ``-O0``).

The per-pixel W1A1 convs (:mod:`.conv_c`) run the same row loop (:func:`rows_lines`) over a
pixel's gathered tap words, their weights stored by :func:`store_w1a1_words` too.

Measured (256x256, ``python -m bench.cortex_m``): 19,751 instructions on the M4 for the layer
with its sign packing (19,259 when the prepared words were copied below ``sp``: 32 B more RAM),
against 25,148 for the previous C kernel (three words a fold, one row at a time) and the TIR
packing.
"""

from __future__ import annotations

import numpy as np

from bitcompiler.backends.cortex_m.dense_sources import c_kernel

MAX_WORDS = 240  # activation words the asm reads by offset from r7 (LDRD offsets reach 1020 bytes)


def groups(kw: int) -> list[tuple[int, int]]:
    """``(first word, size)`` of each group of a row: threes, then the one or two words left."""
    out = [(s, 3) for s in range(0, kw - kw % 3, 3)]
    return out + ([(kw - kw % 3, kw % 3)] if kw % 3 else [])


def _prepared(words: np.ndarray, kw: int) -> np.ndarray:
    """``(..., KW)`` words -> each group of three as ``w0, w0 ^ w1, w0 ^ w2``."""
    out = words.copy()
    for s, size in groups(kw):
        if size == 3:
            out[..., s + 1] ^= words[..., s]
            out[..., s + 2] ^= words[..., s]
    return out


def store_w1a1_words(planes: np.ndarray) -> np.ndarray:
    """1-bit pm1 planes ``(1, N, KW)`` int32 -> the kernel's order: rows in pairs (the last one
    alone when ``N`` is odd), each pair group by group, row ``a``'s group then row ``b``'s, each
    group of three as ``p0, p0 ^ p1, p0 ^ p2``."""
    p = _prepared(planes[0].astype(np.uint32), planes.shape[2])
    n, kw = p.shape
    out = []
    for a in range(0, n, 2):
        rows = p[a : a + 2]
        for s, size in groups(kw):
            out.append(rows[:, s : s + size].reshape(-1))
    return np.concatenate(out).view(np.int32)


def _swar(r: str, t: str) -> list[str]:
    """``r`` -> its nibble bit counts (pairs, then nibbles), ``t`` a scratch register."""
    return [
        f"and {t}, {r}, #0xAAAAAAAA",
        f"sub {r}, {r}, {t}, lsr #1",
        f"and {t}, {r}, #0xCCCCCCCC",
        f"and {r}, {r}, #0x33333333",
        f"add {r}, {r}, {t}, lsr #2",
    ]


ROW_REGS = (("r6", "r8"), ("r9", "r10"))  # per row: DSP the A and C sums; M3 the byte sums, the total
ZERO = "r11"
BYTE_GROUPS = 10  # groups whose byte sums (at most 24 each) an M3 row adds before folding them


def _fold(isa: str, acc: tuple[str, str], i: int) -> list[str]:
    """The group's nibble counts in r4 (r3 free) into the row's sums; ``i``: the group's index.

    DSP: ``A += bytes(n)``, ``C += bytes(n & 0xF0F0F0F0)`` by two USADA8. M3 (no USADA8): nibble
    pairs to bytes, added into ``S``; every ``BYTE_GROUPS`` groups ``S`` is folded into ``T``."""
    a, c = acc
    if isa == "dsp":
        ra, rc = (ZERO, ZERO) if i == 0 else (a, c)
        return ["and r3, r4, #0xF0F0F0F0", f"usada8 {a}, r4, {ZERO}, {ra}", f"usada8 {c}, r3, {ZERO}, {rc}"]
    lines = ["and r3, r4, #0xF0F0F0F0", "and r4, r4, #0x0F0F0F0F"]
    if i % BYTE_GROUPS == 0:
        return [*lines, f"add {a}, r4, r3, lsr #4"]
    lines += ["add r4, r4, r3, lsr #4", f"add {a}, {a}, r4"]
    if i % BYTE_GROUPS == BYTE_GROUPS - 1:  # S's bytes: at most 240
        lines += [
            *_fold_bytes(a),
            f"add {c}, {c}, {a}, lsr #16" if i >= BYTE_GROUPS else f"lsr {c}, {a}, #16",
        ]
    return lines


def _fold_bytes(s: str) -> list[str]:
    """``s``'s four byte sums -> their total in its top half (the bottom half stays below 2^15)."""
    return [
        f"and r3, {s}, #0xFF00FF00",
        f"and {s}, {s}, #0x00FF00FF",
        f"add {s}, {s}, r3, lsr #8",
        f"add {s}, {s}, {s}, lsl #16",
    ]


def _group_row(isa: str, size: int, acc: tuple[str, str], i: int) -> list[str]:
    """One row's group ``i`` (activation words in r0-r2): weights into r3-r5, the nibble counts
    into the row's sums."""
    if size == 3:
        lines = ["ldmia r12!, {r3, r4, r5}", "eor r3, r3, r0", "eor r4, r4, r1", "eor r5, r5, r2"]
        # r3 = d, r4 = d ^ e, r5 = d ^ f: ones = d ^ (d^e) ^ (d^f), twos = d ^ ((d^e) & (d^f))
        lines += ["eor r4, r4, r5", "bic r5, r5, r4", "eor r5, r5, r3", "eor r4, r4, r3"]
        lines += [*_swar("r4", "r3"), *_swar("r5", "r3"), "add r4, r4, r5, lsl #1"]
    elif size == 2:
        lines = ["ldmia r12!, {r3, r4}", "eor r3, r3, r0", "eor r4, r4, r1"]
        lines += [*_swar("r3", "r5"), *_swar("r4", "r5"), "add r4, r4, r3"]
    else:
        lines = ["ldr r4, [r12], #4", "eor r4, r4, r0", *_swar("r4", "r5")]
    return lines + _fold(isa, acc, i)


def _row_acc(isa: str, r: int, acc: tuple[str, str], count: int) -> list[str]:
    """``r<r> = K - 2 pc`` of a row whose ``count`` groups are summed (K in r2)."""
    a, c = acc
    if isa == "dsp":  # pc = A - C + C / 16
        return [f"sub r{r}, {a}, {c}", f"add r{r}, r{r}, {c}, lsr #4", f"sub r{r}, r2, r{r}, lsl #1"]
    if count % BYTE_GROUPS == 0:  # the last group folded S into T
        return [f"sub r{r}, r2, {c}, lsl #1"]
    if count < BYTE_GROUPS:  # S >> 15: twice the total (bit 15 is clear)
        return [*_fold_bytes(a), f"sub r{r}, r2, {a}, lsr #15"]
    return [*_fold_bytes(a), f"add {c}, {c}, {a}, lsr #16", f"sub r{r}, r2, {c}, lsl #1"]


def _x_loads(start: int, size: int, prepared: bool) -> list[str]:
    """Asm: a group's activation words from ``r7`` into r0-r2, a group of three prepared as
    ``x0, x0 ^ x1, x0 ^ x2`` (the order of the weights) unless the words are (``prepared``)."""
    off = 4 * start
    if size == 1:
        return [f"ldr r0, [r7, #{off}]"]
    lines = [f"ldrd r0, r1, [r7, #{off}]"]
    if size == 3:
        lines += [f"ldr r2, [r7, #{off + 8}]"] + ([] if prepared else ["eor r1, r1, r0", "eor r2, r2, r0"])
    return lines


def _rows_asm(isa: str, kw: int, k: int, pair: bool, prepared: bool) -> list[str]:
    """Asm of one pass (two rows, or the last one): groups, then ``acc = K - 2 pc`` of each row."""
    lines, parts = [], groups(kw)
    for i, (s, size) in enumerate(parts):
        lines += _x_loads(s, size, prepared)
        for r in range(2 if pair else 1):
            lines += _group_row(isa, size, ROW_REGS[r], i)
    lines.append(f"movw r2, #{k}")
    for r in range(2 if pair else 1):
        lines += _row_acc(isa, r, ROW_REGS[r], len(parts))
    return lines + (["stmia lr!, {r0, r1}"] if pair else ["str r0, [lr], #4"])


def _asm_block(isa: str, kw: int, k: int, n: int, names: tuple[str, str, str], prepared: bool) -> list[str]:
    """The row loop in Thumb-2, reading the packed words at ``xs`` in place through ``r7`` (saved
    below ``sp`` with the end of the pairs' weights: an 8-byte frame; ``names``: the C
    expressions of ``xs``, ``P`` and ``yi``)."""
    xs, p, yi = names
    text = ["push {r1, r7}", "mov r7, r0"] + [f"mov {ZERO}, #0"] * (isa == "dsp")
    if n >= 2:
        text += ["1:", *_rows_asm(isa, kw, k, True, prepared), "ldr r2, [sp]", "cmp r12, r2", "bne 1b"]
    if n % 2:
        text += _rows_asm(isa, kw, k, False, prepared)
    text.append("pop {r1, r7}")
    return [
        "{",
        f'  register const uint32_t *bitc_xs __asm("r0") = {xs};',
        f'  register const int32_t *bitc_end __asm("r1") = {p} + {kw * (n - n % 2)};',
        f'  register const int32_t *bitc_p __asm("r12") = {p};',
        f'  register int32_t *bitc_y __asm("lr") = {yi};',
        "  __asm volatile(",
        _quoted(text),
        '      : "+r"(bitc_xs), "+r"(bitc_end), "+r"(bitc_p), "+r"(bitc_y)',
        "      :",
        '      : "r2", "r3", "r4", "r5", "r6", "r8", "r9", "r10", "r11", "cc", "memory");',
        "}",
    ]


def _c_loop(kw: int, k: int, n: int, names: tuple[str, str, str], prepared: bool) -> list[str]:
    """The same sums in C, over the same stored order (host builds, unoptimized builds); its
    locals are ``bitc_``-named so that they hide none of the caller's."""
    xs, p, yi = names
    body = [
        f"for (int32_t j = 0; j < {n}; ++j) {{",
        f"  int32_t bitc_b = j % 2, bitc_pair = (j / 2) * 2, bitc_in = j + 1 < {n} || bitc_b;",
        "  uint32_t bitc_pc = 0;",
    ]
    for s, size in groups(kw):
        w = f"{p}[{kw} * bitc_pair + (bitc_in ? 2 * {s} + bitc_b * {size} : {s})"
        x = [f"(uint32_t){xs}[{s + i}]" for i in range(size)]
        x = x if size < 3 or prepared else [x[0], f"({x[0]} ^ {x[1]})", f"({x[0]} ^ {x[2]})"]
        terms = [f"({x[i]} ^ (uint32_t){w} + {i}])" for i in range(size)]
        if size == 3:
            ones, twos = "bitc_d ^ bitc_u ^ bitc_v", "bitc_d ^ (bitc_u & bitc_v)"
            body += [
                f"  {{ uint32_t bitc_d = {terms[0]}, bitc_u = {terms[1]}, bitc_v = {terms[2]};",
                f"    bitc_pc += bitc_popcount((int32_t)({ones})) + 2 * bitc_popcount((int32_t)({twos})); }}",
            ]
        else:
            body += [f"  bitc_pc += bitc_popcount((int32_t){t});" for t in terms]
    return [*body, f"  {yi}[j] = {k} - 2 * (int32_t)bitc_pc;", "}"]


def rows_lines(
    isa: str, kw: int, k: int, n: int, names: tuple[str, str, str], prepared: bool = False
) -> list[str]:
    """C lines of ``yi[j] = k - 2 popcount(xs ^ row j)`` for the ``n`` rows of ``P`` (stored by
    :func:`store_w1a1_words`; ``xs`` the packed words as they are, or ``prepared`` (each group of
    three as ``x0, x0 ^ x1, x0 ^ x2``, by :func:`prepare_lines`); ``names``: the C
    expressions of ``xs``, ``P``, ``yi``): the Thumb-2 row loop (``isa`` "dsp": USADA8 sums, else
    the M3's byte folds) where the core runs it, the C loop elsewhere. ``k`` may be below
    ``32 kw`` when the words carry zero padding in both operands (a conv's taps)."""
    asm = _asm_block(isa, kw, k, n, names, prepared) if kw <= MAX_WORDS else []
    loop = _c_loop(kw, k, n, names, prepared)
    if not asm:
        return loop
    guard = "#if BITC_W1A1_ASM" if isa == "dsp" else "#if BITC_THUMB2_ASM"
    return [guard, *asm, "#else", *loop, "#endif"]


def prepare_lines(xs: str, kw: int) -> list[str]:
    """C lines that prepare the ``kw`` words at ``xs`` in place for :func:`rows_lines`
    (``prepared``): each group of three as ``x0, x0 ^ x1, x0 ^ x2``."""
    full = kw - kw % 3
    if not full:
        return []
    return [f"for (int32_t i = 0; i < {full}; i += 3) {{ {xs}[i + 1] ^= {xs}[i]; {xs}[i + 2] ^= {xs}[i]; }}"]


def _quoted(text: list[str]) -> str:
    """Asm lines as the string literals of an ``__asm`` statement."""
    return "\n".join(f'      "{line}\\n\\t"' for line in text)


def float_pass(n: int, names: tuple[str, str, str, str] = ("y", "yi", "SC", "BI")) -> list[str]:
    """``y = SC * acc + BI`` over the integer accumulators ``yi`` (an int32 view of ``y``): eight
    rows a step in asm (a ``VMUL`` then a ``VADD``, the C expression's two roundings).
    ``names``: the C expressions of ``y``, ``yi``, ``SC``, ``BI``."""
    y, yi, sc, bi = names
    full = n - n % 8
    c_rows = lambda a, b: (
        f"for (int32_t j = {a}; j < {b}; ++j) {y}[j] = ({sc}[j] * (float){yi}[j]) + {bi}[j];"
    )
    if not full:
        return [c_rows(0, n)]
    text = ["1:", "vldmia %[y], {s0-s7}", *(f"vcvt.f32.s32 s{i}, s{i}" for i in range(8))]
    text += ["vldmia %[sc]!, {s8-s15}", *(f"vmul.f32 s{i}, s{i}, s{i + 8}" for i in range(8))]
    text += ["vldmia %[bi]!, {s8-s15}", *(f"vadd.f32 s{i}, s{i}, s{i + 8}" for i in range(8))]
    text += ["vstmia %[y]!, {s0-s7}", "cmp %[y], %[end]", "bne 1b"]
    clobbers = ", ".join(f'"s{i}"' for i in range(16))
    lines = [
        "#if BITC_W1A1_ASM && defined(__ARM_FP)",
        "{",
        f"  float *bitc_y8 = {y}; const float *bitc_sc = {sc}, *bitc_bi = {bi};",
        "  __asm volatile(",
        _quoted(text),
        f'      : [y] "+r"(bitc_y8), [sc] "+r"(bitc_sc), [bi] "+r"(bitc_bi) : [end] "r"({y} + {full})',
        f'      : {clobbers}, "cc", "memory");',
        "}",
        "#else",
        c_rows(0, full),
        "#endif",
    ]
    return lines + ([c_rows(full, n)] if n % 8 else [])


def w1a1_source(symbol: str, isa: str, rows: int, k: int, n: int, threshold: bool) -> str:
    """``XP (rows, KW) packed signs, P (stored by store_w1a1_words), epilogue, Y (rows, N)``:
    the float epilogue ``SC * acc + BI`` (``OF``: the portable kernel's unused offset) or the
    threshold one ``TS * acc >= TH ? +1 : -1``."""
    kw = -(-k // 32)
    if threshold:
        params = "int32_t* TS, int32_t* TH"
        out = [
            f"for (int32_t j = 0; j < {n}; ++j) y[j] = ((int64_t)TS[j] * yi[j] >= (int64_t)TH[j]) ? 1.0f : -1.0f;"
        ]
    else:
        params, out = "float* SC, float* OF, float* BI", float_pass(n)
    body = [
        f"for (int32_t m = 0; m < {rows}; ++m) {{",
        f"  const uint32_t *xs = (const uint32_t *)XP + m * {kw};",
        f"  float *y = Y + m * {n};",
        "  bitc_i32_alias *yi = (bitc_i32_alias*)y;",
    ]
    body += ["  " + line for line in rows_lines(isa, kw, k, n, ("xs", "P", "yi"))]
    body += [*("  " + line for line in out), "}"]
    return c_kernel(symbol, f"int32_t* XP, int32_t* P, {params}, float* Y", body)


PACK_REGS = ("r4", "r5", "r6", "r8", "r9", "r10", "r11", "lr")  # eight inputs a load (r7: gcc's)


def _pack_inputs(count: int) -> list[str]:
    """Asm: the ``count`` inputs below ``r2`` shifted into ``r0``, the highest first: bit = x >= 0,
    i.e. the float's bits ``u`` are at most ``0x80000000`` (-0.0) as an unsigned number: ``CMP``
    leaves that in the carry and ``ADC`` shifts it in. (A NaN with the sign bit clear would give 1;
    compiled models refuse non-finite inputs.)"""
    lines = []
    for chunk in [count % 8] * bool(count % 8) + [8] * (count // 8):
        regs = PACK_REGS[:chunk]
        lines.append(f"ldmdb r2!, {{{', '.join(regs)}}}")
        for r in reversed(regs):
            lines += [f"cmp r1, {r}", "adc r0, r0, r0"]
    return lines


def pack_sign_source(symbol: str, rows: int, k: int) -> str:
    """``X (rows, K) float -> XP (rows, KW)``: the sign bits of :func:`bitcompiler.kernels.pack_sign_rows`
    (bit ``j`` of word ``w``: ``X[32 w + j] >= 0``; zero past ``K``), 2 instructions an input."""
    kw, tail = -(-k // 32), k % 32
    text = ["mov r1, #0x80000000"]
    if tail:  # the partial last word first: the words are written from the last one down
        text += ["mov r0, #0", *_pack_inputs(tail), "str r0, [r3, #-4]!"]
    if k >= 32:
        text += ["1:", "mov r0, #0", *_pack_inputs(32), "str r0, [r3, #-4]!", "cmp r2, r12", "bne 1b"]
    body = [
        f"for (int32_t m = 0; m < {rows}; ++m) {{",
        "#if BITC_THUMB2_ASM",
        f'  register const float *bitc_x __asm("r2") = X + (m + 1) * {k};',
        f'  register int32_t *bitc_out __asm("r3") = XP + (m + 1) * {kw};',
        f'  register const float *bitc_begin __asm("r12") = X + m * {k};',
        "  __asm volatile(",
        _quoted(text),
        '      : "+r"(bitc_x), "+r"(bitc_out) : "r"(bitc_begin)',
        '      : "r0", "r1", "r4", "r5", "r6", "r8", "r9", "r10", "r11", "lr", "cc", "memory");',
        "#else",
        f"  for (int32_t w = 0; w < {kw}; ++w) {{",
        "    uint32_t b = 0;",
        f"    for (int32_t i = 0; i < 32 && 32 * w + i < {k}; ++i)",
        f"      b |= (uint32_t)(X[m * {k} + 32 * w + i] >= 0.0f) << i;",
        f"    XP[m * {kw} + w] = (int32_t)b;",
        "  }",
        "#endif",
        "}",
    ]
    return c_kernel(symbol, "float* X, int32_t* XP", body)
