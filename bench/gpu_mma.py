"""Probe: W1A1 GEMM on binary tensor cores (``mma.sync.aligned.m16n8k256 ... b1.b1 ... and.popc``).

Not part of the compiler (its kernels come from TVM schedules): a hand-written CUDA kernel that
measures how fast the binary tensor-core route is on the GPU at hand, beside the popcount kernel
and ``torch._int_mm`` (``python -m bench --gpu`` runs it when CuPy and an sm_80+ GPU are there).

Operands are packed rows, 32 signs to a word (bit 1 = +1): ``A (M, K/32)``, ``B (N, K/32)``.
With ``and.popc`` the tensor core counts ``popc(a & b)``; the ±1 dot product follows from the
rows' own popcounts: ``dot = K - 2 (pa + pb - 2 popc(a & b))``. Each warp computes a 64x64 tile
(4 x 8 fragments of m16n8), four warps a 128x128 block; fragments are read straight from global
memory (L1/L2), no shared-memory staging.
"""

from __future__ import annotations

import numpy as np

SOURCE = r"""
extern "C" __global__ void __launch_bounds__(128)
w1a1_mma(const unsigned* __restrict__ A, const unsigned* __restrict__ B, const int* __restrict__ PA,
         const int* __restrict__ PB, int* __restrict__ C, int M, int N, int K) {
  const int KW = K / 32, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int row0 = blockIdx.y * 128 + (warp >> 1) * 64, col0 = blockIdx.x * 128 + (warp & 1) * 64;
  int acc[4][8][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[i][j][r] = 0;
  for (int k = 0; k < KW; k += 8) {
    unsigned a[4][4], b[8][2];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const unsigned* r0 = A + (size_t)(row0 + i * 16 + g) * KW + k + t;
      const unsigned* r1 = r0 + (size_t)8 * KW;
      a[i][0] = r0[0]; a[i][1] = r1[0]; a[i][2] = r0[4]; a[i][3] = r1[4];
    }
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const unsigned* c = B + (size_t)(col0 + j * 8 + g) * KW + k + t;
      b[j][0] = c[0]; b[j][1] = c[4];
    }
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 8; ++j)
        asm volatile(
          "mma.sync.aligned.m16n8k256.row.col.s32.b1.b1.s32.and.popc "
          "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
          : "+r"(acc[i][j][0]), "+r"(acc[i][j][1]), "+r"(acc[i][j][2]), "+r"(acc[i][j][3])
          : "r"(a[i][0]), "r"(a[i][1]), "r"(a[i][2]), "r"(a[i][3]), "r"(b[j][0]), "r"(b[j][1]));
  }
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int m = row0 + i * 16 + g + (r >> 1) * 8, n = col0 + j * 8 + t * 2 + (r & 1);
        C[(size_t)m * N + n] = K - 2 * (PA[m] + PB[n] - 2 * acc[i][j][r]);
      }
}
"""


def run(cp, size: int = 4096, seed: int = 0) -> tuple[object, bool]:
    """``(launch, exact)``: a callable running the kernel once on ``size``-cubed packed operands,
    and whether its output equals the ±1 matrix product (computed by CuPy in float32)."""
    rng = np.random.default_rng(seed)
    a_bits = rng.integers(0, 2, (size, size), dtype=np.uint8)
    b_bits = rng.integers(0, 2, (size, size), dtype=np.uint8)

    def pack(bits: np.ndarray) -> np.ndarray:  # bit i of word w = element 32 w + i
        return np.packbits(bits, axis=1, bitorder="little").view(np.uint32)

    a, b = cp.asarray(pack(a_bits)), cp.asarray(pack(b_bits))
    pa = cp.asarray(a_bits.sum(1, dtype=np.int32))
    pb = cp.asarray(b_bits.sum(1, dtype=np.int32))
    c = cp.empty((size, size), dtype=cp.int32)
    fn = cp.RawModule(code=SOURCE).get_function("w1a1_mma")
    grid, block = (size // 128, size // 128), (128,)
    args = (a, b, pa, pb, c, np.int32(size), np.int32(size), np.int32(size))

    def launch() -> None:
        fn(grid, block, args)

    launch()
    sa = cp.asarray(a_bits[:256].astype(np.float32) * 2 - 1)
    sb = cp.asarray(b_bits.astype(np.float32) * 2 - 1)
    exact = bool(cp.array_equal(c[:256], (sa @ sb.T).astype(cp.int32)))
    return launch, exact
