"""Compact weight streams: numerics round trip and the expand kernel, bit for bit."""

import numpy as np
import pytest
import torch
import tvm

from bitcompiler.kernels.expand import expand_planes_kernel
from bitcompiler.quant import numerics as nu


@pytest.mark.parametrize(
    "bits, rows, cg, kernel",
    [
        (1, 5, 3, (3, 3)),
        (2, 7, 33, (1, 1)),
        (8, 4, 1, (3, 3)),
        (1, 6, 70, ()),
        (1, 64, 16, (3, 3)),
        (2, 3, 64, (3, 3)),
        (1, 1, 31, ()),
        (2, 1, 32, ()),
    ],
)
def test_stream_expands_to_the_planes(bits, rows, cg, kernel):
    g = torch.Generator().manual_seed(rows * cg)
    shape = (rows, cg, *kernel)
    code = "uint" if bits > 1 else "pm1"
    q = (
        torch.randint(0, 2**bits, shape, generator=g)
        if bits > 1
        else 2 * torch.randint(0, 2, shape, generator=g) - 1
    )
    planes = nu.conv_codes_to_planes(q, bits, code) if kernel else nu.code_to_planes(q, bits, code)
    stream = nu.planes_to_stream(planes, cg)
    assert stream.numel() == nu.num_words(bits * planes[0, ..., 0].numel() * cg)  # no padding
    assert torch.equal(nu.stream_to_planes(stream, tuple(planes.shape), cg), planes)
    lib = tvm.compile(expand_planes_kernel(tuple(planes.shape), cg), target="llvm")
    out = tvm.runtime.tensor(np.zeros(planes.numel(), "int32"))
    lib(tvm.runtime.tensor(stream.numpy()), out)
    np.testing.assert_array_equal(out.numpy(), planes.reshape(-1).numpy())


def test_only_layers_that_waste_words_are_compact():
    assert nu.stores_compact(1, 96 * 9, 1, 96 * 9)  # depthwise 3x3: a word per one-bit tap
    assert not nu.stores_compact(1, 64 * 9, 64, 64 * 9 * 2)  # 64 channels fill two words exactly
