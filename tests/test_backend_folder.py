"""The done-when of the backend seam: a new target family is a new folder under backends/ that
registers itself; api.py, passes/ and target.py are not edited.

The test writes such a folder into a temporary directory, puts that directory on the
``bitcompiler.backends`` package path (where the backends are discovered), and compiles, runs,
exports and loads a model for the new target. The folder's backend lowers through the shared
Relax lowering (kernels built for its own TVM target) and TVM's default Relax pipeline, as a
GPU-like backend would, and runs on the host.
"""

import sys
import textwrap

import pytest
import torch
from torch import nn

import bitcompiler as bc
import bitcompiler.backends
from bitcompiler import target as targets

BACKEND = '''
"""A backend family in its own folder: the Relax lowering, TVM's default pipeline, generic x86-64."""

from pathlib import Path

from bitcompiler.backends.base import Backend, BuildInput, Capabilities, Target, register_backend
from bitcompiler.backends.cpu.build import load_library
from bitcompiler.backends.cpu.runner import CPURunner
from bitcompiler.backends.lower import to_relax

BUILT = []


@register_backend
class ToyBackend(Backend):
    family = "toy"
    targets = ("toy-x86",)

    def tvm_target(self, target: Target):
        import tvm

        return tvm.target.Target({"kind": "llvm", "mcpu": "x86-64"})

    def capabilities(self, target: Target) -> Capabilities:
        return Capabilities(word_bits=64, vector_bits=128, missing_kernels=frozenset({"tiled_conv2d"}))

    def build(self, inp: BuildInput, target: Target) -> CPURunner:
        import tvm

        mod = to_relax(inp.exported, target)  # kernels built for self.tvm_target(target)
        BUILT.append(mod)
        return CPURunner(tvm.compile(mod, target=target.tvm_target()))

    def load(self, directory: Path, target: Target) -> CPURunner:
        return load_library(directory)
'''


@pytest.fixture
def backend_folder(tmp_path):
    """``<tmp>/toy_backend/__init__.py`` on the backends' package path; everything undone after."""
    (tmp_path / "toy_backend").mkdir()
    (tmp_path / "toy_backend" / "__init__.py").write_text(textwrap.dedent(BACKEND))
    targets.target_names()  # the package's own backends registered first, then saved
    saved = dict(targets._BACKENDS), dict(targets._TARGETS)
    bitcompiler.backends.__path__.append(str(tmp_path))
    targets._discover.cache_clear()
    try:
        yield sys.modules
    finally:
        bitcompiler.backends.__path__.remove(str(tmp_path))
        sys.modules.pop("bitcompiler.backends.toy_backend", None)
        for registry, old in zip((targets._BACKENDS, targets._TARGETS), saved):
            registry.clear()
            registry.update(old)
        targets._discover.cache_clear()
        targets._cached_capabilities.cache_clear()


def test_a_new_backend_folder_compiles_runs_exports_and_loads(backend_folder, tmp_path):
    assert "toy-x86" in targets.target_names()  # found by walking backends/, nothing registered by hand
    module = backend_folder["bitcompiler.backends.toy_backend"]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.Hardtanh(), nn.Linear(32, 10)).eval()
    cm = bc.compile(model, (torch.randn(1, 64),), target="toy-x86", scheme="binary:act=binary")
    assert type(cm.target.backend).__name__ == "ToyBackend" and len(module.BUILT) == 1
    assert "bitc" in module.BUILT[0].script()  # the bitc kernels came through the shared lowering
    x = torch.randn(5, 64)
    ref = cm.reference(x)
    assert not torch.equal(ref, model(x))  # the quantized reference, not the float model
    assert torch.equal(cm(x), ref)  # W1A1 end to end: bit-exact
    same = bc.load(cm.export(tmp_path / "out"))
    assert same.target == bc.Target("toy-x86") and torch.equal(same(x), ref)


def test_the_folder_is_gone_after_the_fixture():
    assert "toy-x86" not in targets.target_names()
    with pytest.raises(bc.TargetError, match="unknown target 'toy-x86'"):
        bc.Target("toy-x86")
