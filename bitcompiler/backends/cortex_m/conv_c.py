"""Convs on Cortex-M in hand-written C, one output pixel at a time, with the float ops that follow
them fused in (:mod:`.fusion` decides which).

A conv is a :class:`Producer`: C lines that fill ``float v[O]``, the conv's outputs at pixel
``p = (oy, ox)``, through its epilogue. Two kinds:

* ``int8`` (groups 1, int8 activations, unsigned codes of at most 8 bits): the receptive field is
  gathered into one row of ``K = KH * KW * C`` int8 values (zeros where the window leaves the
  image) in the order the weights are stored: ``codes (O, KH, KW, C)`` as
  :func:`bitcompiler.kernels.codes_from_planes` gives them, four output channels a block as
  :func:`.dense_sources.store_int8_codes` stores a dense layer's rows. The row is then a dense
  layer's input: the same unpacking (``SXTB16`` pairs on DSP cores) and the same ``SMLAD`` /
  ``VMLADAVA`` / ``MLA`` loop (:mod:`.dense_sources`), exact int32 sums, and the numerics'
  epilogue with ``sumx`` the sum of the row (``F.conv2d(x, ones)``). On DSP cores (M4, M7, M55)
  a conv whose field ``K`` is at most 16 values (a stem: 1 -> 32 channels, 3x3) keeps the field
  in registers as 16-bit pairs instead (``pairs``): each channel's codes are stored as pairs too
  (``(O, ceil(K / 2))`` words, unshifted), loaded by ``LDM`` and summed by ``SMUAD`` / ``SMLAD``
  inside the loop over the channels, its epilogue and the chain in the same iteration, no
  ``v[O]`` array (the loop is unrolled over the channels: weights and epilogue at constant
  offsets, the sign packing an ``IT`` + ``ORR``, no data-dependent branch).
* ``binary`` (groups 1, packed sign activations, 1-bit pm1 weights): the tap words of the pixel
  are gathered once (zero words for taps outside the image) and are the input row of the W1A1
  dense kernel (:func:`.binary_c.rows_lines`: two output channels a pass sharing the words,
  carry-save adder over groups of three, SWAR counts, ``USADA8``, weights stored in its order
  by :func:`.binary_c.store_w1a1_words`). A tap outside the image then gives back what its zero
  words counted, ``C - 2 popcount(w_tap)`` (stored per tap and channel, ``WT``), so that
  ``acc = n_valid * C - 2 * count`` over the taps inside, as the portable kernel; then its
  threshold or float epilogue, in the portable kernel's expression.

The values then go through the fused chain (relu, hardtanh, add / sub / mul with a constant, with
a tensor of the same shape, or with another conv recomputed at the same pixel: ``Remat``), each
in the expression the float C step would run (so the results are bit for bit those), and into a
sink: the float map, the packed sign words the next binary convs read (bit ``o % 32`` of word
``o // 32`` set where ``v >= 0``), or the channel sums of a global average pool (added in pixel
order, divided once: the float step's order).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from bitcompiler.backends.cortex_m.binary_c import float_pass, prepare_lines, rows_lines
from bitcompiler.backends.cortex_m.conv_tables import table_lines
from bitcompiler.backends.cortex_m.dense_sources import ROWS, c_kernel, row_accumulators, unpack
from bitcompiler.backends.cortex_m.kernel_c import Kernel, KernelParam

LDM_REGS = ("r4", "r5", "r6", "r8")  # a channel's code pairs, four an LDM (five: gcc finds no registers)


@dataclass
class Param:
    """One pointer parameter of the fused kernel and the program value it is called with."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    arg: str  # a tensor name (arena) or a weight symbol (flash)
    scratch: bool = False  # a buffer the kernel writes before it reads it (per pixel)


