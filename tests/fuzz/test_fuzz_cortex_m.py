"""The graph fuzzer on Cortex-M: ~10 generated models per scheme draw, built for cortex-m4 and run
under QEMU, against ``cm.reference(x)`` at batch 1 and 3.

The generator keeps to what the Cortex-M backend lowers: no sigmoid / GELU / concatenation (no
C emitter: a ``CortexMLoweringError`` names the op) and no scheme ``none`` (float conv and linear
layers do not lower; bit layers always do).
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings

import bitcompiler as bc
from bitcompiler.backends.cortex_m.qemu import INSTALL, missing_tools
from tests.conftest import assert_close
from tests.fuzz.strategies import CORTEX_ACTS, Spec, build, exact, models, schemes

EXAMPLES = int(os.environ.get("BITC_FUZZ_CORTEX_EXAMPLES", "10"))


def check_cortex_m(spec: Spec, scheme: str) -> None:
    """Same rule as the CPU check (``test_fuzz_cpu.check_cpu``): exact where :func:`exact` says
    so, else 1e-5 relative (``act=8`` included: int8-activation epilogues may round differently
    in the last bit until they follow the reference's order)."""
    target = bc.Target("cortex-m4", count_instructions=False)
    cm = bc.compile(build(spec), (torch.randn(*spec.input),), target=target, scheme=scheme)
    g = torch.Generator().manual_seed(1)
    for batch in (1, 3):
        x = torch.randn(batch, *spec.input[1:], generator=g)
        got, ref = cm(x), cm.reference(x)
        if exact(scheme, spec):
            assert torch.equal(got, ref), (got - ref).abs().max().item()
        else:
            assert_close(got, ref)


@pytest.mark.skipif(bool(missing_tools()), reason=f"{', '.join(missing_tools())} missing; {INSTALL}")
@pytest.mark.slow
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(spec=models(CORTEX_ACTS, cat=False), scheme=schemes().filter(lambda s: s != "none"))
def test_fuzz_cortex_m(spec: Spec, scheme: str) -> None:
    check_cortex_m(spec, scheme)
