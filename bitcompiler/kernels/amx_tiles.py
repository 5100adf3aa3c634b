"""Intel AMX tile primitives the AMX kernels share (:mod:`bitcompiler.kernels.conv_amx`,
:mod:`bitcompiler.kernels.dense_amx`): whether a target may use the tiles, the sign expansion to
-1/+1 bytes, a 16 x 16 int32 transpose in registers, the tile configuration, and the 2 x 2 blocking's
zero / product / store steps (tiles 0-3 accumulators, 4-5 ``A``, 6-7 ``B``).

A 64-bit sign word becomes 64 bytes in a few vector instructions (:func:`expand`): the word
broadcast to the eight int64 lanes, a test against ``1 << lane`` per byte, a blend of -1 and +1.
Byte ``L`` gets bit ``8 (L % 8) + L // 8`` of the word: the same permutation of the 64 channels on
both sides of every product, so every sum is unchanged.
"""

from __future__ import annotations

from typing import Any

from tvm import tirx
from tvm.script import tirx as T

from bitcompiler.kernels._common import as_tvm_target
from bitcompiler.kernels.dense_avx2 import x86_features

I32, I64, U8 = "int32", "int64", "uint8"


def amx_target(target: Any) -> bool:
    """True for an LLVM x86 target with the AMX tile and int8 instructions, on a host whose process
    may run them (:func:`bitcompiler.amx.enable`)."""
    from bitcompiler.amx import enable

    return x86_features(target, "amx-tile", "amx-int8") and enable()


def amx_cores(target: Any) -> int:
    """0 where :func:`amx_target` does not hold, else how many tasks an AMX kernel splits its work
    into: the target's ``num-cores`` (2 where it is unset)."""
    if not amx_target(target):
        return 0
    return int(as_tvm_target(target).attrs.get("num-cores", 0) or 2)


def tile_op(op: str, *args: Any) -> Any:
    return T.call_llvm_intrin("void", f"llvm.x86.{op}", *args)


def u8(v: int) -> Any:
    return tirx.const(v, U8)


def expand(word: Any) -> Any:
    """The 64 signs of ``word`` (int64) as bytes, -1 for a 1 bit, as 16 int32 lanes (see the
    module docstring for the order)."""
    bytes_ = tirx.reinterpret("int8x64", tirx.Broadcast(word, 8))
    one = tirx.Broadcast(tirx.const(0x0101010101010101, I64), 8)
    mask = tirx.reinterpret("int8x64", one << T.ramp(T.int64(0), T.int64(1), 8))
    hit = tirx.NE(tirx.bitwise_and(bytes_, mask), tirx.Broadcast(tirx.const(0, "int8"), 64))
    signs = tirx.Select(
        hit, tirx.Broadcast(tirx.const(-1, "int8"), 64), tirx.Broadcast(tirx.const(1, "int8"), 64)
    )
    return tirx.reinterpret("int32x16", signs)


def _half(d: int, hi: bool) -> list:
    """One round ``d`` of a 16 x 16 transpose by two-source shuffles: the lane indices, into the
    32 concatenated lanes of rows ``a`` and ``a + d``, of new row ``a`` (``hi`` False) or ``a + d``."""
    if hi:
        return [tirx.IntImm(I32, j + d if not j & d else 16 + j) for j in range(16)]
    return [tirx.IntImm(I32, j if not j & d else 16 + j - d) for j in range(16)]


LANES = T.ramp(0, 1, 16)


@T.macro
def _transpose_round(V, src, dst, d):
    for a in T.unroll(8):
        if a // d % 2 == 0:
            V[dst, a, LANES] = tirx.Shuffle([V[src, a, LANES], V[src, a + d, LANES]], _half(d, False))
            V[dst, a + d, LANES] = tirx.Shuffle([V[src, a, LANES], V[src, a + d, LANES]], _half(d, True))