@dataclass
class Producer:
    """A conv evaluated per output pixel. ``params``: its activation inputs, weights, epilogue and
    scratch, named with ``prefix`` so that two producers share one kernel."""

    kind: str  # "int8" or "binary"
    spec: Any  # kernels.ConvSpec
    prefix: str
    params: list[Param]
    isa: str = "scalar"
    shift: bool = False  # int8: codes stored as Q - 128
    chain: list[tuple] = field(default_factory=list)  # elementwise ops applied to v (see apply)
    tables: int = 0  # binary: the field bits of its lookup tables (.conv_tables), 0: popcount rows
    pairs: int = 0  # int8: words of 16-bit code pairs per channel (a small field, SMLAD), 0: blocks

    def n(self, name: str) -> str:
        return f"{self.prefix}{name}"

    def pixel(self, v: str) -> list[str]:
        """C lines filling ``float v[O]`` at pixel ``(oy, ox)`` (before the chain); with
        ``pairs``, the pixel's activation pairs only (:meth:`element` computes each channel)."""
        if self.pairs:
            w = f"const int32_t *{v}_w = {self.n('W')};"  # the asm's walk over the channels' pairs
            return [f"int32_t {v}_s = 0;", *self._pair_words(v), f"float {v}_f = (float){v}_s;", w]
        body = self._int8(v) if self.kind == "int8" else self._binary(v)
        return [f"float {v}[{self.spec.out_channels}];", "{", *("  " + line for line in body), "}"]

    def value(self, v: str) -> str:
        """The C value of channel ``j`` once :meth:`element`'s lines ran."""
        return f"{v}_e" if self.pairs else f"{v}[j]"

    def element(self, v: str, regs: int = 4) -> list[str]:
        """With ``pairs``: channel ``j``'s value ``v_e`` inside the loop over the channels, the
        exact int32 sum by SMLADs of the stored code pairs (loaded ``regs`` words at a time), then
        the int8 epilogue."""
        if not self.pairs:
            return []
        n = self.n
        sums = [f"{v}_a = bitc_smlad({v}_wj[{i}], {v}_x{i}, {v}_a);" for i in range(1, self.pairs)]
        out = f"(({n('sa')}[j] * (float){v}_a) + ({n('sb')}[j] * {v}_f)) + {n('BI')}[j]"
        c = [
            f"const int32_t *{v}_wj = {n('W')} + j * {self.pairs};",
            f"{v}_a = bitc_smuad({v}_wj[0], {v}_x0);",
            *sums,
        ]
        asm = [
            "#if BITC_W1A1_ASM /* Thumb-2 with DSP, optimized */",
            *self._pairs_asm(v, LDM_REGS[:regs]),
            "#else",
        ]
        return [f"int32_t {v}_a;", *asm, *c, "#endif", f"float {v}_e = {out};"]

    def _pairs_asm(self, v: str, regs: tuple[str, ...]) -> list[str]:
        """Channel ``j``'s sum in Thumb-2: its code pairs by LDMs of up to ``len(regs)`` words
        (walking ``{v}_w``; C would load them one by one), SMUAD, SMLADs."""
        text, k = [], len(regs)
        for i in range(self.pairs):
            now, r = regs[: min(k, self.pairs - i)], regs[i % k]
            if i % k == 0:
                text.append(f"ldm %[w]!, {{{', '.join(now)}}}" if len(now) > 1 else f"ldr {r}, [%[w]], #4")
            text.append(f"smlad %[a], {r}, %[x{i}], %[a]" if i else f"smuad %[a], {r}, %[x0]")
        ins = ", ".join(f'[x{i}] "r"({v}_x{i})' for i in range(self.pairs))
        clobbers = ", ".join(f'"{r}"' for r in regs[: self.pairs])
        body = "\\n\\t".join(text)
        return [f'__asm("{body}" : [a] "=&r"({v}_a), [w] "+r"({v}_w) : {ins} : {clobbers});']

    def _pair_words(self, v: str) -> list[str]:
        """The receptive field's int8 values (zero outside the image) as 16-bit pairs
        ``{v}_x<i>`` (values ``2i``, ``2i + 1`` in the weights' order ``(KH, KW, C)``), their
        sum ``{v}_s``."""
        s, n = self.spec, self.n
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = s.kernel, s.stride, s.padding, s.dilation
        lines: list[str] = []
        xs: list[str] = []
        for u in range(kh):
            lines.append(f"int32_t {v}_y{u} = oy * {sh} - {ph + -u * dh};")
        for t in range(kw):
            lines.append(f"int32_t {v}_c{t} = ox * {sw} - {pw + -t * dw};")
        for u in range(kh):
            for t in range(kw):
                inside = f"(uint32_t){v}_y{u} < {s.in_h}u && (uint32_t){v}_c{t} < {s.in_w}u"
                at = f"{v}_y{u} * {s.in_w} + {v}_c{t}"
                for c in range(s.in_channels):
                    x = f"{v}_v{len(xs)}"
                    plane = f" + {c * s.in_h * s.in_w}" if c else ""
                    lines.append(f"int32_t {x} = ({inside}) ? {n('XQ')}[{at}{plane}] : 0;")
                    xs.append(x)
        lines.append(f"{v}_s = {' + '.join(xs)};")
        for i in range(self.pairs):
            hi = f" | (int32_t)((uint32_t){xs[2 * i + 1]} << 16)" if 2 * i + 1 < len(xs) else ""
            lines.append(f"int32_t {v}_x{i} = ({xs[2 * i]} & 0xFFFF){hi};")
        return lines

    def _window(self, inner: list[str], outside: list[str] | None = None) -> list[str]:
        s = self.spec
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = s.kernel, s.stride, s.padding, s.dilation
        lines = [
            f"for (int32_t u = 0; u < {kh}; ++u) {{",
            f"  int32_t iy = oy * {sh} - {ph} + u * {dh};",
            *([] if outside else [f"  if (iy < 0 || iy >= {s.in_h}) continue;"]),
            f"  for (int32_t t = 0; t < {kw}; ++t) {{",
            f"    int32_t ix = ox * {sw} - {pw} + t * {dw};",
        ]
        if outside:
            cond = f"iy < 0 || iy >= {s.in_h} || ix < 0 || ix >= {s.in_w}"
            lines += [f"    if ({cond}) {{ {' '.join(outside)} }}", f"    else {{ {' '.join(inner)} }}"]
        else:
            lines += [f"    if (ix < 0 || ix >= {s.in_w}) continue;", *("    " + x for x in inner)]
        return [*lines, "  }", "}"]

    def _int8(self, v: str) -> list[str]:
        s, n = self.spec, self.n
        c, hw, k, o = (
            s.in_channels,
            s.in_h * s.in_w,
            s.kernel[0] * s.kernel[1] * s.in_channels,
            s.out_channels,
        )
        row = f"int8_t *r = {n('R')} + (u * {s.kernel[1]} + t) * {c};"
        fill = f"const int8_t *xi = {n('XQ')} + iy * {s.in_w} + ix; for (int32_t i = 0; i < {c}; ++i) r[i] = xi[i * {hw}];"
        zero = f"for (int32_t i = 0; i < {c}; ++i) r[i] = 0;"
        fix = ["acc += 128 * sumx; /* codes stored as Q - 128 */"] if self.shift else []
        out = f"(({n('sa')}[j] * (float)acc) + ({n('sb')}[j] * (float)sumx)) + {n('BI')}[j]"
        rows = []
        for r in range(ROWS):
            guard = "" if o % ROWS == 0 else f"if (j0 + {r} < {o}) "
            rows.append(f"{guard}{{ int32_t j = j0 + {r}, acc = a{r}; {' '.join(fix)} {v}[j] = {out}; }}")
        return [
            *self._window([row, fill], [row, zero]),
            f"const int8_t *x = {n('R')}, *w = {n('W')};",
            *(["int32_t *XU = " + n("XU") + ";"] if self.isa != "mve" else []),
            "int32_t sumx = 0;",
            *unpack(self.isa, k),
            f"for (int32_t j0 = 0; j0 < {o}; j0 += {ROWS}) {{",
            "  int32_t a0 = 0, a1 = 0, a2 = 0, a3 = 0;",
            *("  " + line for line in row_accumulators(self.isa, k)),
            *("  " + line for line in rows),
            "}",
        ]

    def prologue(self) -> list[str]:
        """C lines before the pixel loop: an int8 conv's ``SC * XS`` and ``OF * XS`` per channel
        (the same float products the epilogue would form per pixel)."""
        if self.kind != "int8":
            return []
        n, o = self.n, self.spec.out_channels
        return [
            f"float {n('sa')}[{o}], {n('sb')}[{o}];",
            f"for (int32_t j = 0; j < {o}; ++j) {{ {n('sa')}[j] = {n('SC')}[j] * {n('XS')}[0]; {n('sb')}[j] = {n('OF')}[j] * {n('XS')}[0]; }}",
        ]

    def _epilogue(self, v: str) -> list[str]:
        """``v[j]`` from the integer ``acc`` and ``nv`` taps inside the image, in the portable
        kernel's expression."""
        s, n = self.spec, self.n
        if s.threshold:
            hit = f"(int64_t){n('TS')}[j] * (int64_t)acc >= (int64_t){n('TH')}[j]"
            return [f"{v}[j] = ({hit}) ? 1.0f : -1.0f;"]
        value = f"({n('SC')}[j] * (float)acc)"
        if s.has_offset:
            value = f"({value} + ({n('OF')}[j] * (float)(2 * sx - nv * {s.cg})))"
        return [f"{v}[j] = {value} + {n('BI')}[j];"]

    def _binary(self, v: str) -> list[str]:
        """The pixel's tap words gathered once (zero words for taps outside the image), prepared
        and run through the W1A1 dense rows (:func:`.binary_c.rows_lines`) into ``v`` as int32;
        a tap outside the image then takes back its ``C - 2 popcount(w)`` (``WT``), so that
        ``acc = nv * C - 2 popcount`` over the taps inside as the portable kernel."""
        s, n = self.spec, self.n
        cw, taps, o = s.words_per_group, s.kernel[0] * s.kernel[1], s.out_channels
        words = taps * cw
        tap = f"(u * {s.kernel[1]} + t)"
        inside = [
            f"const int32_t *src = {n('XP')} + (iy * {s.in_w} + ix) * {cw};",
            f"for (int32_t i = 0; i < {cw}; ++i) a[{tap} * {cw} + i] = (uint32_t)src[i];",
        ]
        outside = [f"for (int32_t i = 0; i < {cw}; ++i) a[{tap} * {cw} + i] = 0;", f"miss[nm++] = {tap};"]
        sumx = [
            "int32_t sx = 0;",
            f"for (int32_t i = 0; i < {words}; ++i) sx += bitc_popcount((int32_t)a[i]);",
        ]
        isa = "scalar" if self.isa == "scalar" else "dsp"  # M55: the Thumb-2 DSP loop too
        if self.tables:
            sums = table_lines(isa, s, self.tables, ("a", n("P"), "yi"))
        else:
            # the gathered words are the kernel's own: prepared in place, read there by the rows
            sums = [
                *prepare_lines("a", words),
                *rows_lines(isa, words, taps * s.cg, o, ("a", n("P"), "yi"), True),
            ]
        lines = [
            f"uint32_t a[{words}];",
            f"int32_t miss[{taps}], nm = 0;",
            "bitc_i32_alias *yi = (bitc_i32_alias*)" + v + ";",
            *self._window(inside, outside),
            *(sumx if s.has_offset and not s.threshold else []),
            *sums,
            *(self._outside_taps() if any(s.padding) else []),
        ]
        if not s.threshold and not s.has_offset:  # SC * acc + BI: the dense kernel's float pass
            return lines + float_pass(o, (v, "yi", n("SC"), n("BI")))
        return [
            *lines,
            *([f"int32_t nv = {taps} - nm;"] if s.has_offset and not s.threshold else []),
            f"for (int32_t j = 0; j < {o}; ++j) {{",
            "  int32_t acc = yi[j];",
            *("  " + line for line in self._epilogue(v)),
            "}",
        ]

    def _outside_taps(self) -> list[str]:
        """Each tap outside the image gives back its ``C - 2 popcount(w)`` (``WT (taps, O)``)."""
        o, wt = self.spec.out_channels, next(p for p in self.params if p.name == self.n("WT"))
        return [
            "for (int32_t i = 0; i < nm; ++i) {",
            f"  const {wt.dtype}_t *c = {wt.name} + miss[i] * {o};",
            f"  for (int32_t j = 0; j < {o}; ++j) yi[j] -= c[j];",
            "}",
        ]


