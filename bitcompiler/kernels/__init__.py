"""TIR bit kernels: dense and conv2d bit layers plus the activation quantizers that feed them.

Every kernel is a plain TIR ``PrimFunc`` (no extern or packed calls) with a symbolic int64 batch
``M``; with ``target="llvm"`` (the default) it comes already scheduled for the host CPU, for any
other target kind it is the same computation unscheduled. Word layout and numerics are those of
:mod:`bitcompiler.quant.numerics`.

Measured on the 2-core AMD EPYC (znver3, AVX2) dev machine, ``TVM_NUM_THREADS=1``, kernel alone,
K = N = 4096, batch 1 (median of many runs; torch fp32 ``F.linear`` takes 3.0-4.2 ms there):

* W1A1 dense, rows in lanes (:mod:`~bitcompiler.kernels.dense_lanes`, Harley-Seal): ~46 us
  (the byte-lane kernel of :mod:`~bitcompiler.kernels.dense_binary`: ~65 us); batch 64: ~2.9 ms
* W1 weight-only dense (pm1, float act), batch 1: ~0.43 ms (``dense_avx2``, table lookup; 0.54 ms
  with the rows' words strided)
* 8-bit weights, int8 act: one byte per code, ``vpmaddwd`` (4096 -> 256 at batch 1: ~28 us)
* W2A8 dense (uint 2-bit, int8 act), batch 1: ~0.22 ms with pre-interleaved codes (~0.29 ms from
  the planes); ORT dynamic int8 takes 0.64-1.1 ms. On znver4 (AVX-512 VNNI,
  :mod:`~bitcompiler.kernels.dense_vnni`): 108 us with the activations quantized in the kernel
  (the AVX2 kernel 167 us there)

The CPU lowering picks these through :func:`relaid_dense_kernel` / :func:`relaid_tiled_kernel` and
stores the layers' weights in the order the kernels read (the same bits).

(Timings on a shared 2-core VM vary by 10-20% from run to run.)
"""

from bitcompiler.kernels.activations import pack_sign_nchw, pack_sign_rows, quantize_rows_int8
from bitcompiler.kernels.conv import (
    codes_conv_fits,
    codes_from_planes,
    conv2d_c_kernel,
    conv2d_kernel,
    stored_codes_conv_kernel,
    stored_weights,
)
from bitcompiler.kernels.dense import Relaid, dense_kernel, relaid_dense_kernel
from bitcompiler.kernels.pool_max import PoolWindow, max_pool2d_kernel, or_pool_packed_kernel
from bitcompiler.kernels.pooling import window_mean_kernel
from bitcompiler.kernels.spec import ConvSpec, DenseSpec
from bitcompiler.kernels.tiled import (
    TiledConvSpec,
    TiledDenseSpec,
    TiledStages,
    relaid_tiled_kernel,
    tiled_conv_expand_kernel,
    tiled_conv_stages,
    tiled_expand_kernel,
    tiled_fused_kernel,
    tiled_linear_stages,
    tiled_unaligned_kernel,
)

__all__ = [
    "ConvSpec",
    "DenseSpec",
    "PoolWindow",
    "Relaid",
    "TiledConvSpec",
    "TiledDenseSpec",
    "TiledStages",
    "codes_conv_fits",
    "codes_from_planes",
    "conv2d_c_kernel",
    "conv2d_kernel",
    "dense_kernel",
    "max_pool2d_kernel",
    "or_pool_packed_kernel",
    "pack_sign_nchw",
    "pack_sign_rows",
    "quantize_rows_int8",
    "relaid_dense_kernel",
    "relaid_tiled_kernel",
    "stored_codes_conv_kernel",
    "stored_weights",
    "tiled_conv_expand_kernel",
    "tiled_conv_stages",
    "tiled_expand_kernel",
    "tiled_fused_kernel",
    "tiled_linear_stages",
    "tiled_unaligned_kernel",
    "window_mean_kernel",
]
