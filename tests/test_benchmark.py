"""``bitcompiler.benchmark`` / ``bitc bench MODEL``: rows per target x scheme, peers, training,
files; a target that cannot run here is a row with its reason."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import bitcompiler as bc
from bitcompiler.benchmarking import data as bdata
from bitcompiler.benchmarking import measure, output
from bitcompiler.benchmarking.rows import OK
from bitcompiler.cli import _names, main
from tests.conftest import write_factory_module


def _mlp() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(),
        nn.Linear(32, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10),
    ).eval()  # fmt: skip


def test_rows_per_target_and_scheme_with_peers():
    rows = bc.benchmark(_mlp(), (1, 1, 8, 8), ["cpu"], ["none", "binary:act=binary"], progress=False)
    by = {(r.target, r.scheme): r for r in rows}
    for scheme in ("none", "binary:act=binary"):
        r = by["cpu", scheme]
        assert r.status == OK and r.exact is True and r.max_rel_error <= 1e-5
        assert 0 < r.latency_ms <= r.latency_p90_ms and r.compile_s > 0
        assert r.instructions is None and r.accuracy is None
    assert by["cpu", "none"].bits_per_weight == 32
    assert by["cpu", "binary:act=binary"].bits_per_weight < 32
    peers = [r for r in rows if r.kind == "peer"]
    assert [p.scheme for p in peers] == ["torch fp32", "onnxruntime fp32", "onnxruntime int8"]
    assert all(p.target == "cpu" and p.latency_ms > 0 for p in peers if p.status == OK)


def test_a_target_that_cannot_build_is_a_row_with_the_reason():
    # float Linear layers have no Cortex-M lowering: the error comes before any toolchain runs
    (row,) = bc.benchmark(_mlp(), (1, 64), ["cortex-m4"], ["none"], peers=False, progress=False)
    assert row.status == "failed" and "aten.linear" in row.reason and row.latency_ms is None


def test_compare_is_the_projects_rule():
    ref = torch.tensor([[1.0, -2.0, 3.0]])
    assert measure.compare(ref + 1e-6, ref)[0]
    assert not measure.compare(ref + 1e-3, ref)[0]
    assert not measure.compare(ref[:, :2], ref)[0]
    assert not measure.compare(torch.tensor([1, 2]), torch.tensor([1, 3]))[0]


def test_training_accuracy_and_files(tmp_path):
    rows = bc.benchmark(
        _mlp(), targets=["cpu"], schemes=["none", "binary"], data="digits", epochs=1,
        peers=False, out=tmp_path, progress=False,
    )  # fmt: skip
    floats = {r.float_accuracy for r in rows}
    assert len(floats) == 1 and 0.1 < floats.pop() <= 1
    for r in rows:
        assert r.accuracy_on == "compiled" and 0 <= r.accuracy <= 1
    # the compiled accuracy is the one of the model's own outputs (the none row: the float model)
    none = next(r for r in rows if r.scheme == "none")
    assert abs(none.accuracy - none.float_accuracy) < 0.01
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [r["scheme"] for r in saved["rows"]] == ["none", "binary"] and saved["data"] == "digits"
    with open(tmp_path / "results.csv") as f:
        assert "accuracy" in next(csv.reader(f))
    for png in ("accuracy_vs_bits.png", "latency.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"


def test_schemes_train_in_parallel_processes_as_they_would_here():
    """Two worker processes of one thread each give the very weights one process of one thread
    gives (same seed, same arithmetic), and each is a trained copy, not the model itself."""
    torch.manual_seed(0)
    train = TensorDataset(torch.randn(256, 1, 8, 8), torch.randint(0, 10, (256,)))
    schemes = ["none", "binary", "uniform:bits=2"]
    model = _mlp()
    untrained = {k: v.clone() for k, v in model.state_dict().items()}
    done: list[str] = []
    parallel = bdata.train_all(model, schemes, train, 1, workers=2, done=done.append)
    assert sorted(done) == sorted(schemes) and list(parallel) == schemes
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        serial = bdata.train_all(model, schemes, train, 1, workers=1)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(v, untrained[k]) for k, v in model.state_dict().items())  # copies trained
    for s in schemes:
        got, want = parallel[s].state_dict(), serial[s].state_dict()
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in got), s
        assert not torch.equal(got["1.weight"], untrained["1.weight"])  # trained


class _WithLambda(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.act = nn.Linear(64, 10), lambda t: t.clamp(-1, 1)  # cannot be pickled

    def forward(self, x):
        return self.fc(self.act(x.flatten(1)))


def test_a_model_that_cannot_be_pickled_trains_in_this_process():
    train = TensorDataset(torch.randn(64, 1, 8, 8), torch.randint(0, 10, (64,)))
    nets = bdata.train_all(_WithLambda(), ["none", "binary"], train, 1, workers=2)
    assert set(nets) == {"none", "binary"}


def test_targets_share_the_accuracy_of_one_reference_program():
    net, x = _mlp(), (torch.randn(1, 64),)
    a = bc.compile(net, x, scheme="binary").graph
    assert bdata.program_key(a) == bdata.program_key(
        bc.compile(net, x, target="opencl", scheme="binary").graph
    )
    with torch.no_grad():
        net[1].weight[0, 0] += 1.0
    assert bdata.program_key(a) != bdata.program_key(bc.compile(net, x, scheme="binary").graph)
    assert bdata.program_key(a) != bdata.program_key(bc.compile(net, x, scheme="uniform:bits=2").graph)


def test_without_data_accuracy_is_absent_not_zero(tmp_path):
    bc.benchmark(_mlp(), (1, 64), schemes=["binary"], peers=False, out=tmp_path, progress=False)
    row = json.loads((tmp_path / "results.json").read_text())["rows"][0]
    assert "accuracy" not in row and "float_accuracy" not in row
    assert not (tmp_path / "accuracy_vs_bits.png").exists()


def test_data_folder(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 64), ("test", 32)):
        np.savez(tmp_path / f"{split}.npz", x=rng.standard_normal((n, 1, 8, 8)), y=rng.integers(0, 10, n))
    rows = bc.benchmark(_mlp(), schemes=["binary"], data=tmp_path, peers=False, progress=False)
    assert rows[0].accuracy is not None and rows[0].exact
    (tmp_path / "test.npz").unlink()
    with pytest.raises(bc.InputError, match="test.npz is missing"):
        bc.benchmark(_mlp(), schemes=["binary"], data=tmp_path, progress=False)
    with pytest.raises(bc.InputError, match="neither a dataset name"):
        bc.benchmark(_mlp(), schemes=["binary"], data=tmp_path / "nope", progress=False)


def test_bad_inputs_are_clear_errors(monkeypatch):
    with pytest.raises(bc.TargetError, match="unknown target 'tpu'"):
        bc.benchmark(_mlp(), (1, 64), targets=["tpu"])
    with pytest.raises(bc.InputError, match="input shape"):
        bc.benchmark(_mlp())
    seen = []
    monkeypatch.setattr(
        "bitcompiler.onnx.from_onnx", lambda path, shapes: seen.append((path, shapes)) or _mlp()
    )
    assert bc.benchmark("net.onnx", (1, 64), schemes=["none"], peers=False, progress=False)[0].exact
    assert seen == [("net.onnx", [(1, 64)])]


def test_table_shows_reasons():
    rows = bc.benchmark(_mlp(), (1, 64), ["cpu"], ["binary"], peers=False, progress=False)
    rows[0].status, rows[0].reason = "failed", "ToolchainMissing: gcc is not on PATH"
    from rich.console import Console

    console = Console(width=200, record=True)
    console.print(output.table(rows))
    text = console.export_text()
    assert "gcc is not on PATH" in text and "accuracy" not in text


def test_cli_bench(tmp_path, monkeypatch, capsys):
    write_factory_module(tmp_path, monkeypatch, "benchnet")
    args = ["bench", "benchnet:make", "--input-shape", "1,12", "--schemes", "none,uniform:bits=2,act=8"]
    assert main([*args, "--no-peers", "--out", str(tmp_path / "o")]) == 0
    text = capsys.readouterr().out
    assert "uniform:bits=2,act=8" in text and "results.json" in text
    assert len(json.loads((tmp_path / "o" / "results.json").read_text())["rows"]) == 2
    with pytest.raises(SystemExit, match="cannot reach the TVM RPC tracker at 127.0.0.1:9"):
        main([*args, "--rpc", "127.0.0.1:9/farm"])


def test_cli_suite_and_names(monkeypatch):
    ran = []
    monkeypatch.setattr("runpy.run_module", lambda name, run_name: ran.append(name))
    assert main(["bench", "--suite"]) == 0 and ran == ["bench"]
    with pytest.raises(SystemExit, match="give a MODEL"):
        main(["bench"])
    assert _names("none,binary:act=binary,uniform:bits=2,act=8,tiled:p=4") == [
        "none", "binary:act=binary", "uniform:bits=2,act=8", "tiled:p=4",
    ]  # fmt: skip
