"""Float ops between quantized layers, in one fixed order of operations.

Part of :mod:`bitcompiler.quant.numerics`; import from there. An int8 quantizer rounds
``x / s``: a float that differs in its last bit can land on the other side of a rounding
boundary, so every float that feeds a quantizer is computed here in an order every backend
repeats exactly (see docs/guide.md, "Exactness").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pool_out_size(size: int, k: int, s: int, p: int) -> int:
    """Output size of a window of ``k`` at stride ``s`` over ``size`` padded by ``p`` (floor mode)."""
    return (size + 2 * p - k) // s + 1


def conv_out_size(size: int, k: int, s: int, p: int, d: int) -> int:
    """Output size of a convolution with kernel ``k``, stride ``s``, padding ``p``, dilation ``d``."""
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def window_mean(
    x: torch.Tensor,
    kernel: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    count_include_pad: bool = True,
) -> torch.Tensor:
    """Average pooling over NCHW float32 in a fixed order: ``s = 0``, then ``s = s + x[tap]`` for the
    taps in row-major order (zero padding adds ``+0``), then one float32 division ``s / count``.

    ``count`` is ``kh·kw``, or with ``count_include_pad=False`` the taps inside the image. A global
    mean is the window of the whole image. PyTorch's own pooling sums in an order of its choosing.
    """
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    n, c, h, w = x.shape
    oh, ow = pool_out_size(h, kh, sh, ph), pool_out_size(w, kw, sw, pw)
    xp = F.pad(x.float(), (pw, pw, ph, ph))
    s = torch.zeros(n, c, oh, ow, dtype=torch.float32)
    for i in range(kh):
        for j in range(kw):
            s = s + xp[:, :, i : i + sh * (oh - 1) + 1 : sh, j : j + sw * (ow - 1) + 1 : sw]
    if count_include_pad or (ph == 0 and pw == 0):
        count = torch.full((1, 1, oh, ow), float(kh * kw))
    else:
        ones = F.pad(torch.ones(1, 1, h, w, dtype=torch.float64), (pw, pw, ph, ph))
        count = F.avg_pool2d(ones, (kh, kw), (sh, sw), divisor_override=1).float()  # exact small integers
    return s / count.expand_as(s)
