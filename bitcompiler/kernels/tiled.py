"""Tiled kernels (docs/methods.md §4): one stored tile, exactly :func:`numerics.tiled_linear` and
:func:`numerics.tiled_conv2d` (row-aligned convs: the conv kernel of the R filters, then
:func:`tiled_conv_expand_kernel`, as the dense two-stage path below).

The layer ``Y (M, N)`` of a weight that is one pm1 tile of q = N·K/p values repeated p times,
with the per-channel scale ``SC[⌊n·S/N⌋]`` (S = p scales, or N after a merged affine):

* **Row-aligned** (p divides N, q = R·K): only R = N/p distinct rows exist. Two kernels:
  :func:`dense_kernel` of the R-row tile (``DenseSpec(K, R, ...)``, unit scales, so its output
  ``A (M, R)`` is the exact integer ``acc`` as float32, exact while ``|acc| < 2^24``), then
  :func:`tiled_expand_kernel`: ``Y[m, n] = (SC[⌊n·S/N⌋]·s[m])·A[m, n mod R] + BI[n]`` (or the
  integer threshold on ``A``). Each distinct row's dot product is computed once and reused p
  times: p× less popcount work than the plain binary layer, and the tile stays in cache.
* **Fused** (row-aligned, binary activations, CPU): :func:`tiled_fused_kernel` is both stages in
  one kernel, the expand being the epilogue of the rows' byte-lane W1A1 kernel.
* **Unaligned**: :func:`tiled_unaligned_kernel` reads bit ``(n·K + k) mod q`` of the flat tile
  words per element (``T int32 (⌈q/32⌉,)``); correct for every shape, not fast.

Activations arrive as for the dense kernel: float ``X``, int8 ``XQ, XS``, binary packed ``XP``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
from tvm import s_tir, te, tirx

from bitcompiler.kernels import dense_avx2, dense_lanes
from bitcompiler.kernels._common import (
    batch_var,
    i64,
    largest_divisor,
    shape64,
    target_kind,
    threshold_output,
)
from bitcompiler.kernels.dense import Relaid
from bitcompiler.kernels.dense_binary import binary_bytes_func, byte_layout, schedule_binary
from bitcompiler.kernels.spec import ConvSpec, DenseSpec
from bitcompiler.kernels.template import Template, scheduled
from bitcompiler.quant.numerics import ACT_MODES, num_words, row_aligned

F32 = "float32"


@dataclass(frozen=True)
class TiledDenseSpec:
    """``Y (M, N)`` of a K-input tiled layer with ``p`` chunks and ``scales`` (p or N) scales."""

    in_features: int
    out_features: int
    p: int
    act: str
    threshold: bool
    scales: int

    def __post_init__(self) -> None:
        n, k, p = self.out_features, self.in_features, self.p
        if min(n, k, p) < 1 or (n * k) % p:
            raise ValueError(f"p={p} must divide the {n}x{k} weights")
        if self.act not in ACT_MODES:
            raise ValueError(f"unknown activation mode {self.act!r}; valid: {', '.join(ACT_MODES)}")
        if self.threshold and self.act == "float":
            raise ValueError("threshold needs an integer accumulator: act must be 'binary' or 'int8'")
        if self.scales not in (p, n):
            raise ValueError(f"scales must be p={p} or N={n}, got {self.scales}")

    @classmethod
    def from_attrs(cls, attrs: Any, scales: int) -> TiledDenseSpec:
        """The spec of a ``bitc::tiled_linear`` call (``attrs``: its ``ops.TiledLinearAttrs``)."""
        return cls(attrs.k, attrs.n, attrs.p, attrs.act, bool(attrs.threshold), scales)

    @property
    def aligned(self) -> bool:
        return row_aligned(self.out_features, self.p)

    @property
    def rows(self) -> int:
        """R: distinct rows of a row-aligned tile."""
        return self.out_features // self.p

    @property
    def q(self) -> int:
        return self.out_features * self.in_features // self.p

    def rows_spec(self) -> DenseSpec:
        """The dense layer of the R distinct rows (unit scales, no offset, no threshold)."""
        if not self.aligned:
            raise ValueError("only a row-aligned tile has distinct rows")
        return DenseSpec(self.in_features, self.rows, 1, "pm1", self.act, False, False)


def _scale_index(n, spec: TiledDenseSpec):
    return (n * spec.scales) // spec.out_features


def _epilogue(spec: TiledDenseSpec, M, acc_of, xs):
    """Y from an accumulator ``acc_of(m, n)`` (float32 or int); returns (epilogue inputs, Y)."""
    N = spec.out_features
    if spec.threshold:
        return threshold_output(M, N, acc_of)
    SC = te.placeholder(shape64(spec.scales), F32, "SC")
    BI = te.placeholder(shape64(N), F32, "BI")

    def y(m, n):
        a = SC[_scale_index(n, spec)]
        if xs is not None:
            a = a * xs[m]
        return a * acc_of(m, n).astype(F32) + BI[n]

    return [SC, BI], te.compute(shape64(M, N), y, name="Y")


def tiled_expand_kernel(spec: TiledDenseSpec, target: str | dict | Any = "llvm") -> tirx.PrimFunc:
    """Row-aligned second stage: ``A f32 (M, R)`` [``XS f32 (M,)`` for int8], ``SC, BI`` or ``TS, TH`` -> ``Y``."""
    if not spec.aligned:
        raise ValueError("tiled_expand_kernel needs a row-aligned tile (p divides N)")
    M, R = batch_var(), spec.rows
    A = te.placeholder(shape64(M, R), F32, "A")
    XS = te.placeholder(shape64(M), F32, "XS") if spec.act == "int8" and not spec.threshold else None
    epi, Y = _epilogue(spec, M, lambda m, n: A[m, n % R], XS)
    func = te.create_prim_func([A, *([XS] if XS is not None else []), *epi, Y])
    if target_kind(target) == "llvm":
        sch = s_tir.Schedule(func)
        m, n = sch.get_loops(sch.get_sblock("Y"))
        _c, r = sch.split(n, [None, R])  # n = c·R + r: r walks A's row contiguously
        v = largest_divisor(R, (8, 4))
        if v > 1:
            _, ri = sch.split(r, [None, v])
            sch.vectorize(ri)
        sch.parallel(m)
        func = sch.mod["main"]
    return func.with_attr("global_symbol", "main")


def tiled_fused_kernel(spec: TiledDenseSpec, target: str | dict | Any = "llvm") -> tirx.PrimFunc | None:
    """Row-aligned, binary activations, host CPU: both stages in one kernel, else None.

    The byte-lane W1A1 dense kernel of the R distinct rows with the expand as its epilogue:
    each row block's ``acc`` stays in registers and is written p times (``Y[m, c*R + r]``), so
    there is no ``A`` round trip and one kernel call instead of two. Buffers: ``XP, T (1, R, KW)``,
    then ``SC (S,), BI (N,)`` or ``TS, TH (N,)``, and ``Y (M, N)``.
    """
    if not spec.aligned or spec.act != "binary" or target_kind(target) != "llvm":
        return None
    rows = DenseSpec(spec.in_features, spec.rows, 1, "pm1", "binary", False, spec.threshold)
    lanes, chunk = byte_layout(rows)
    if lanes != 32:  # short rows: the two-stage path (the word kernel) is faster there
        return None
    func = binary_bytes_func(rows, lanes, chunk, expand=spec.p, scales=0 if spec.threshold else spec.scales)
    func = scheduled(Template("tiled", func, lambda sch, choose: schedule_binary(sch, rows, False, choose)))
    return func.with_attr("global_symbol", "main")


@dataclass(frozen=True)
class TiledConvSpec:
    """The expand stage of a row-aligned tiled conv: ``A (M, R, OH, OW)`` -> ``Y (M, O, OH, OW)``."""

    out_channels: int
    out_h: int
    out_w: int
    p: int
    act: str
    threshold: bool
    scales: int

    def __post_init__(self) -> None:
        o, p = self.out_channels, self.p
        if min(o, p, self.out_h, self.out_w) < 1 or o % p:
            raise ValueError(f"p={p} must divide the {o} filters of a tiled conv")
        if self.act not in ACT_MODES:
            raise ValueError(f"unknown activation mode {self.act!r}; valid: {', '.join(ACT_MODES)}")
        if self.scales not in (p, o):
            raise ValueError(f"scales must be p={p} or O={o}, got {self.scales}")

    @property
    def rows(self) -> int:
        """R: distinct filters."""
        return self.out_channels // self.p

    @staticmethod
    def rows_conv(attrs: Any, in_h: int, in_w: int) -> ConvSpec:
        """The conv of the R distinct filters of a ``bitc::tiled_conv2d`` call (``attrs``: its
        ``ops.TiledConv2dAttrs``): unit scales, so its output is the exact integer accumulator."""
        r = attrs.out_channels // attrs.p
        return ConvSpec(
            attrs.in_channels, r, in_h, in_w, tuple(attrs.kernel), tuple(attrs.stride), tuple(attrs.padding),
            tuple(attrs.dilation), 1, 1, "pm1", attrs.act, False, False,
        )  # fmt: skip

    @classmethod
    def from_attrs(cls, attrs: Any, rows: ConvSpec, scales: int) -> TiledConvSpec:
        """The expand stage of a ``bitc::tiled_conv2d`` call whose first stage is ``rows``."""
        return cls(
            attrs.out_channels, rows.out_h, rows.out_w, attrs.p, attrs.act, bool(attrs.threshold), scales
        )


def tiled_conv_expand_kernel(spec: TiledConvSpec, target: str | dict | Any = "llvm") -> tirx.PrimFunc:
    """Second stage of a tiled conv: ``A f32 (M, R, OH, OW)`` [``XS f32 (M,)`` for int8], ``SC, BI`` or
    ``TS, TH`` -> ``Y[m, o] = (SC[⌊o·S/O⌋]·s[m])·A[m, o mod R] + BI[o]`` (or the threshold on A).

    The first stage is :func:`bitcompiler.kernels.conv2d_kernel` of the R filters with unit scales,
    so ``A`` is the exact integer accumulator as float32 (exact while ``|acc| < 2^24``).
    """
    M, R, O, OH, OW = batch_var(), spec.rows, spec.out_channels, spec.out_h, spec.out_w
    A = te.placeholder(shape64(M, R, OH, OW), F32, "A")
    XS = te.placeholder(shape64(M), F32, "XS") if spec.act == "int8" and not spec.threshold else None
    if spec.threshold:
        TS = te.placeholder(shape64(O), "int32", "TS")
        TH = te.placeholder(shape64(O), "int32", "TH")
        epi = [TS, TH]

        def y(m, o, h, w):
            a = A[m, o % R, h, w]
            hit = TS[o].astype("int64") * a.astype("int64") >= TH[o].astype("int64")
            return tirx.Select(hit, tirx.const(1.0, F32), tirx.const(-1.0, F32))

    else:
        SC = te.placeholder(shape64(spec.scales), F32, "SC")
        BI = te.placeholder(shape64(O), F32, "BI")
        epi = [SC, BI]

        def y(m, o, h, w):
            a = SC[(o * spec.scales) // O]
            if XS is not None:
                a = a * XS[m]
            return a * A[m, o % R, h, w] + BI[o]

    Y = te.compute(shape64(M, O, OH, OW), y, name="Y")
    func = te.create_prim_func([A, *([XS] if XS is not None else []), *epi, Y])
    if target_kind(target) == "llvm":
        sch = s_tir.Schedule(func)
        m, o, h, w = sch.get_loops(sch.get_sblock("Y"))
        hw = sch.fuse(h, w)
        v = largest_divisor(OH * OW, (8, 4))
        if v > 1:
            _, hi = sch.split(hw, [None, v])
            sch.vectorize(hi)
        sch.parallel(sch.fuse(m, o))
        func = sch.mod["main"]
    return func.with_attr("global_symbol", "main")


def tiled_unaligned_kernel(spec: TiledDenseSpec, target: str | dict | Any = "llvm") -> tirx.PrimFunc:
    """Any shape: activations, ``T int32 (⌈q/32⌉,)``, ``SC, BI`` or ``TS, TH`` -> ``Y``; bit ``(nK+k) mod q``."""
    K, N, q = spec.in_features, spec.out_features, spec.q
    M = batch_var()
    T = te.placeholder(shape64(num_words(q)), "int32", "T")
    xs = None
    if spec.act == "float":
        X = te.placeholder(shape64(M, K), F32, "X")
        inputs = [X]
    elif spec.act == "int8":
        XQ = te.placeholder(shape64(M, K), "int8", "XQ")
        XS = te.placeholder(shape64(M), F32, "XS")
        inputs, xs = [XQ, XS], (None if spec.threshold else XS)
    else:
        XP = te.placeholder(shape64(M, num_words(K)), "int32", "XP")
        inputs = [XP]

    def term(m, n, k):
        e = (n * i64(K) + k) % i64(q)
        tb = (T[e // 32] >> (e % 32).astype("int32")) & 1
        if spec.act == "binary":
            xb = (XP[m, k // 32] >> (k % 32).astype("int32")) & 1
            return tirx.Select(tb == xb, tirx.const(1, "int32"), tirx.const(-1, "int32"))
        x = X[m, k] if spec.act == "float" else XQ[m, k].astype("int32")
        return tirx.Select(tb != 0, x, -x)

    kk = te.reduce_axis((i64(0), i64(K)), "k")
    acc = te.compute(shape64(M, N), lambda m, n: te.sum(term(m, n, kk.var), axis=[kk]), name="acc")
    epi, Y = _epilogue(spec, M, lambda m, n: acc[m, n], xs)
    func = te.create_prim_func([*inputs, T, *epi, Y])
    if target_kind(target) == "llvm":
        sch = s_tir.Schedule(func)
        m, n = sch.get_loops(sch.get_sblock("Y"))
        sch.reorder(n, m)
        sch.compute_at(sch.get_sblock("acc"), m, preserve_unit_loops=True)
        sch.parallel(n)
        func = sch.mod["main"]
    return func.with_attr("global_symbol", "main")


def relaid_tiled_kernel(
    spec: TiledDenseSpec, tile: np.ndarray, target: str | dict | Any = "llvm"
) -> Relaid | None:
    """Row-aligned binary tiled layer on an AVX2 host whose R rows fit the rows-in-lanes kernel: both
    stages in that kernel (the p-fold expand as its epilogue) on the tile stored transposed, with
    the float activations as input; else None."""
    if not spec.aligned or not dense_avx2.avx2_target(target):
        return None
    rows = dataclasses.replace(spec.rows_spec(), threshold=spec.threshold)
    if not dense_lanes.fits(rows):
        return None
    func = dense_lanes.lanes_kernel(rows, expand=spec.p, scales=0 if spec.threshold else spec.scales)
    return Relaid(func, dense_lanes.lanes_layout(tile), "lanes", True)


# --------------------------------------------------------------------------- two-stage plans
@dataclass(frozen=True)
class Stage:
    """One kernel of a two-stage tiled layer: ``build()`` makes it (``key`` names it for caching);
    ``args`` are its buffers by role, ``out`` the role of what it writes.

    Roles: ``x0`` (``x1``): the activation inputs (codes, then the int8 scale); ``unit_xs``: an int8
    scale of ones; ``tile``, ``scale``, ``bias``, ``thr_sign``, ``thr``: the op's tensors; ``one``,
    ``zero``: R unit scales and zeros; ``rows``: the first stage's output; ``y``: the layer's output.
    """

    build: Any
    key: tuple
    args: tuple[str, ...]
    out: str
    suffix: str


@dataclass(frozen=True)
class TiledStages:
    """A row-aligned tiled layer as two kernels: the layer of the R distinct rows (filters) with unit
    scales, whose float output is the exact integer accumulator, then the expand that reuses each
    row p times with the layer's epilogue. Every backend emits these, wiring the roles it holds."""

    rows: int
    stage1: Stage
    stage2: Stage


