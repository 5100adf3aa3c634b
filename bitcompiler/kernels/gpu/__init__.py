"""GPU schedules for the bit kernels: the CPU's compute definitions (:mod:`bitcompiler.kernels`,
built with a non-LLVM target, i.e. unscheduled) bound to GPU threads.

Every dense and conv bit kernel has the same shape: an integer (or float) accumulator block
``acc`` (W1A1: ``popcount`` of XOR-ed packed words), an optional activation sum ``sumx``, and the
epilogue block ``Y`` that writes the output. :class:`BitKernelRule` gives each output element one
thread, with its accumulator in a register (``acc`` and ``sumx`` computed at the thread); the
activation packing and quantizing kernels and the float parts of the graph go to TVM's dlight
rules. (dlight's own rules must not see ``acc``/``Y``: with one reduction step they fold the
epilogue into the accumulator's init and compute a wrong result.)
"""

from __future__ import annotations

from typing import Any

from tvm import s_tir, te, tirx
from tvm.s_tir import dlight as dl

from bitcompiler.kernels._common import batch_var, i64, shape64, threshold_output
from bitcompiler.kernels.spec import DenseSpec

THREADS = 128  # threads per block for the one-output-per-thread schedule
# the blocks a bit kernel's ``Y`` reads (each computed per output, in a register); ``acc_tail``:
# the last partial word of a float-activation dense row
PRODUCERS = ("acc", "acc_tail", "sumx", "cnt")


def _block(sch: s_tir.Schedule, name: str) -> Any | None:
    try:
        return sch.get_sblock(name)
    except Exception:  # noqa: BLE001 - TVM raises its own error type for a missing block
        return None


def schedule_bit_kernel(func: Any, threads: int = THREADS) -> s_tir.Schedule | None:
    """``func`` (a dense or conv bit kernel: blocks ``acc``, ``Y``, maybe ``sumx``) scheduled for a
    GPU, or None when it is not one. The batch may be symbolic: the last block's threads past the
    outputs are masked."""
    sch = s_tir.Schedule(func)
    y, acc = _block(sch, "Y"), _block(sch, "acc")
    if y is None or acc is None:
        return None
    names = {sch.get(b).name_hint for b in sch.get_child_blocks(sch.get_sblock("root"))}
    if not names <= {"Y", *PRODUCERS}:
        return None  # not a bit kernel's shape: dlight's rules schedule it
    loops = sch.get_loops(y)
    extents = [_static(sch.get(loop).extent) for loop in loops]
    if names == {"acc", "Y"} and len(loops) == 4 and extents[1] is not None and extents[1] % CONV_TO == 0:
        return _schedule_conv_blocked(sch, y, acc, threads)
    fused = sch.fuse(*loops)
    bx, tx = sch.split(fused, [None, threads])
    sch.bind(bx, "blockIdx.x")
    sch.bind(tx, "threadIdx.x")
    for name in PRODUCERS:
        b = _block(sch, name)
        if b is not None:
            sch.compute_at(b, tx, preserve_unit_loops=True)
            sch.set_scope(b, 0, "local")
    return sch


CONV_TO = 4  # output channels per thread in a conv: each activation word loaded once for all four


def _schedule_conv_blocked(sch: s_tir.Schedule, y: Any, acc: Any, threads: int) -> s_tir.Schedule:
    """A conv (``Y (M, O, OH, OW)``): one thread per pixel and ``CONV_TO`` output channels, their
    accumulators in registers, the channel loop innermost so each input word serves all of them.
    The sample is ``blockIdx.y`` (so the batch ``M`` may be symbolic: only grid y depends on it)."""
    m, o, oh, ow = sch.get_loops(y)
    oo, oi = sch.split(o, [None, CONV_TO])
    sch.reorder(m, oo, oh, ow, oi)
    bx, tx = sch.split(sch.fuse(oo, oh, ow), [None, threads])
    sch.bind(m, "blockIdx.y")
    sch.bind(bx, "blockIdx.x")
    sch.bind(tx, "threadIdx.x")
    sch.compute_at(acc, tx, preserve_unit_loops=False)
    sch.set_scope(acc, 0, "local")
    inner = sch.get_loops(acc)[3:]  # under m, bx, tx: the CONV_TO channels, then the reduction
    sch.decompose_reduction(acc, inner[0])
    update = sch.get_loops(acc)[3:]
    sch.reorder(*update[1:], update[0])
    sch.unroll(update[0])
    sch.unroll(sch.get_loops(y)[-1])
    return sch


# W1A1 dense tile: a block computes BM x BN outputs from BK-word slices of the packed rows staged
# in shared memory; each thread holds TM x TN accumulators in registers
BM, BN, BK, TM, TN = 64, 64, 8, 4, 4


