"""Max pooling kernels (kernels/pool_max.py): the float max pool equals torch's bit for bit, and the
OR pool of packed sign bits equals packing the max-pooled floats."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import tvm

from bitcompiler import kernels
from bitcompiler.kernels._common import PARALLEL_MIN

# (h, w, kernel, stride, padding, dilation, ceil_mode)
WINDOWS = [
    (28, 28, 2, 2, 0, 1, False),
    (7, 7, 2, 2, 0, 1, False),
    (7, 7, 3, 2, 1, 1, True),
    (9, 8, 3, 1, 1, 2, False),
    (82, 82, 2, 2, 0, 1, False),  # 40 x 41 x 41 outputs a sample: the one in parallel (PARALLEL_MIN)
    # vectors along rows of 8 or 4 outputs: padding on both sides, stride 1 and 2, dilation
    (56, 20, 3, 2, 1, 1, False),
    (12, 32, 3, 1, 1, 1, False),
    (16, 17, 3, 2, 1, 2, True),
]


def window_of(h, w, k, s, p, d, ceil) -> tuple[kernels.PoolWindow, torch.Tensor]:
    x = torch.randn(3, 40, h, w)
    y = F.max_pool2d(x, k, s, p, d, ceil_mode=ceil)
    return kernels.PoolWindow(h, w, y.shape[2], y.shape[3], (k, k), (s, s), (p, p), (d, d)), x


def run(prim, x: np.ndarray, out_shape: tuple, dtype: str) -> np.ndarray:
    f = tvm.compile(prim)
    out = tvm.runtime.tensor(np.zeros(out_shape, dtype))
    f(tvm.runtime.tensor(x), out)
    return out.numpy()


@pytest.mark.parametrize("case", WINDOWS)
def test_float_max_pool_equals_torch(case):
    window, x = window_of(*case)
    want = F.max_pool2d(x, *case[2:6], ceil_mode=case[6]).numpy()
    prim = kernels.max_pool2d_kernel(40, window)
    assert ("T.parallel(" in prim.script()) == (40 * want.shape[2] * want.shape[3] >= PARALLEL_MIN)
    got = run(prim, x.numpy(), want.shape, "float32")
    assert np.array_equal(got, want)


@pytest.mark.parametrize("case", WINDOWS)
def test_or_pool_of_packed_signs_equals_packing_the_pooled_floats(case):
    window, x = window_of(*case)
    x[x.abs() < 0.3] = 0.0  # exact zeros (sign bit set) and -0.0 where negated below
    x[:, ::3] = -x[:, ::3]
    pooled = F.max_pool2d(x, *case[2:6], ceil_mode=case[6])
    words = 2  # 40 channels: one full word and a tail of 8
    pack = lambda t: run(
        kernels.pack_sign_nchw(40, t.shape[2], t.shape[3], 1),
        t.numpy(),
        (3, t.shape[2], t.shape[3], 1, words),
        "int32",
    )
    got = run(kernels.or_pool_packed_kernel(1, words, window), pack(x), pack(pooled).shape, "int32")
    assert np.array_equal(got, pack(pooled))


def test_a_window_too_large_is_refused():
    with pytest.raises(ValueError, match="no max-pool kernel"):
        kernels.max_pool2d_kernel(4, kernels.PoolWindow(16, 16, 1, 1, (9, 9), (1, 1)))