@dataclass
class Sink:
    """Where the fused values go: ``float`` (``Y (O, OH, OW)``), ``packed`` (``YP (OH, OW, words)``)
    or ``mean`` (``Y (O,)``: the average over the pixels)."""

    kind: str
    out: str  # the tensor written


def apply(chain: list[tuple], value: str, operand: Any) -> list[str]:
    """C statements applying ``chain`` to the float ``e`` (initially ``value``), element ``j``.

    Ops: ``("relu",)``, ``("hardtanh", lo, hi)``, ``("binop", op, kind, what, first)`` with kind
    ``scalar`` (a C literal), ``tensor`` or ``remat`` (``operand(what)``: its C element), and
    ``first``: the chain's value is the op's first operand."""
    lines = [f"float e = {value};"]
    for op in chain:
        if op[0] == "relu":
            lines.append("e = e > 0.0f ? e : 0.0f;")
        elif op[0] == "hardtanh":
            lo, hi = op[1], op[2]
            lines.append(f"e = e < {lo} ? {lo} : (e > {hi} ? {hi} : e);")
        else:
            _, sym, kind, what, first = op
            other = what if kind == "scalar" else operand(kind, what)
            lines.append(f"e = e {sym} {other};" if first else f"e = {other} {sym} e;")
    return lines


