"""W1A1 dense at batch 32 and more as an int8 matrix product on Intel AMX tiles.

For x86 CPUs with AMX (``amx-tile``, ``amx-int8``) where the process got the tile state
(:mod:`bitcompiler.amx`). It is a branch of :mod:`bitcompiler.kernels.dense_vpop`'s kernel, not a
kernel of its own: the same arguments, weight layout (``WT (N/8, KW, 8) uint64``) and numbers. A
layer has it where :func:`fits` holds; a call takes it with :func:`min_rows` batch rows or more and
keeps the vector-popcount nest below (few rows do not pay for the weights' expansion, nor a little
work for the tiles' first use).

A +-1 x +-1 product is a signed byte product: with every sign bit expanded to one byte (1 to -1,
0 to +1, as :mod:`bitcompiler.kernels.conv_amx` expands them) ``tdpbssd`` sums 16 x 16 x 64 of them
per instruction. The padding past ``K`` is 1 bits in both operands (:func:`dense_vpop.vpop_layout`
and the kernel's own packing): each adds +1, so ``acc = sum - (64 KW - K)``.

* **Input** (the ``B`` tiles, ``[k / 4][batch row][4 bytes]``): the packed rows expanded and
  transposed once per call (16 rows' expanded words transposed in registers, as the conv
  transposes 16 pixels; a parallel task per 16 rows), zero bytes past the last row. Each 1 KiB
  tile is contiguous: at a row stride of ``4 M`` bytes a batch of 256 rows put a tile's rows in
  few cache sets.
* **Weights** (the ``A`` tiles, 16 output rows x 64 bytes of one 64-bit word): expanded one word
  ahead of their tile loads into two small buffers that alternate. Expanded right before its own
  loads, a word's stores stalled the tile loads: 4096² at batch 64 took 1.02 ms against 0.74.
* **Register blocking**: two tiles of 16 output rows x two tiles of 16 batch rows in the four
  accumulator tiles, batch pairs outermost (the output is written a band of 32 rows at a time:
  pairs outermost, 512 -> 2048 at batch 256 took 0.45 ms against 0.33). The accumulators go to a
  small buffer, are transposed back (batch rows by output rows) in registers, and the epilogue
  (threshold or affine, as the vector-popcount nest's) writes 16 outputs of a batch row as one
  vector.
* **Threads**: one parallel loop over chunks of output-row tile pairs, ``cores`` of them; each
  task loads the tile configuration and releases the tiles itself.

Measured on a 2-core Xeon VM with AMX (one thread, kernel alone, alternating with the
vector-popcount nest in one process): 4096² at batch 64 0.67-0.79 ms against 1.16-1.21 (0.37-0.43
against 0.61-0.64 at two threads), at batch 32 0.37-0.39 against 0.59-0.61, at batch 16 0.33-0.36
against 0.29-0.32 (hence :data:`MIN_ROWS`); 1024 -> 2048 at batch 64 0.11 ms against 0.15-0.21;
1024 -> 256 at batch 64 21 us against 22-23; 256 -> 1024 25 us against 23, 64 -> 256 at batch
256 17 us against 12 (hence :data:`MIN_INPUTS`).
"""

from __future__ import annotations

from typing import Any

from tvm import tirx
from tvm.script import tirx as T

from bitcompiler.kernels.amx_tiles import (
    LANES,
    expand,
    product_2x2,
    store_accumulators,
    tile_config,
    tile_op,
    transpose16,
    zero_accumulators,
)

TILE = 16
MIN_ROWS = 32  # batch rows from which a call takes the AMX branch,
MIN_WORDS = 1 << 21  # and rows x N x K/64 words of work (see min_rows)
MIN_INPUTS = 512  # inputs from which a layer has the branch
I32, I64 = "int32", "int64"