@T.macro
def transpose16(V):
    """A 16 x 16 int32 transpose in registers on ``V (4, 8, 16) int32``: rows ``p`` and ``p + 8`` in
    ``V[0, p]``, ``V[1, p]`` (``V[2]``, ``V[3]`` scratch) become columns: lane ``p`` of the new row
    ``q`` (``V[0, q]``, ``V[1, q]`` for ``q + 8``) is lane ``q`` of the old row ``p``."""
    for a in T.unroll(8):
        V[2, a, LANES] = tirx.Shuffle([V[0, a, LANES], V[1, a, LANES]], _half(8, False))
        V[3, a, LANES] = tirx.Shuffle([V[0, a, LANES], V[1, a, LANES]], _half(8, True))
    _transpose_round(V, 2, 0, 4)
    _transpose_round(V, 3, 1, 4)
    _transpose_round(V, 0, 2, 2)
    _transpose_round(V, 1, 3, 2)
    _transpose_round(V, 2, 0, 1)
    _transpose_round(V, 3, 1, 1)


@T.macro
def zero_accumulators():
    """Tiles 0-3, the accumulators, to zero."""
    T.evaluate(tile_op("tilezero", u8(0)))
    T.evaluate(tile_op("tilezero", u8(1)))
    T.evaluate(tile_op("tilezero", u8(2)))
    T.evaluate(tile_op("tilezero", u8(3)))


@T.macro
def product_2x2(a0, a1, b0, b1, b_stride):
    """One reduction step of the 2 x 2 blocking: ``A`` tiles at ``a0``, ``a1`` (rows of 64 bytes) into
    tiles 4, 5, ``B`` tiles at ``b0``, ``b1`` (rows ``b_stride`` bytes apart) into 6, 7, and the four
    products ``C[2 a + b] += A[a] B[b]`` (tiles 0-3)."""
    T.evaluate(tile_op("tileloadd64", u8(4), a0, T.int64(64)))
    T.evaluate(tile_op("tileloadd64", u8(6), b0, b_stride))
    T.evaluate(tile_op("tdpbssd", u8(0), u8(4), u8(6)))
    T.evaluate(tile_op("tileloadd64", u8(7), b1, b_stride))
    T.evaluate(tile_op("tdpbssd", u8(1), u8(4), u8(7)))
    T.evaluate(tile_op("tileloadd64", u8(5), a1, T.int64(64)))
    T.evaluate(tile_op("tdpbssd", u8(2), u8(5), u8(6)))
    T.evaluate(tile_op("tdpbssd", u8(3), u8(5), u8(7)))


@T.macro
def store_accumulators(C, row_bytes):
    """Tiles 0-3 into ``C[0..3]`` (an int32 buffer, rows ``row_bytes`` bytes apart)."""
    T.evaluate(tile_op("tilestored64", u8(0), T.address_of(C[0, 0, 0]), row_bytes))
    T.evaluate(tile_op("tilestored64", u8(1), T.address_of(C[1, 0, 0]), row_bytes))
    T.evaluate(tile_op("tilestored64", u8(2), T.address_of(C[2, 0, 0]), row_bytes))
    T.evaluate(tile_op("tilestored64", u8(3), T.address_of(C[3, 0, 0]), row_bytes))


def tile_config(colsb: list[int]) -> Any:
    """A macro ``(CFG)`` that loads palette 1 with tile ``i`` 16 rows of ``colsb[i]`` bytes (a
    64-byte ``uint8`` buffer ``CFG``)."""

    def colsb_of(i):  # colsb[i] for the loop variable i
        width = u8(colsb[-1])
        for j in reversed(range(len(colsb) - 1)):
            width = tirx.Select(i == j, u8(colsb[j]), width)
        return width

    @T.macro
    def config(CFG):
        for i in range(64):
            CFG[i] = u8(0)
        CFG[0] = u8(1)
        for i in range(8):
            CFG[16 + 2 * i] = colsb_of(i)
            CFG[48 + i] = u8(16)
        T.evaluate(tile_op("ldtilecfg", T.address_of(CFG[0])))

    return config
