"""The zoo: third-party architectures (pytorchcv's definitions, random weights) under four schemes.

Each model must compile under every scheme; ``none`` must equal eager float; every scheme's
compiled output must equal its reference; a quantized reference must differ from float (the
scheme really quantized). The whole corpus is marked ``zoo`` (``make test-zoo``, ~40 min);
one model runs in the fast tests. Float comparisons allow 1e-4 relative, or ten times the
model's own float32-vs-float64 difference where random weights make it ill-conditioned.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import bitcompiler as bc
from bench.wild import SCHEMES, relative_error, tolerance
from tests.test_storage import layer_ratios

corpus = pytest.importorskip("bench.corpus")
pytest.importorskip("pytorchcv")


def check(name: str) -> None:
    model, x = corpus.build(name)
    xb = torch.randn(4, *x.shape[1:], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        float_out = {1: model(x), 4: model(xb)}
    tol = tolerance(model, xb)
    for scheme in SCHEMES:
        moved = 0.0  # how far the quantized reference is from float, over both batches
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cm = bc.compile(model, (x,), scheme=scheme)
        assert cm.dynamic_batch, f"{name} {scheme}: batch fixed ({cm.report().extra.get('batch')})"
        worst = max(layer_ratios(cm, aligned=True).values(), default=1.0)
        assert worst <= 1.1, f"{name} {scheme}: a layer stores {worst:.2f}x its nominal bits"
        for inp in (x, xb):
            got, ref = cm(inp), cm.reference(inp)
            err = relative_error(got, ref)
            assert err <= tol, f"{name} {scheme} batch {inp.shape[0]}: compiled vs reference {err:.2e}"
            if scheme == "none":
                err = relative_error(got, float_out[inp.shape[0]])
                assert err <= tol, f"{name}: none vs eager float {err:.2e}"
            else:
                moved = max(moved, relative_error(ref, float_out[inp.shape[0]]))
        # a random-weight net can map one input to nearly its bias (CondenseNet: 7e-3 at batch 4,
        # less at batch 1), so the quantized reference must move on at least one of the batches
        assert scheme == "none" or moved > 1e-3, f"{name} {scheme}: not quantized"


def test_one_zoo_model_under_every_scheme():
    check("resnet20_cifar10")


@pytest.mark.slow
@pytest.mark.zoo
@pytest.mark.parametrize("name", corpus.MODELS)
def test_zoo(name):
    check(name)
