"""The Cortex-M bundle's model code built for the host under AddressSanitizer and
UndefinedBehaviorSanitizer: clean on random inputs and equal to the reference, for every bitc op
and scheme.

Float layers here are the float ops between bit layers (BatchNorm folded into scales, relu,
hardtanh, pooling, the residual add): a float conv or linear has no Cortex-M lowering
(``CortexMLoweringError``), so scheme ``none`` does not build for this target."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bitcompiler as bc
from bitcompiler.backends.cortex_m.host import HostBuildError, host_build, host_run
from bitcompiler.backends.cortex_m.qemu import INSTALL, missing_tools
from tests.conftest import assert_close, randomize_bn

needs_tools = pytest.mark.skipif(
    bool(missing_tools()) or shutil.which("gcc") is None,
    reason=f"gcc or the Cortex-M toolchain missing; install with: {INSTALL}",
)


class Net(nn.Module):
    """bit convs (dense, strided) + BN + relu/hardtanh + max/avg pooling + residual add + linears."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.c3 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.fc1, self.fc2 = nn.Linear(64, 32), nn.Linear(32, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.b1(self.c1(x))), 2)  # 8x8 -> 4x4
        x = x + F.hardtanh(self.b2(self.c2(x)))
        x = F.avg_pool2d(F.relu(self.c3(x)), 1)  # 2x2
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


SCHEMES = [
    "binary",
    "binary:act=binary,first_last=quantize",
    "uniform:bits=2,act=8",
    "uniform:bits=4",
    "tiled:p=4,min_weights=64,act=binary",  # fc1 (2048 weights) tiled, first/last int8
    "tiled:p=4,min_weights=64",
    "bitnet",
    "tiled:p=64,min_weights=64",  # p does not divide fc1's 32 rows: the unaligned tile kernel
]


def _model(scheme: str) -> tuple[nn.Module, tuple[int, ...]]:
    torch.manual_seed(0)
    if scheme == "threshold":  # binary layers feeding binary layers: integer threshold epilogues
        net = nn.Sequential(nn.Flatten(), nn.Linear(64, 48), nn.Hardtanh(), nn.Linear(48, 32), nn.Hardtanh())
        return nn.Sequential(net, nn.Linear(32, 10)).eval(), (1, 64)
    return randomize_bn(Net()), (1, 1, 8, 8)


@needs_tools
@pytest.mark.slow
@pytest.mark.parametrize("scheme", [*SCHEMES, "threshold"])
def test_bundle_is_sanitizer_clean_on_the_host(scheme):
    model, shape = _model(scheme)
    if scheme == "threshold":
        scheme = "binary:act=binary,first_last=quantize"
    target = bc.Target("cortex-m4", count_instructions=False)
    cm = bc.compile(model, (torch.randn(*shape),), target=target, scheme=scheme)
    exe = host_build(cm._runner.bundle, sanitize=True)
    g = torch.Generator().manual_seed(2)
    for _ in range(4):
        x = torch.randn(*shape, generator=g)
        got = torch.from_numpy(host_run(exe, x.numpy())).reshape(1, -1)
        assert_close(got, cm.reference(x))
    assert_close(cm(x), cm.reference(x))  # the firmware under QEMU agrees too


@needs_tools
@pytest.mark.slow
def test_sanitizer_catches_an_out_of_bounds_read(tmp_path):
    """The harness really runs under ASan: a kernel reading past its weights aborts with a report."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(32, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    cm = bc.compile(net, (torch.randn(1, 32),), target=bc.Target("cortex-m4", count_instructions=False))
    bundle = cm.export(tmp_path / "b")
    model_c = (bundle / "model.c").read_text()
    (bundle / "model.c").write_text(model_c.replace("return 0;", "return (int)in[BITC_INPUT_SIZE];"))
    exe = host_build(bundle, sanitize=True)
    with pytest.raises(HostBuildError, match="AddressSanitizer"):
        host_run(exe, torch.randn(1, 32).numpy())


@needs_tools
def test_sign_packing_shifts_are_defined_behaviour():
    """Packing the 32nd sign bit was ``(cond ? 1 : 0) << 31`` on a signed int (undefined in C;
    UBSan: "left shift of 1 by 31 places cannot be represented in type 'int'"): the packing
    kernel's C (the host's fallback of its asm) shifts a uint32_t."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)).eval()
    target = bc.Target("cortex-m4", count_instructions=False)
    cm = bc.compile(net, (torch.randn(1, 64),), target=target, scheme="binary:act=binary,first_last=quantize")
    kernels_c = (cm._runner.bundle / "kernels.c").read_text()
    assert "? 1 : 0) << 31" not in kernels_c and "b |= (uint32_t)(X[" in kernels_c
    exe = host_build(cm._runner.bundle, sanitize=True)
    x = torch.randn(1, 64)
    got = torch.from_numpy(host_run(exe, x.numpy())).reshape(1, -1)
    assert torch.equal(got, cm.reference(x))
