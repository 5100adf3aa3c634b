"""Targets come from the backends that register themselves; compile() has no per-backend branch."""

from pathlib import Path
from typing import ClassVar

import pytest
import torch
from torch import nn

import bitcompiler as bc
from bitcompiler import target as targets
from bitcompiler.backends.base import Backend, BuildInput, Capabilities, Runner


class _GraphRunner(Runner):
    def __init__(self, graph):
        self.graph = graph

    def __call__(self, inputs):
        with torch.no_grad():
            return [self.graph(*inputs)]

    def export(self, directory: Path) -> list[str]:
        return []


class _ReferenceBackend(Backend):
    """A backend family defined outside the package: it runs the rewritten graph in PyTorch."""

    family = "reference"
    targets = ("reference",)
    built: ClassVar[list] = []

    def build(self, inp: BuildInput, target: bc.Target) -> Runner:
        self.built.append((inp, target))
        return _GraphRunner(inp.graph)

    def load(self, directory: Path, target: bc.Target) -> Runner:
        raise NotImplementedError

    def tvm_target(self, target: bc.Target):
        return None

    def capabilities(self, target: bc.Target) -> Capabilities:
        return Capabilities(missing_kernels=frozenset({"tiled_conv2d"}))


@pytest.fixture
def reference_backend():
    backends, names = dict(targets._BACKENDS), dict(targets._TARGETS)
    targets.register_backend(_ReferenceBackend)
    yield _ReferenceBackend
    targets._BACKENDS.clear(), targets._BACKENDS.update(backends)
    targets._TARGETS.clear(), targets._TARGETS.update(names)


def test_the_backend_packages_register_their_targets():
    assert targets.target_names()[0] == "cpu"
    assert {"cpu", "cortex-m3", "cortex-m4", "cortex-m7", "cortex-m55"} <= set(targets.target_names())
    assert type(bc.Target("cortex-m7").backend).__name__ == "CortexMBackend"
    with pytest.raises(bc.TargetError, match="unknown target 'tpu'; valid targets: cpu, aarch64, cortex-m3"):
        bc.Target("tpu")


def test_a_registered_family_compiles_through_its_build(reference_backend):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)).eval()
    x = torch.randn(1, 64)
    cm = bc.compile(model, (x,), target="reference", scheme="binary:act=binary")
    (inp, target), *_ = reference_backend.built[-1:]
    assert target == bc.Target("reference") and inp.graph is cm.graph and inp.example_inputs[0] is not None
    assert any("bitc" in str(n.target) for n in inp.graph.graph.nodes)  # the lowered bitc ops
    xb = torch.randn(3, 64)
    assert torch.equal(cm(xb), cm.reference(xb))
    with pytest.warns(UserWarning, match="tuning supports target='cpu' only"):
        bc.compile(model, (x,), target="reference", scheme="binary", tune=True)


def test_passes_see_a_target_with_capabilities():
    ctx = bc.passes.pipeline.PassContext(target="cortex-m4")
    assert isinstance(ctx.target, bc.Target) and not ctx.target.capabilities.has_kernel("tiled_conv2d")
    assert bc.Target("cpu").capabilities.has_kernel("tiled_conv2d")