def min_rows(k: int, n: int) -> int:
    """Batch rows from which a call takes the branch: :data:`MIN_ROWS`, and :data:`MIN_WORDS` words
    of work. In a model the tiles' first use after other kernels costs some microseconds (an MLP-Mixer
    at batch 1, whose four 1024 -> 256 layers over 64 tokens took the branch, 0.41 ms a call
    against 0.35 without, though the layer alone was 21 us against 23)."""
    return max(MIN_ROWS, -(-MIN_WORDS // (n * -(-k // 64))))


def fits(k: int, n: int) -> bool:
    """Output rows in whole pairs of 16-row tiles and :data:`MIN_INPUTS` inputs or more."""
    return n % (2 * TILE) == 0 and k >= MIN_INPUTS


def amx_rows_func(K: int, N: int, KW: int, cores: int, out_value: Any) -> Any:
    """The branch as a TVMScript macro ``(X64, WT, Y, E0, E1, M)``: ``X64 (M, KW) uint64`` the packed
    rows, ``WT`` the weights, ``Y (M, N) f32`` the output; ``out_value(E0, E1, acc, n)`` the epilogue
    (``acc`` int64)."""
    NOT = N // TILE
    NPAIR = NOT // 2
    NC = max(1, min(cores, NPAIR))
    PER = -(-NPAIR // NC)  # output tile pairs a task
    PAD = KW * 64 - K
    zero16 = tirx.Broadcast(tirx.const(0, I32), 16)

    def rows(M):  # batch rows in whole tile pairs (an expression: a name bound in TIR is a buffer)
        return (M + 31) // 32 * 32

    config = tile_config([64] * 8)  # all eight tiles 16 rows x 64 bytes

    @T.macro
    def weights(WT, AW, pair, kw):
        # word kw of the 32 output rows of tile pair ``pair`` (row n: lane n % 8 of group n // 8)
        # expanded into AW[kw % 2]
        for a, r in T.grid(2, TILE):
            AW[kw % 2, a, r, LANES] = expand(WT[(pair * 32 + a * 16 + r) // 8, kw, r % 8])

    @T.macro
    def body(X64, WT, Y, E0, E1, M):
        # the batch rows' B tiles, expanded and transposed once, a tile of 16 rows a task
        XT = T.alloc_buffer((rows(M) // 16, T.int64(KW), T.int64(TILE), T.int64(16)), I32)
        for c in T.parallel(rows(M) // 16):
            U = T.alloc_buffer((4, 8, 16), I32)  # the transpose's rows
            for kw in range(T.int64(KW)):
                for p in T.unroll(8):
                    U[0, p, LANES] = tirx.Select(
                        c * 16 + p < M, expand(X64[T.min(c * 16 + p, M - 1), kw]), zero16
                    )
                    U[1, p, LANES] = tirx.Select(
                        c * 16 + p + 8 < M, expand(X64[T.min(c * 16 + p + 8, M - 1), kw]), zero16
                    )
                transpose16(U)
                for q in T.unroll(8):
                    XT[c, kw, q, LANES] = U[0, q, LANES]
                    XT[c, kw, q + 8, LANES] = U[1, q, LANES]
        for i in T.parallel(T.int64(NC)):
            AW = T.alloc_buffer((2, 2, TILE, 16), I32)
            CFG = T.alloc_buffer((64,), "uint8")
            C = T.alloc_buffer((4, TILE, 16), I32)
            CT = T.alloc_buffer((TILE, 16), I32)
            V = T.alloc_buffer((4, 8, 16), I32)  # the transpose's rows
            config(CFG)
            for bp, j in T.grid(rows(M) // 32, T.int64(PER)):
                if i * PER + j < NPAIR:
                    zero_accumulators()
                    weights(WT, AW, i * PER + j, T.int64(0))
                    for kw in range(T.int64(KW)):
                        if kw + 1 < KW:  # the next word's, while this word's tiles load
                            weights(WT, AW, i * PER + j, kw + 1)
                        product_2x2(
                            T.address_of(AW[kw % 2, 0, 0, 0]),
                            T.address_of(AW[kw % 2, 1, 0, 0]),
                            T.address_of(XT[bp * 2, kw, 0, 0]),
                            T.address_of(XT[bp * 2 + 1, kw, 0, 0]),
                            T.int64(64),
                        )
                    store_accumulators(C, T.int64(64))
                    for c in range(4):
                        # C[c]: output rows (tile c // 2) x batch rows (tile c % 2) -> CT: batch x rows
                        for p in T.unroll(8):
                            V[0, p, LANES] = C[c, p, LANES]
                            V[1, p, LANES] = C[c, p + 8, LANES]
                        transpose16(V)
                        for q in T.unroll(8):
                            CT[q, LANES] = V[0, q, LANES]
                            CT[q + 8, LANES] = V[1, q, LANES]
                        for q in range(TILE):
                            if bp * 32 + c % 2 * 16 + q < M:
                                for r in T.vectorized(TILE):
                                    Y[bp * 32 + c % 2 * 16 + q, (i * PER + j) * 32 + c // 2 * 16 + r] = (
                                        out_value(
                                            E0,
                                            E1,
                                            T.Cast(I64, CT[q, r]) - T.int64(PAD),
                                            (i * PER + j) * 32 + c // 2 * 16 + r,
                                        )
                                    )
            T.evaluate(tile_op("tilerelease"))

    return body
