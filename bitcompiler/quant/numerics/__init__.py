"""The one place where bitcompiler computes a number.

Every quantizer, pass, custom-op reference and test calls these functions;
kernels are checked against them. Pure torch, no TVM.

Conventions (the kernels in ``bitcompiler/kernels`` read exactly this):

* Bits are packed along the reduction axis into ``int32`` words, least
  significant bit first: bit ``j`` of word ``w`` holds element ``32*w + j``.
  The tail of the last word is zero.
* A quantized weight is ``W[n, k] = scale[n] * Q[n, k] + offset[n]`` with an
  integer *code* ``Q`` stored as ``B`` bit-planes ``planes[i]``:

  - ``code="pm1"`` (``B == 1``): ``Q = 2*b - 1`` in {-1, +1} (binary weights);
  - ``code="uint"``: ``Q = sum_i 2**i * b_i`` in ``0 .. 2**B - 1`` (affine weights).

* Activations entering a bit layer are one of:

  - ``"float"``: used as they are (weight-only layer);
  - ``"int8"``: per-sample symmetric int8, ``x = s * q`` with
    ``s = max(max|x|, EPS) / 127`` and ``q = clamp(round(x / s), -127, 127)``;
  - ``"binary"``: ``x = sign(x)`` in {-1, +1} with ``sign(0) = +1``.

* A bit layer computes the integer part ``acc = sum_k Q[n,k] * x_int[k]`` and
  ``sumx = sum_k x_int[k]`` (both exact), then the float epilogue
  ``y = (scale[n] * s) * acc + (offset[n] * s) * sumx + bias[n]`` in float32,
  or, with a threshold, ``y = +1 if thr_sign[n] * acc >= thr[n] else -1``.

* Float activations times ``uint`` codes of 5 to 8 bits with an offset use centered codes:
  ``acc = sum_k (Q[n,k] - z) * x[k]`` with ``z = 2**(B-1)`` and the offset ``offset[n] + z *
  scale[n]`` (``code_center``, ``centered_offset``), so that the epilogue never cancels.
"""

from bitcompiler.quant.numerics.core import *
from bitcompiler.quant.numerics.core import _check_code  # noqa: F401
from bitcompiler.quant.numerics.floats import *
from bitcompiler.quant.numerics.methods import *