def w1a1_dense_func(spec: DenseSpec) -> tirx.PrimFunc:
    """The W1A1 dense kernel (pm1 weights, binary activations) of
    :func:`bitcompiler.kernels.dense_kernel` without its word views, which the shared-memory
    staging of :func:`schedule_w1a1_dense` cannot read: the same buffers (``XP, P, SC, OF, BI, Y``
    or ``XP, P, TS, TH, Y``) and the same arithmetic, ``acc = K - 2 * sum popcount(XP ^ P)``."""
    if spec.act != "binary" or spec.code != "pm1" or spec.bits != 1:
        raise ValueError(f"w1a1_dense_func takes pm1 1-bit weights and binary activations, got {spec}")
    k, n, kw = spec.in_features, spec.out_features, spec.words
    m = batch_var()
    xp = te.placeholder(shape64(m, kw), "int32", "XP")
    p = te.placeholder(shape64(1, n, kw), "int32", "P")
    w = te.reduce_axis((i64(0), i64(kw)), "w")
    acc = te.compute(
        shape64(m, n), lambda a, b: te.sum(tirx.popcount(xp[a, w] ^ p[0, b, w]), axis=[w]), name="acc"
    )

    def count(a: Any, b: Any) -> Any:
        return tirx.const(k, "int32") - tirx.const(2, "int32") * acc[a, b]

    if spec.threshold:
        epi, y = threshold_output(m, n, count)
        return te.create_prim_func([xp, p, *epi, y]).with_attr("global_symbol", "main")
    sc, of, bi = (te.placeholder(shape64(n), "float32", name) for name in ("SC", "OF", "BI"))
    y = te.compute(shape64(m, n), lambda a, b: sc[b] * count(a, b).astype("float32") + bi[b], name="Y")
    return te.create_prim_func([xp, p, sc, of, bi, y]).with_attr("global_symbol", "main")


def _static(loop_extent: Any) -> int | None:
    return int(loop_extent.value) if hasattr(loop_extent, "value") else None


def schedule_w1a1_dense(func: Any) -> s_tir.Schedule | None:
    """The W1A1 dense kernel (:func:`w1a1_dense_func`) or the dp4a one (:mod:`.dp4a`) tiled for a
    GPU: shared-memory slices of both operands, register blocking, ``popc`` (``__dp4a``) per word
    pair. A symbolic batch (rows) is padded to whole tiles (rows past it read as zeros, their
    outputs not written); None when the columns or words, or a static batch, do not divide into
    the tiles (then :func:`schedule_bit_kernel`)."""
    sch = s_tir.Schedule(func)
    y, acc = _block(sch, "Y"), _block(sch, "acc")
    if y is None or acc is None:
        return None
    names = {sch.get(b).name_hint for b in sch.get_child_blocks(sch.get_sblock("root"))}
    reads = [str(r.source) for r in sch.get(acc).reads]
    rows = [r for r in reads if r in ("XP", "X4")]  # the activations: packed bits, or int8 x 4
    if names != {"acc", "Y"} or len(reads) != 2 or len(rows) != 1:
        return None
    loops = sch.get_loops(acc)
    if len(loops) != 3:
        return None
    em, en, ew = (_static(sch.get(loop).extent) for loop in loops)
    if en is None or ew is None or en % BN or ew % BK or (em is not None and em % BM):
        return None
    if em is None:  # a symbolic batch: rows padded to whole tiles (read as 0, never written back)
        sch.pad_einsum(acc, [BM, 1, 1])
        loops = sch.get_loops(acc)
    m, n, w = loops
    x_idx = reads.index(rows[0])
    p_idx = 1 - x_idx
    mo, mt, mi = sch.split(m, [None, BM // TM, TM])
    no, nt, ni = sch.split(n, [None, BN // TN, TN])
    wo, wi = sch.split(w, [None, BK])
    sch.reorder(mo, no, mt, nt, wo, wi, mi, ni)
    sch.bind(mo, "blockIdx.y")
    sch.bind(no, "blockIdx.x")
    sch.bind(mt, "threadIdx.y")
    sch.bind(nt, "threadIdx.x")
    for idx in (x_idx, p_idx):
        shared = sch.cache_read(acc, idx, "shared")
        sch.compute_at(shared, wo)
        fused = sch.fuse(*sch.get_loops(shared)[5:])  # the copy's own loops, under mo, no, mt, nt, wo
        _, ty, tx = sch.split(fused, [None, BM // TM, BN // TN])
        sch.bind(ty, "threadIdx.y")
        sch.bind(tx, "threadIdx.x")
    if em is None:  # the padding reads into shared memory, Y reads the padded accumulators
        sch.compute_inline(sch.get_sblock(f"{rows[0]}_pad"))
        sch.compute_inline(sch.get_sblock("acc_pad"))
    sch.set_scope(acc, 0, "local")
    sch.reverse_compute_at(y, nt, preserve_unit_loops=True)
    sch.decompose_reduction(acc, wo)
    return sch


class BitKernelRule(dl.ScheduleRule):  # type: ignore[misc]
    """dlight rule for the bit kernels (:func:`schedule_bit_kernel`); None for other functions."""

    def apply(self, func: Any, target: Any, _tunable: bool) -> Any:
        return schedule_w1a1_dense(func) or schedule_bit_kernel(func)
