"""W1A1 convs on Cortex-M by lookup tables: the sums of 32 output channels at once, with no
bit counting at run time.

At an output pixel the activations of one tap are ``CW`` packed sign words. Cut each word into
fields of ``b`` bits (``b`` = 4: nibbles, or 8: bytes); for each field ``l`` (tap, word, position)
the table holds, for each of its ``2^b`` values ``v`` and each output channel ``o``, the number of
matching bits ``popcount(~(v ^ w_o) & valid)`` as one byte: 32 channels are 8 words. A pixel then
costs, per field and 32 channels, an extract (``UBFX``), the entry's address (two ``ADD``), its 8
words (three ``LDM``) and 8 ``ADD`` into byte accumulators held in registers: 14 instructions for
``32 b`` bit products (the popcount rows cost about 8 instructions per word and channel).

The byte sums stay exact below 256: after the fields whose widths add up to 255 (63 nibbles,
31 bytes) they are widened into 16-bit lanes in the stack (``UXTB16`` / ``UXTAB16`` on DSP cores,
masks on the M3), and the last chunk writes ``acc = 2 m - K`` per channel (``m`` the matches, ``K
= taps * C``): the popcount kernel's ``K - 2 popcount(x ^ w)``, zero words for taps outside the
image included, so that :mod:`.conv_c` takes back those taps with its ``WT`` as before.

Flash: ``ceil(O / 32) * fields * 2^b * 32`` bytes (the issue CNN's 32->32 3x3: 36 KiB with
nibbles, 288 KiB with bytes). :func:`choose_bits` takes the widest that fits the board's budget.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from bitcompiler.errors import TargetError

BLOCK = 32  # output channels a pass: 8 words of byte sums in registers
ACC = ("r0", "r1", "r2", "r3", "r4", "r5", "r6", "r8")
X, T, TB = "r9", "r10", "r11"
TEMPS = ("r7", "r12", "lr")  # r7 saved and restored in the frame (gcc's frame pointer at -O0)
WIDE, SAVE_R7, SAVE_TB, SAVE_OUT, SAVE_END, SAVE_XS = 0, 64, 68, 72, 76, 80
FRAME = 88
MAX_WORDS = 240  # activation words a pixel (the C loop beyond)


def fields(taps: int, cw: int, c: int, bits: int) -> list[tuple[int, int, int]]:
    """``(word, position, valid bits)`` of each lookup: the pixel's words ``taps * cw`` (word ``w``
    of a tap holds channels ``32 w ..``, of which ``c`` are valid)."""
    out = []
    for i in range(taps * cw):
        valid = min(32, c - 32 * (i % cw))
        out += [(i, pos, min(bits, valid - pos)) for pos in range(0, valid, bits)]
    return out


def table_bytes(spec: Any, bits: int) -> int:
    """Flash of a conv's (``kernels.ConvSpec``) tables of ``bits``-bit fields."""
    s = spec
    blocks = -(-s.out_channels // BLOCK)
    n = len(fields(s.kernel[0] * s.kernel[1], s.words_per_group, s.cg, bits))
    return blocks * n * (1 << bits) * BLOCK


def choose_bits(spec: Any, budget: int, option: object = "auto") -> int:
    """The field width of a layer's tables (8, 4) or 0 (the popcount rows): ``option`` "auto"
    takes the widest whose tables fit ``budget`` bytes; 4 or 8 force one; "off" none."""
    if option not in ("auto", "off", 4, 8, "4", "8"):
        raise TargetError(
            f"conv_tables={option!r}: use 'auto' (the default), 4 (nibbles), 8 (bytes) or 'off'"
        )
    s = spec
    words = s.kernel[0] * s.kernel[1] * s.words_per_group
    if option == "off" or s.groups != 1 or words > MAX_WORDS or s.out_channels < 16:
        return 0
    if s.kernel[0] * s.kernel[1] * s.cg >= 1 << 15:
        return 0  # the sums' 16-bit lanes
    widths = (8, 4) if option == "auto" else (int(str(option)),)
    return next((b for b in widths if table_bytes(spec, b) <= budget), 0)


def store_tables(planes: np.ndarray, taps: int, cw: int, c: int, bits: int) -> np.ndarray:
    """``planes (O, taps * cw)`` sign words -> the tables ``(blocks, fields, 2^b, 32)`` bytes
    (matches of value ``v`` with channel ``32 blk + j``'s field at byte ``j``), as int32 words."""
    w = planes.astype(np.uint32)
    o = w.shape[0]
    blocks = -(-o // BLOCK)
    fl = fields(taps, cw, c, bits)
    v = np.arange(1 << bits, dtype=np.uint32)
    out = np.zeros((blocks * BLOCK, len(fl), 1 << bits), np.uint8)
    for n, (i, pos, width) in enumerate(fl):
        mask = np.uint32((1 << width) - 1)
        wf = (w[:, i] >> np.uint32(pos)) & mask  # (O,)
        diff = (v[None, :] ^ wf[:, None]) & mask
        ones = np.unpackbits(diff.astype(">u4").view(np.uint8).reshape(o, -1, 4), axis=-1).sum(-1)
        out[:o, n] = width - ones
    out = out.reshape(blocks, BLOCK, len(fl), 1 << bits).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(out).reshape(-1).view(np.int32)


def _extract(pos: int, bits: int) -> str:
    if pos == 0 and bits == 8:
        return f"uxtb {T}, {X}"
    if pos + bits >= 32:
        return f"lsr {T}, {X}, #{pos}"
    return f"ubfx {T}, {X}, #{pos}, #{bits}"


def _lookup(i_pos: tuple[int, int], off: int, first: bool, bits: int, word_changes: bool) -> list[str]:
    i, pos = i_pos
    lines = [f"ldr {X}, [sp, #{SAVE_XS}]", f"ldr {X}, [{X}, #{4 * i}]"] if word_changes else []
    lines += [_extract(pos, bits), f"add {T}, {TB}, {T}, lsl #5"]
    lines += [f"add {T}, {T}, #{off}"] if off else []
    if first:  # the chunk's first entry: straight into the accumulators
        return [*lines, f"ldm {T}, {{{', '.join(ACC)}}}"]
    regs = ", ".join(TEMPS)
    for k, acc in enumerate((ACC[:3], ACC[3:6], ACC[6:])):
        last = k == 2
        loaded = TEMPS[: len(acc)]
        lines.append(f"ldm {T}{'' if last else '!'}, {{{', '.join(loaded) if last else regs}}}")
        lines += [f"add {a}, {a}, {t}" for a, t in zip(acc, loaded)]
    return lines


def _widen(isa: str, first: bool) -> list[str]:
    """The byte sums into the 16-bit lanes at ``sp + WIDE``: ``lo`` (bytes 0, 2) and ``hi``
    (bytes 1, 3) of each word, stored as ``lo, hi`` pairs."""
    lines = [f"add lr, sp, #{WIDE}"]
    for q in range(0, 8, 2):
        regs = ("r7", X, T, "r12")
        if not first:
            lines.append(f"ldm lr, {{{', '.join(regs)}}}")
        for k in range(2):
            lines += _lanes(isa, ACC[q + k], regs[2 * k], regs[2 * k + 1], first)
        lines.append(f"stmia lr!, {{{', '.join(regs)}}}")
    return lines


def _lanes(isa: str, a: str, lo: str, hi: str, first: bool) -> list[str]:
    """``lo (+)= bytes 0, 2 of a``, ``hi (+)= bytes 1, 3`` (``a`` is spent)."""
    if isa == "dsp":
        if first:
            return [f"uxtb16 {lo}, {a}", f"uxtb16 {hi}, {a}, ror #8"]
        return [f"uxtab16 {lo}, {lo}, {a}", f"uxtab16 {hi}, {hi}, {a}, ror #8"]
    if first:
        return [f"and {lo}, {a}, #0x00FF00FF", f"and {a}, {a}, #0xFF00FF00", f"lsr {hi}, {a}, #8"]
    return [
        f"add {lo}, {lo}, {a}",
        f"and {a}, {a}, #0xFF00FF00",
        f"sub {lo}, {lo}, {a}",
        f"add {hi}, {hi}, {a}, lsr #8",
    ]


def _finish(isa: str, widened: bool, k: int) -> list[str]:
    """``out[4 q + j] = 2 m - K`` from the last chunk's byte sums (and the lanes before them)."""
    lines = [f"str {TB}, [sp, #{SAVE_TB}]", f"ldr lr, [sp, #{SAVE_OUT}]", f"movw {TB}, #{k}"]
    for q, a in enumerate(ACC):
        if widened:
            lines.append(f"ldrd r7, {X}, [sp, #{WIDE + 8 * q}]")
        lines += _lanes(isa, a, "r7", X, not widened)
        lines += [
            f"uxth {T}, r7",
            f"rsb {T}, {TB}, {T}, lsl #1",
            f"uxth r12, {X}",
            f"rsb r12, {TB}, r12, lsl #1",
        ]
        lines += [f"strd {T}, r12, [lr], #8", f"rsb {T}, {TB}, r7, lsr #15", f"rsb r12, {TB}, {X}, lsr #15"]
        lines.append(f"strd {T}, r12, [lr], #8")
    return [*lines, f"str lr, [sp, #{SAVE_OUT}]", f"ldr {TB}, [sp, #{SAVE_TB}]"]


def _chunks(fl: list[tuple[int, int, int]]) -> list[list[int]]:
    """Lookups in chunks whose byte sums stay below 256."""
    out: list[list[int]] = [[]]
    total = 0
    for n, (_, _, width) in enumerate(fl):
        if total + width > 255:
            out.append([])
            total = 0
        out[-1].append(n)
        total += width
    return out


def _block_asm(isa: str, fl: list[tuple[int, int, int]], bits: int, k: int) -> list[str]:
    """One block of 32 channels: every chunk of lookups, its widening, the outputs; ``TB``
    advanced to the next block's tables."""
    size = (1 << bits) * BLOCK  # bytes of one field's table
    lines, base, word = [], 0, -1
    chunks = _chunks(fl)
    for c, chunk in enumerate(chunks):
        for j, n in enumerate(chunk):
            if n - base >= 128:  # keep the offsets encodable
                lines.append(f"add {TB}, {TB}, #{(n - base) * size}")
                base = n
            i, pos, _ = fl[n]
            lines += _lookup((i, pos), (n - base) * size, j == 0, bits, i != word)
            word = i
        if c < len(chunks) - 1:
            lines += _widen(isa, c == 0)
            word = -1  # the widening spent X
    lines += _finish(isa, len(chunks) > 1, k)
    return [*lines, f"add {TB}, {TB}, #{(len(fl) - base) * size}"]


def table_asm(
    isa: str, fl: list[tuple[int, int, int]], bits: int, k: int, names: tuple[str, ...]
) -> list[str]:
    """The Thumb-2 statement: ``out[j] = 2 m_j - k`` for every block (``names``: the C
    expressions of the words, the tables, ``out`` and the tables' end)."""
    from bitcompiler.backends.cortex_m.binary_c import _quoted

    xs, tab, out, end = names
    text = [f"sub sp, sp, #{FRAME}", f"str r7, [sp, #{SAVE_R7}]", f"str r0, [sp, #{SAVE_XS}]"]
    text += [f"str r2, [sp, #{SAVE_OUT}]", f"str r3, [sp, #{SAVE_END}]", f"mov {TB}, r1"]
    text += ["1:", *_block_asm(isa, fl, bits, k), f"ldr r12, [sp, #{SAVE_END}]", f"cmp {TB}, r12", "bne 1b"]
    text += [f"ldr r7, [sp, #{SAVE_R7}]", f"add sp, sp, #{FRAME}"]
    return [
        "{",
        f'  register const uint32_t *bitc_xs __asm("r0") = {xs};',
        f'  register const int32_t *bitc_tab __asm("r1") = {tab};',
        f'  register int32_t *bitc_out __asm("r2") = {out};',
        f'  register const int32_t *bitc_end __asm("r3") = {end};',
        "  __asm volatile(",
        _quoted(text),
        '      : "+r"(bitc_xs), "+r"(bitc_tab), "+r"(bitc_out), "+r"(bitc_end)',
        "      :",
        '      : "r4", "r5", "r6", "r8", "r9", "r10", "r11", "r12", "lr", "cc", "memory");',
        "}",
    ]


def table_c(fl: list[tuple[int, int, int]], bits: int, k: int, o: int, names: tuple[str, ...]) -> list[str]:
    """The same sums in C (host builds): field values from ``xs``, bytes from the tables."""
    xs, tab, out, _ = names
    n, blocks = len(fl), -(-o // BLOCK)
    words = ", ".join(str(i) for i, _, _ in fl)
    shifts = ", ".join(str(p) for _, p, _ in fl)
    return [
        f"static const uint16_t bitc_fw[{n}] = {{{words}}};",
        f"static const uint8_t bitc_fp[{n}] = {{{shifts}}};",
        f"const uint8_t *bitc_t8 = (const uint8_t *){tab};",
        f"for (int32_t j = 0; j < {blocks * BLOCK}; ++j) {{",
        "  int32_t bitc_m = 0;",
        f"  for (int32_t l = 0; l < {n}; ++l) {{",
        f"    uint32_t bitc_v = ({xs}[bitc_fw[l]] >> bitc_fp[l]) & {(1 << bits) - 1}u;",
        f"    bitc_m += bitc_t8[(((j / {BLOCK}) * {n} + l) * {1 << bits} + bitc_v) * {BLOCK} + j % {BLOCK}];",
        "  }",
        f"  {out}[j] = 2 * bitc_m - {k};",
        "}",
    ]


def table_lines(isa: str, spec: Any, bits: int, names: tuple[str, str, str]) -> list[str]:
    """C lines of ``yi[j] = K - 2 popcount`` over the pixel's gathered words by the tables
    (``names``: the C expressions of the words, the tables and ``yi``)."""
    s = spec
    taps, cw, c, o = s.kernel[0] * s.kernel[1], s.words_per_group, s.cg, s.out_channels
    fl, k = fields(taps, cw, c, bits), taps * c
    blocks = -(-o // BLOCK)
    xs, tab, yi = names
    out = yi if o % BLOCK == 0 else "bitc_tacc"
    end = f"{tab} + {blocks * len(fl) * (1 << bits) * BLOCK // 4}"
    both = (xs, tab, out, end)
    lines = [] if out == yi else [f"int32_t bitc_tacc[{blocks * BLOCK}];"]
    lines += ["#if BITC_THUMB2_ASM", *table_asm(isa, fl, bits, k, both), "#else"]
    lines += [*table_c(fl, bits, k, o, both), "#endif"]
    if out != yi:
        lines.append(f"for (int32_t j = 0; j < {o}; ++j) {yi}[j] = bitc_tacc[j];")
    return lines
