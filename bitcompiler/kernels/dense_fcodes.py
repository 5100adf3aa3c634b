"""Dense layers with 5- to 8-bit centered codes and float activations, the codes stored as bytes.

``binary``'s first and last layers (8-bit codes with an offset) run under float activations. The
bit-plane kernel (:func:`bitcompiler.kernels.dense.dense_kernel`) rebuilds each code from its
planes, eight selects per multiply-add, and ran a 1280 -> 1000 classifier 25x slower than the
float layer. Here the codes are bytes ``Q (N, K) uint8`` (the same bits, :func:`weight_codes`):
each step widens 16 codes to floats, subtracts the center (exact: small integers) and multiplies
them into 16 lanes of partial sums, several rows sharing each activation vector; the lanes are
summed once a row. The epilogue is the bit-plane kernel's: ``SC·acc + (OF + center·SC)·Σx + BI``.
"""

from __future__ import annotations

from typing import Any

from tvm import s_tir, te, tirx

from bitcompiler.kernels._common import batch_var, i64, largest_divisor, shape64
from bitcompiler.kernels.dense_binary import tile_epilogue
from bitcompiler.kernels.spec import DenseSpec, centered_offset_expr

F32 = "float32"
LANES = 16


def fits(spec: DenseSpec) -> bool:
    """Float activations, uint codes of 5 to 8 bits that the kernels center (``spec.center``)."""
    return spec.act == "float" and spec.code == "uint" and bool(spec.center) and not spec.threshold


def float_codes_dense_func(spec: DenseSpec) -> tirx.PrimFunc:
    """``X f32 (M, K), Q uint8 (N, K), SC, OF, BI f32 (N,) -> Y f32 (M, N)``, scheduled for the CPU."""
    K, N = spec.in_features, spec.out_features
    M = batch_var()
    X = te.placeholder(shape64(M, K), F32, "X")
    Q = te.placeholder(shape64(N, K), "uint8", "Q")
    SC, OF, BI = (te.placeholder(shape64(N), F32, name) for name in ("SC", "OF", "BI"))
    center = tirx.const(float(spec.center), F32)

    def term(m: Any, n: Any, k: Any) -> Any:
        return (Q[n, k].astype(F32) - center) * X[m, k]

    parts = []
    if K >= LANES:
        w = te.reduce_axis((i64(0), i64(K // LANES)), "w")
        j = te.reduce_axis((i64(0), i64(LANES)), "j")
        parts.append(
            te.compute(shape64(M, N), lambda m, n: te.sum(term(m, n, w * LANES + j), axis=[w, j]), name="acc")
        )
    if K % LANES:
        t = te.reduce_axis((i64(0), i64(K % LANES)), "t")
        kf = K // LANES * LANES
        parts.append(
            te.compute(shape64(M, N), lambda m, n: te.sum(term(m, n, kf + t), axis=[t]), name="acc_tail")
        )
    sumx = None
    if spec.has_offset:
        k = te.reduce_axis((i64(0), i64(K)), "k")
        sumx = te.compute(shape64(M), lambda m: te.sum(X[m, k], axis=[k]), name="sumx")

    def y(m: Any, n: Any) -> Any:
        acc = parts[0][m, n]
        for p in parts[1:]:
            acc = acc + p[m, n]
        v = SC[n] * acc
        if sumx is not None:
            v = v + centered_offset_expr(spec, OF[n], SC[n]) * sumx[m]
        return v + BI[n]

    Y = te.compute(shape64(M, N), y, name="Y")
    func = te.create_prim_func([X, Q, SC, OF, BI, Y])
    sch = s_tir.Schedule(func)
    _schedule(sch, spec)
    return sch.mod["main"].with_attr("global_symbol", "main")


def _schedule(sch: s_tir.Schedule, spec: DenseSpec) -> None:
    """Rows in blocks of ``nb`` (parallel); per block and sample, ``nb x 16`` partial sums in
    registers over the whole row, each activation vector read once for the ``nb`` rows."""
    nb = largest_divisor(spec.out_features, (4, 2))
    no, m, _ni = tile_epilogue(sch, nb)
    if spec.in_features >= LANES:
        acc = sch.get_sblock("acc")
        sch.compute_at(acc, m, preserve_unit_loops=True)
        rf = sch.rfactor(sch.get_loops(acc)[-1], 2)
        rl = sch.get_loops(rf)  # no, m, am, an, w, j
        sch.reorder(rl[2], rl[4], rl[3], rl[5])
        sch.set_scope(rf, 0, "global")  # a small stack array: registers
        sch.vectorize(rl[5])
        sch.unroll(rl[3])
        sch.decompose_reduction(rf, rl[4])
    if spec.in_features % LANES:
        sch.compute_at(sch.get_sblock("acc_tail"), m, preserve_unit_loops=True)
    sch.parallel(no)
