"""The scheduled float conv core (kernels/conv_float.py) and its lowering of ``aten.conv2d``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bitcompiler as bc
from bitcompiler.backends.lower import to_relax
from bitcompiler.capture import export_graph
from bitcompiler.kernels import ConvSpec
from bitcompiler.kernels.conv_float import (
    KERNEL_NAME,
    float_conv_kernel,
    lanes,
    register_block,
    relayout_weights,
)
from tests.conftest import assert_close
from tests.kernels._util import WORKSPACE, build, llvm_ir_beside_another

# (c, o, h, w, kernel, stride, padding, dilation, groups): channel lanes (16, 8, padded 12),
# 1x1, depthwise, grouped, dilation, odd sizes
CASES = [
    (16, 32, 9, 8, 3, 1, 1, 1, 1),
    (8, 16, 7, 9, 3, 2, 1, 1, 1),
    (12, 12, 10, 10, 3, 1, 1, 1, 1),
    (32, 24, 6, 6, 1, 1, 0, 1, 1),
    (3, 16, 11, 13, 3, 2, 1, 1, 1),
    (24, 24, 9, 9, 3, 1, 1, 1, 24),
    (24, 24, 16, 16, 3, 2, 1, 1, 24),
    (16, 32, 8, 8, 3, 1, 1, 1, 2),
    (8, 12, 7, 7, 3, 1, 2, 2, 4),
    (16, 16, 12, 12, 3, 1, 2, 2, 1),
    (5, 7, 5, 6, 2, 1, 0, 1, 1),
]


@pytest.mark.parametrize(
    "case", CASES, ids=[f"{c[0]}x{c[1]}_{c[2]}x{c[3]}_k{c[4]}s{c[5]}p{c[6]}d{c[7]}g{c[8]}" for c in CASES]
)
@pytest.mark.parametrize("batch", [1, 3])
def test_float_conv_matches_torch(case: tuple, batch: int) -> None:
    c, o, h, w, k, s, p, d, g = case
    spec = ConvSpec(c, o, h, w, (k, k), (s, s), (p, p), (d, d), g, 1, "pm1", "float", False, False)
    torch.manual_seed(sum(case) + batch)
    x, wt, b = torch.randn(batch, c, h, w), torch.randn(o, c // g, k, k), torch.randn(o)
    ref = F.conv2d(x, wt, b, s, p, d, g)
    run = build(float_conv_kernel(spec, bias=True))
    (got,) = run([x, relayout_weights(spec, wt.numpy()), b], [(tuple(ref.shape), "float32")])
    assert_close(torch.from_numpy(got), ref)


def test_lane_choice() -> None:
    def spec(c, o, g):
        return ConvSpec(c, o, 8, 8, (3, 3), (1, 1), (1, 1), (1, 1), g, 1, "pm1", "float", False, False)

    assert lanes(spec(64, 64, 1)) == 16
    assert lanes(spec(60, 12, 1)) == 8  # padded to 16 channels
    assert lanes(spec(96, 96, 96)) == 0  # depthwise: width lanes


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.dw = nn.Conv2d(16, 16, 3, stride=2, padding=1, groups=16, bias=False)
        self.pw = nn.Conv2d(16, 12, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pw(F.relu(self.dw(F.relu(self.stem(x)))))


def test_float_model_uses_the_kernel() -> None:
    torch.manual_seed(0)
    model, x = Net().eval(), torch.randn(2, 3, 13, 11)
    text = to_relax(export_graph(model, (x,)))["main"].script()
    assert text.count(KERNEL_NAME) == 3 and "conv2d(" not in text
    cm = bc.compile(model, (x,), scheme="none")
    for batch in (1, 3):
        xb = torch.randn(batch, 3, 13, 11)
        with torch.no_grad():
            assert_close(cm(xb), model(xb))


def _workspace_allocations(prim) -> int:
    """Heap workspaces the kernel allocates, built as the CPU backend builds it."""
    return llvm_ir_beside_another(prim).count(WORKSPACE)


@pytest.mark.parametrize("case", [(64, 64, 8, 8, 1, 0), (16, 12, 7, 7, 1, 0), (32, 32, 9, 9, 3, 1)])
def test_register_block_is_a_stack_array(case: tuple) -> None:
    """The accumulators stay in registers: the block is under 1 KiB and no heap workspace holds it
    (only the zero-padded input copy, when there is padding)."""
    c, o, h, w, k, p = case
    spec = ConvSpec(c, o, h, w, (k, k), (1, 1), (p, p), (1, 1), 1, 1, "pm1", "float", False, False)
    vb = lanes(spec)
    nv, rh, rw = register_block(spec, vb)
    assert nv * rh * rw * vb * 4 < 1024
    assert _workspace_allocations(float_conv_kernel(spec, bias=True)) == (1 if p else 0)


@pytest.mark.parametrize("bias", [False, True])
def test_epilogue_stores_vectors_beside_other_functions(bias: bool) -> None:
    """Built in one module with other functions (the Relax VM's: LLVM gets no ``noalias``
    arguments), the epilogue stores each channel's pixels of a register block as one vector instead
    of one float at a time (reloading the bias before each)."""
    spec = ConvSpec(3, 64, 32, 32, (3, 3), (1, 1), (1, 1), (1, 1), 1, 1, "pm1", "float", False, False)
    nv, rh, rw = register_block(spec, lanes(spec))
    assert rw == 8
    ll = llvm_ir_beside_another(float_conv_kernel(spec, bias=bias))
    body = next(
        b
        for b in ll.split("\ndefine ")[1:]
        if "@__tvm_parallel_lambda" in b.split("\n", 1)[0] and "fmul" in b
    )
    assert "store float" not in body
    assert body.count("store <8 x float>") == nv * rh * lanes(spec)
