"""Fuzzed graphs on the CPU target: random small models x random schemes, compiled output against
``cm.reference(x)`` at batch 1 and 3.

``make test`` runs ``BITC_FUZZ_EXAMPLES`` examples (default 50, derandomized: the same ones on
every run), shared evenly by the scheme families; ``make fuzz`` runs 500. Each failure hypothesis found is a named test in
``test_fuzz_regressions.py``.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bitcompiler as bc
from tests.fuzz.strategies import FAMILIES, INEXACT_OPS, Spec, build, exact, has_kind, models, schemes

EXAMPLES = int(os.environ.get("BITC_FUZZ_EXAMPLES", "50"))
FUZZ = settings(
    max_examples=max(1, EXAMPLES // len(FAMILIES)),  # per scheme family: each gets its share
    deadline=None,
    derandomize=True,  # CI sees the same examples every run
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# The CPU module's float epilogues are computed exactly as the reference computes them (no FMA
# contraction: backends/exact_float.py), so models that :func:`exact` admits are compared bit for
# bit (test_fuzz_regressions.test_binary_epilogue_is_bit_exact_at_batch_3 was the first case).
CPU_EPILOGUE_EXACT = True


# Outputs that cancel to near zero: 1e-5 of the output is below the float32 rounding of the terms
# that cancelled (Linear(8, 1): |y| = 1.8e-3, terms ~1, error 4.5e-8), so the scale has a floor.
SCALE_FLOOR = 1e-2
# act=8 / act=binary: a float value 1 ulp off (FMA, GELU) can land on the other side of an int8
# rounding or sign boundary in the next layer's quantizer: one quantization step in one input
# element (uniform:bits=1,act=8 after a GELU branch: 6.8e-4 relative). Allowed, no more.
QUANTIZER_STEP = 2e-2


def close(got: torch.Tensor, ref: torch.Tensor, rtol: float) -> None:
    scale = max(ref.abs().max().item(), SCALE_FLOOR)
    err = (got - ref).abs().max().item()
    assert err <= rtol * scale, f"max error {err:.3g} > {rtol} x {scale:.3g}"


def check_cpu(spec: Spec, scheme: str) -> None:
    """Compile ``spec``'s model for the CPU and compare it with its reference at batch 1 and 3.

    Tolerance: bit-exact where :func:`exact` says so; else 1e-5 relative to max(|ref|,
    ``SCALE_FLOOR``), or ``QUANTIZER_STEP`` where activations are quantized after a float op
    outside the exactness contract (GELU: docs/guide.md, "Exactness"; sigmoid is inside it).
    """
    model = build(spec)
    cm = bc.compile(model, (torch.randn(*spec.input),), target="cpu", scheme=scheme)
    g = torch.Generator().manual_seed(1)
    for batch in (1, 3):
        x = torch.randn(batch, *spec.input[1:], generator=g)
        got, ref = cm(x), cm.reference(x)
        if CPU_EPILOGUE_EXACT and exact(scheme, spec):
            assert torch.equal(got, ref), (got - ref).abs().max().item()
        else:
            inexact = "act=" in scheme and has_kind(spec.layers, INEXACT_OPS)
            close(got, ref, QUANTIZER_STEP if inexact else 1e-5)


@pytest.mark.fuzz
@pytest.mark.parametrize("family", FAMILIES)
@FUZZ
@given(data=st.data())
def test_fuzz_cpu(family: str, data: st.DataObject) -> None:
    spec = data.draw(models(), label="spec")
    scheme = data.draw(schemes(family), label="scheme")
    check_cpu(spec, scheme)