def fused_source(
    symbol: str, producer: Producer, remats: list[Producer], tensors: list[Param], sink: Sink
) -> str:
    """The kernel: per pixel, the remat producers' values (their chains applied), the producer's,
    its chain (operands: ``tensors`` by name ``T<i>``, remats by index) and the sink."""
    s = producer.spec
    o, hw, ow = s.out_channels, s.out_h * s.out_w, s.out_w
    names = {p.arg: f"T{i}" for i, p in enumerate(tensors)}

    def operand(kind: str, what: str) -> str:
        if kind == "tensor":
            return f"{names[what]}[j * {hw} + p]"
        return f"re{what}" if remats[int(what)].chain else remats[int(what)].value(f"rv{what}")

    body: list[str] = [line for p in (producer, *remats) for line in p.prologue()]
    if sink.kind == "mean":
        body.append(f"for (int32_t j = 0; j < {o}; ++j) Y[j] = 0.0f;")
    body += [f"for (int32_t p = 0; p < {hw}; ++p) {{", f"  int32_t oy = p / {ow}, ox = p % {ow};"]
    for i, r in enumerate(remats):
        body += ["  " + line for line in r.pixel(f"rv{i}")]
    # the remats' chains at their use: in the loop over the channels with the producer's chain
    # four words an LDM; two when two convs' pairs are live at once (gcc finds no registers)
    regs = 4 if sum(bool(r.pairs) for r in (producer, *remats)) < 2 else 2
    uses = [line for i, r in enumerate(remats) for line in r.element(f"rv{i}", regs)]
    uses += [
        line
        for i, r in enumerate(remats)
        if r.chain
        for line in (f"float re{i};", "{", *apply(r.chain, r.value(f"rv{i}"), operand), f"  re{i} = e;", "}")
    ]
    uses += producer.element("v", regs)
    words = -(-o // 32)
    # pair producers: every channel's weights and epilogue at constant offsets
    unroll = o if any(r.pairs for r in (producer, *remats)) and o <= 64 else 8
    body += ["  " + line for line in producer.pixel("v")]
    if sink.kind == "packed":
        body.append(f"  uint32_t bits[{words}] = {{0}};")
    body += [
        f"  #pragma GCC unroll {unroll}",
        f"  for (int32_t j = 0; j < {o}; ++j) {{",
        *("    " + line for line in uses),
    ]
    body += ["    " + line for line in apply(producer.chain, producer.value("v"), operand)]
    if sink.kind == "float":
        body.append(f"    Y[j * {hw} + p] = e;")
    elif sink.kind == "mean":
        body.append("    Y[j] += e;")
    else:
        body.append("    if (e >= 0.0f) bits[j >> 5] |= 1u << (j & 31);  /* unrolled: IT + ORR */")
    body.append("  }")
    if sink.kind == "packed":
        body.append(f"  for (int32_t q = 0; q < {words}; ++q) Y[p * {words} + q] = (int32_t)bits[q];")
    body.append("}")
    if sink.kind == "mean":
        body.append(f"for (int32_t j = 0; j < {o}; ++j) Y[j] = Y[j] / {float(hw)!r}f;")
    params = kernel_params(producer, remats, tensors, sink)
    return c_kernel(symbol, ", ".join(f"{p.c_type}* {p.name}" for p in params), body)


def kernel_params(
    producer: Producer, remats: list[Producer], tensors: list[Param], sink: Sink
) -> list[KernelParam]:
    ps = [*producer.params, *(p for r in remats for p in r.params)]
    out = [KernelParam(p.name, p.dtype, p.shape) for p in ps]
    out += [KernelParam(f"T{i}", t.dtype, t.shape) for i, t in enumerate(tensors)]
    s = producer.spec
    shape = {"float": (s.out_channels, s.out_h, s.out_w), "mean": (s.out_channels,)}
    dtype = "int32" if sink.kind == "packed" else "float32"
    return [
        *out,
        KernelParam("Y", dtype, shape.get(sink.kind, (s.out_h * s.out_w * -(-s.out_channels // 32),))),
    ]


def fused_kernel(
    symbol: str, producer: Producer, remats: list[Producer], tensors: list[Param], sink: Sink
) -> tuple[Kernel, list[str]]:
    """The kernel and the program values it is called with, in parameter order."""
    params = kernel_params(producer, remats, tensors, sink)
    args = [p.arg for p in (*producer.params, *(p for r in remats for p in r.params), *tensors)] + [sink.out]
    return Kernel(symbol, tuple(params), fused_source(symbol, producer, remats, tensors, sink)), args