def _stages(spec: Any, first: tuple, second: tuple) -> TiledStages:
    """The stages of the tiled layer ``spec`` (a :class:`TiledDenseSpec` or :class:`TiledConvSpec`):
    ``first``, ``second``: (build, workload) of its row kernel and its expand kernel."""
    int8 = spec.act == "int8"
    acts = ("x0", "unit_xs") if int8 else ("x0",)  # the row kernel's int8 scale is 1
    xs = ("x1",) if int8 and not spec.threshold else ()
    epi = ("thr_sign", "thr") if spec.threshold else ("scale", "bias")
    return TiledStages(
        spec.rows,
        Stage(first[0], first[1], (*acts, "tile", "one", "zero", "zero"), "rows", "_rows"),
        Stage(second[0], second[1], ("rows", *xs, *epi), "y", "_expand"),
    )


def tiled_linear_stages(spec: TiledDenseSpec, target: str | dict | Any = "llvm") -> TiledStages:
    """The two kernels of a row-aligned ``bitc::tiled_linear`` (see :class:`TiledStages`)."""
    from bitcompiler.kernels.dense import dense_kernel

    rows = spec.rows_spec()
    first = (lambda: dense_kernel(rows, target), ("dense", rows))
    return _stages(spec, first, (lambda: tiled_expand_kernel(spec, target), ("tiled_expand", spec)))


def tiled_conv_stages(rows: ConvSpec, spec: TiledConvSpec, target: str | dict | Any = "llvm") -> TiledStages:
    """The two kernels of a ``bitc::tiled_conv2d`` (see :class:`TiledStages`)."""
    from bitcompiler.kernels.conv import conv2d_kernel

    first = (lambda: conv2d_kernel(rows, target), ("conv", rows))
    return _stages(spec, first, (lambda: tiled_conv_expand_kernel(spec, target), ("tiled_conv_expand", spec)))
