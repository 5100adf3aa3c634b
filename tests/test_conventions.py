"""What users of torch and TVM expect: submodules as attributes, DataLoaders, documented report fields."""

import subprocess
import sys

import torch
from torch.utils.data import DataLoader, TensorDataset

import bitcompiler as bc


def test_public_submodules_are_attributes_after_import():
    code = "import bitcompiler as bc; print(bc.datasets.__name__, bc.payload.__name__, bc.train.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["bitcompiler.datasets", "bitcompiler.payload", "bitcompiler.train"]
    assert "datasets" in dir(bc)


def test_fit_takes_a_dataloader_as_well_as_a_dataset():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=g)
    y = (x[:, 0] > 0).long()
    data = TensorDataset(x, y)
    for train_data in (data, DataLoader(data, batch_size=16, shuffle=True)):
        net = bc.prepare(torch.nn.Sequential(torch.nn.Linear(8, 2)), "none")
        hist = bc.train.fit(
            net, train_data, epochs=2, progress=False, val_data=DataLoader(data, batch_size=32)
        )
        assert len(hist.val_accuracy) == 2
    try:
        bc.train.fit(net, [1, 2, 3][0], progress=False)  # type: ignore[arg-type]
    except TypeError as e:
        assert "DataLoader" in str(e)
    else:
        raise AssertionError("a non-dataset must be refused")


def test_report_exposes_cortex_m_figures_as_attributes():
    report = bc.Report(
        [],
        "cortex-m4",
        "binary",
        extra={"instructions": 1234, "flash_bytes": 10, "ram_bytes": 20, "arena_bytes": 8},
    )
    assert (report.instructions, report.flash_bytes, report.ram_bytes, report.arena_bytes) == (
        1234,
        10,
        20,
        8,
    )
    cpu = bc.Report([], "cpu", "binary")
    assert cpu.instructions is None and cpu.flash_bytes is None
