"""Dense bit layer kernel: ``Y (M, N) = epilogue(acc, sumx)`` over packed weight planes ``P (B, N, KW)``.

Computation (exactly :func:`bitcompiler.quant.numerics.bit_linear`):

* ``act="binary"``: activations arrive packed (``XP (M, KW)``, bit 1 = +1). With pm1 weights
  ``acc = K - 2 * sum_w popcount(XP ^ P)`` (the zero tails XOR to 0); with uint weights
  ``acc = sum_i 2^i * (popcount(P_i & XP) - popcount(P_i & ~XP))`` (``P_i`` has a zero tail, so
  ``~XP``'s tail never counts). ``sumx = 2 * popcount(XP) - K``.
* ``act="int8"`` / ``"float"``: the weight bits are read on the fly from the planes and select
  the activation into an int32 (int8) or float32 (float) accumulator (see the schedule notes). ``sumx`` is computed once per row by its own small block (it does not depend on n).
* Epilogue (block ``Y``): ``(scale[n] * s) * acc + (offset[n] * s) * sumx + bias[n]`` in float32
  (the offset term is dropped when ``has_offset`` is False), or with a threshold
  ``+1 if thr_sign[n] * acc >= thr[n] else -1`` on the exact integer ``acc``.

Schedule for the host CPU (``target="llvm"``), chosen by measuring the W1A1 4096x4096 layer on
AVX2 (see the module-level numbers in the package docstring):

* W1A1 and the other packed-activation kernels: :mod:`bitcompiler.kernels.dense_binary`.
* int8 (bits <= 7) / float (N % 8 == 0) on an AVX2 CPU: :mod:`bitcompiler.kernels.dense_int8` / :mod:`bitcompiler.kernels.dense_avx2`,
  explicit vector TIR (``vpmaddubsw`` on codes decoded from 256-bit plane loads; ``vpermps``
  lookups in per-3-activation subset-sum tables). W2A8 4096x4096 batch 1: 2.5 -> 0.33 ms,
  W1 float: 1.0 -> 0.54 ms; batch 64: ~7x and ~2x faster than the schedule below. With constant
  weights (:func:`relaid_dense_kernel`) W2A8 on an AVX-512 VNNI CPU: ``vpdpbusd``
  (:mod:`bitcompiler.kernels.dense_vnni`).
* int8 / float otherwise: the 32 bits of a word are the vectorized inner loop (rfactor over the bit index);
  lane ``j`` tests its bit as ``(word & (1 << j)) == (1 << j)`` (a constant mask vector: and +
  compare, no variable shift) and selects ``x`` or 0, so a pm1 row accumulates
  ``sum_{bit=1} x`` and ``acc = 2 * that - sumx`` (``sumx`` then always computed), a uint row
  ``sum_i 2^i sum_{bit_i=1} x``. 2 output rows share each activation vector for one plane, 1 row
  for more planes (register pressure). A row tail (K % 32) is its own small reduction block so
  the main loop never needs a bounds check.

Any other target kind gets the same computation unscheduled (serial loops, int32 words) -- plain
portable TIR that a C (Cortex-M) or GPU backend schedules or emits as it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from tvm import s_tir, te, tirx

from bitcompiler.kernels import (
    amx_tiles,
    dense_avx2,
    dense_fcodes,
    dense_int8,
    dense_lanes,
    dense_vnni,
    dense_vpop,
)
from bitcompiler.kernels._common import (
    as_i32,
    batch_var,
    divisors,
    i64,
    largest_divisor,
    shape64,
    target_kind,
    threshold_output,
)
from bitcompiler.kernels.dense_binary import (
    binary_bytes_func,
    binary_words_func,
    byte_layout,
    schedule_binary,
    tile_epilogue,
)
from bitcompiler.kernels.spec import DenseSpec, centered_offset_expr
from bitcompiler.kernels.template import Choose, Template, hand, scheduled

F32 = "float32"


def _unpacked_func(spec: DenseSpec) -> tirx.PrimFunc:
    """TE for act="int8" / "float": codes unpacked on the fly from the planes (centered codes,
    ``spec.center``: the signed code ``Q - center`` times the activation)."""
    K, N, B, KW = spec.in_features, spec.out_features, spec.bits, spec.words
    KF, REM = spec.full_words, spec.tail_bits
    M = batch_var()
    if spec.act == "float":
        X = te.placeholder(shape64(M, K), F32, "X")
        inputs = [X]
        acc_t = F32

        def xval(m, k):
            return X[m, k].astype(acc_t)

    else:
        XQ = te.placeholder(shape64(M, K), "int8", "XQ")
        XS = te.placeholder(shape64(M), F32, "XS")
        inputs = [XQ, XS]
        acc_t = "int32"

        def xval(m, k):
            return XQ[m, k].astype("int32")

    P = te.placeholder(shape64(B, N, KW), "int32", "P")
    pm1 = spec.code == "pm1"

    def term(m, n, w, j):
        # bit j selected by a per-lane constant mask: and + compare + and per lane (no variable shift)
        x = xval(m, w * 32 + j)
        bit = tirx.const(1, "int32") << as_i32(j)
        zero = tirx.const(0, acc_t)
        if spec.center:  # the signed code Q - center as an integer, then one product
            one, none = tirx.const(1, "int32"), tirx.const(0, "int32")
            q = tirx.const(-spec.center, "int32")
            for i in range(B):
                q = q + tirx.Select((P[i, n, w] & bit) == bit, one << i, none)
            return x * q.astype(acc_t)
        t = tirx.Select((P[0, n, w] & bit) == bit, x, zero)
        for i in range(1, B):
            xi = x * tirx.const(2**i, acc_t)
            t = t + tirx.Select((P[i, n, w] & bit) == bit, xi, zero)
        return t

    parts = []
    if KF:
        w = te.reduce_axis((i64(0), i64(KF)), "w")
        j = te.reduce_axis((i64(0), i64(32)), "j")
        parts.append(
            te.compute(shape64(M, N), lambda m, n: te.sum(term(m, n, w.var, j.var), axis=[w, j]), name="acc")
        )
    if REM:
        t = te.reduce_axis((i64(0), i64(REM)), "t")
        parts.append(
            te.compute(
                shape64(M, N), lambda m, n: te.sum(term(m, n, i64(KF), t.var), axis=[t]), name="acc_tail"
            )
        )
    sumx = None
    if pm1 or (spec.has_offset and not spec.threshold):
        k = te.reduce_axis((i64(0), i64(K)), "k")
        sumx = te.compute(shape64(M), lambda m: te.sum(xval(m, k.var), axis=[k]), name="sumx")

    def acc_of(m, n):
        a = parts[0][m, n]
        for p in parts[1:]:
            a = a + p[m, n]
        # pm1: sum q*x = 2 * sum_{bit=1} x - sum x
        return a * tirx.const(2, acc_t) - sumx[m] if pm1 else a

    if spec.threshold:
        epi, Y = threshold_output(M, N, acc_of)
    else:
        SC = te.placeholder(shape64(N), F32, "SC")
        OF = te.placeholder(shape64(N), F32, "OF")
        BI = te.placeholder(shape64(N), F32, "BI")
        epi = [SC, OF, BI]

        def y(m, n):
            s = XS[m] if spec.act == "int8" else None
            a = SC[n] if s is None else SC[n] * s
            v = a * acc_of(m, n).astype(F32)
            if spec.has_offset:
                of = centered_offset_expr(spec, OF[n], SC[n])
                b = of if s is None else of * s
                v = v + b * sumx[m].astype(F32)
            return v + BI[n]

        Y = te.compute(shape64(M, N), y, name="Y")
    return te.create_prim_func([*inputs, P, *epi, Y])


# --------------------------------------------------------------------------- schedules
def _schedule_unpacked(sch: s_tir.Schedule, spec: DenseSpec, choose: Choose = hand) -> None:
    # rows sharing one activation vector: 2 for one plane; more planes need the registers
    nb_hand = largest_divisor(spec.out_features, (2,)) if spec.bits == 1 else 1
    nb = choose("rows", divisors(spec.out_features, (1, 2, 4)), nb_hand)
    no, m, _ni = tile_epilogue(sch, nb)
    if spec.full_words:
        acc = sch.get_sblock("acc")
        sch.compute_at(acc, m, preserve_unit_loops=True)
        rf = sch.rfactor(sch.get_loops(acc)[-1], 2)
        rl = sch.get_loops(rf)  # no, m, am, an, w, j
        sch.reorder(rl[2], rl[4], rl[3], rl[5])
        sch.set_scope(rf, 0, "global")
        sch.vectorize(rl[5])
        sch.unroll(rl[3])
        sch.decompose_reduction(rf, rl[4])
    if spec.tail_bits:
        sch.compute_at(sch.get_sblock("acc_tail"), m, preserve_unit_loops=True)
    sch.parallel(no)


def dense_kernel(spec: DenseSpec, target: str | dict | Any = "llvm") -> tirx.PrimFunc:
    """The dense bit kernel for ``spec``; scheduled for the host CPU when ``target`` is LLVM.

    Buffer arguments, in order: the activation inputs for ``spec.act`` (float ``X f32 (M, K)``;
    int8 ``XQ int8 (M, K), XS f32 (M,)``; binary ``XP int32 (M, KW)``), ``P int32 (B, N, KW)``,
    then ``TS, TH int32 (N,)`` with a threshold or ``SC, OF, BI f32 (N,)`` without, and the output
    ``Y f32 (M, N)``. ``M`` is a symbolic int64 batch.
    """
    if not isinstance(spec, DenseSpec):
        raise ValueError(f"dense_kernel needs a DenseSpec, got {type(spec).__name__}")  # noqa: TRY004
    cpu = target_kind(target) == "llvm"
    if spec.act == "binary" and cpu and spec.code == "pm1" and byte_layout(spec)[0] == 32:
        # full 32-byte vectors only: short rows (K < 256 or not a multiple of 256) widen every few
        # bytes and run 3-6x slower than the word kernel below (64x128 at batch 256: 92 vs 17 µs)
        func = scheduled(
            Template("dense", binary_bytes_func(spec, *byte_layout(spec)),
                     lambda sch, choose: schedule_binary(sch, spec, False, choose))
        )  # fmt: skip
    elif spec.act == "binary":
        wide = cpu and spec.words % 2 == 0
        func = binary_words_func(spec, wide)
        if cpu:
            func = scheduled(
                Template("dense", func, lambda sch, choose: schedule_binary(sch, spec, wide, choose))
            )
    elif cpu and dense_int8.int8_fits(spec) and dense_avx2.avx2_target(target):
        func = dense_int8.int8_dense_func(spec)  # explicit vector TIR: nothing to schedule or tune
    elif cpu and dense_avx2.float_fits(spec) and dense_avx2.avx2_target(target):
        func = dense_avx2.float_dense_func(spec)
    else:
        func = _unpacked_func(spec)
        if cpu:
            func = scheduled(
                Template("dense", func, lambda sch, choose: _schedule_unpacked(sch, spec, choose))
            )
    return func.with_attr("global_symbol", "main")


@dataclass(frozen=True)
class Relaid:
    """A host-CPU dense kernel that reads its weights stored in another order (the same bits)."""

    func: tirx.PrimFunc
    weights: np.ndarray  # the layer's planes in the order ``func`` reads
    suffix: str  # appended to the kernel's name
    float_input: bool  # ``func`` takes the float activations (it quantizes them itself)


def relaid_dense_kernel(
    spec: DenseSpec,
    planes: np.ndarray,
    target: str | dict | Any = "llvm",
    fuse_quantizer: bool = True,
    gelu: bool = False,
) -> Relaid | None:
    """The kernel for ``spec`` on an AVX2 host when one reads a better weight order, else None
    (then :func:`dense_kernel` on the planes as they are):

    * W1A1, N % 8 == 0, AVX-512 vector popcounts: 8 rows in the 64-bit lanes of a
      512-bit vector (:mod:`~bitcompiler.kernels.dense_vpop`), with a branch on AMX tiles for calls
      of 32 rows and 2^21 words of work or more where the CPU has them (:mod:`~bitcompiler.kernels.dense_amx`); with ``gelu`` (the input is that of
      a GELU only binary layers read) the variant that packs by GELU's sign rule, suffix
      ``vpop_gelu`` (the other kernels do not take the rule: ``gelu`` is ignored there);
    * W1A1, N % 32 == 0, K % 128 == 0: rows in vector lanes (:mod:`~bitcompiler.kernels.dense_lanes`);
    * 2-bit weights, int8 activations, K % 256 == 0: with AVX-512 VNNI, four codes per byte for
      ``vpdpbusd`` (:mod:`~bitcompiler.kernels.dense_vnni`; ``fuse_quantizer``: the kernel quantizes
      the float rows itself, False where the rows come quantized, as a 1x1 conv's pixels with their
      sample's scale), else codes interleaved from the two planes (AVX2);
    * 8-bit weights, int8 activations: the codes as bytes;
    * 5- to 8-bit centered codes, float activations: the codes as bytes (:mod:`~bitcompiler.kernels.dense_fcodes`);
    * other float activations: 8 rows' words side by side for the table lookup.
    """
    if not dense_avx2.avx2_target(target):
        return None
    if dense_vpop.fits(spec) and dense_avx2.popcnt512_target(target):
        func = dense_vpop.vpop_kernel(spec, gelu=gelu, amx_cores=amx_tiles.amx_cores(target))
        suffix = "vpop_gelu" if gelu else "vpop"
        return Relaid(func, dense_vpop.vpop_layout(planes, spec.in_features), suffix, True)
    if dense_lanes.fits(spec):
        return Relaid(dense_lanes.lanes_kernel(spec), dense_lanes.lanes_layout(planes), "lanes", True)
    if dense_vnni.fits(spec) and dense_vnni.vnni_target(target):
        codes = dense_vnni.vnni_w2_layout(dense_int8.weight_codes(planes, spec.in_features))
        return Relaid(dense_vnni.vnni_w2_dense_func(spec, fuse_quantizer), codes, "vnni", fuse_quantizer)
    if dense_int8.w2_interleaved_fits(spec):
        func = dense_int8.int8_dense_func(spec, interleaved=True)
        return Relaid(func, dense_int8.interleave_w2(planes), "il", False)
    if dense_int8.codes_fits(spec):
        codes = dense_int8.weight_codes(planes, spec.in_features)
        return Relaid(dense_int8.int8_codes_dense_func(spec), codes, "codes", False)
    if dense_fcodes.fits(spec):
        codes = dense_int8.weight_codes(planes, spec.in_features)
        return Relaid(dense_fcodes.float_codes_dense_func(spec), codes, "fcodes", True)
    if dense_avx2.float_fits(spec):
        func = dense_avx2.float_dense_func(spec, rows8=True)
        return Relaid(func, dense_avx2.rows8_layout(planes), "r8", True)
    return None
