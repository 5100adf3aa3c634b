"""TIR bit kernels: dense and conv2d bit layers plus the activation quantizers that feed them.

Every kernel is a plain TIR ``PrimFunc`` (no extern or packed calls) with a symbolic int64 batch
``M``; with ``target="llvm"`` (the default) it comes already scheduled for the host CPU, for any
other target kind it is the same computation unscheduled. Word layout and numerics are those of
:mod:`bitcompiler.quant.numerics`.

Measured on the 2-core AMD EPYC (znver3, AVX2) dev machine, ``TVM_NUM_THREADS=1`` vs
``torch.nn.functional.linear`` fp32 eager with ``torch.set_num_threads(1)``, K = N = 4096
(median of many runs; see ``dense.py`` for the schedule):

* W1A1 dense (pm1, binary act, no offset), batch 1: ~90 us vs ~4.2 ms  (~45x)
* W1A1 dense, batch 64:                            ~6.0 ms vs ~54 ms   (~9x, popcount-bound)
* W1 weight-only dense (pm1, float act), batch 1:  ~0.55 ms vs ~4.3 ms (~7x, ``dense_avx2``)
* W2A8 dense (uint 2-bit, int8 act), batch 1:      ~0.33 ms vs ~4.3 ms (~12x; ORT int8 ~1.1 ms)

(Timings on a shared 2-core VM vary by 10-20% from run to run.)
"""

from bitcompiler.kernels.activations import pack_sign_nchw, pack_sign_rows, quantize_rows_int8
from bitcompiler.kernels.conv import conv2d_kernel
from bitcompiler.kernels.dense import dense_kernel
from bitcompiler.kernels.spec import ConvSpec, DenseSpec
from bitcompiler.kernels.tiled import (
    TiledConvSpec,
    TiledDenseSpec,
    tiled_conv_expand_kernel,
    tiled_expand_kernel,
    tiled_fused_kernel,
    tiled_unaligned_kernel,
)

__all__ = [
    "ConvSpec",
    "DenseSpec",
    "TiledConvSpec",
    "TiledDenseSpec",
    "conv2d_kernel",
    "dense_kernel",
    "pack_sign_nchw",
    "pack_sign_rows",
    "quantize_rows_int8",
    "tiled_conv_expand_kernel",
    "tiled_expand_kernel",
    "tiled_fused_kernel",
    "tiled_unaligned_kernel",
]
