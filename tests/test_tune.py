"""bc.tune / compile(tune=...): records found by MetaSchedule over the kernels' own templates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import bitcompiler as bc
from tests.conftest import assert_close

SCHEME = "binary:act=binary,first_last=quantize"


def _linear() -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(256, 256)), torch.randn(1, 256)


def _records(db: Path) -> list:
    text = (db / "database_tuning_record.json").read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_tune_writes_a_record_that_later_compiles_apply(tmp_path: Path) -> None:
    model, x = _linear()
    db = tmp_path / "db"
    cm = bc.tune(model, (x,), scheme=SCHEME, trials=4, db=db)
    assert cm.report().extra["tuned kernels"] == 1
    assert cm.report().extra["tuning s"] > 0
    assert len(_records(db)) == 1  # only the winner of tuned-vs-hand is kept
    assert_close(cm(x), cm.reference(x))
    status = cm.report().extra["kernel tuning"]  # every kernel the call runs, by name
    tuned = [name for name, s in status.items() if s == "tuned"]
    assert len(tuned) == 1 and "dense" in tuned[0], status
    assert "untunable" in status.values() and set(status.values()) <= {"tuned", "no record", "untunable"}
    assert f"  {tuned[0]}: tuned" in str(cm.report()).splitlines()

    again = bc.compile(model, (x,), scheme=SCHEME, db=db)  # tune=False still reads the records
    assert again.report().extra["tuned kernels"] == 1
    assert again.report().extra["kernel tuning"] == status
    xb = torch.randn(8, 256)  # tuned at batch 1; the kernel keeps its dynamic batch
    assert_close(again(xb), again.reference(xb))

    untuned = bc.compile(model, (x,), scheme=SCHEME, db=tmp_path / "empty")
    assert untuned.report().extra["tuned kernels"] == 0
    assert untuned.report().extra["kernel tuning"] == {**status, tuned[0]: "no record"}
    assert not getattr(untuned._runner, "cache_hit", False)  # the tuned build is a different cache entry
    assert_close(untuned(xb), untuned.reference(xb))


def test_compile_tune_true_tunes_only_kernels_without_a_record(tmp_path: Path) -> None:
    model, x = _linear()
    db = tmp_path / "db"
    cm = bc.compile(model, (x,), scheme=SCHEME, tune=bc.TuneOptions(trials=2), db=db)
    assert cm.report().extra["tuned kernels"] == 1
    before = _records(db)
    cm = bc.compile(model, (x,), scheme=SCHEME, tune=True, db=db)
    assert _records(db) == before
    assert cm.report().extra["tuned kernels"] == 1
    assert_close(cm(x), cm.reference(x))


def test_corrupt_database_is_ignored_with_a_warning(tmp_path: Path) -> None:
    model, x = _linear()
    db = tmp_path / "db"
    db.mkdir()
    (db / "database_workload.json").write_text("{not json\n")
    (db / "database_tuning_record.json").write_text("garbage\n")
    with pytest.warns(UserWarning, match="unreadable tuning database"):
        cm = bc.compile(model, (x,), scheme=SCHEME, db=db)
    assert cm.report().extra["tuned kernels"] == 0
    assert_close(cm(x), cm.reference(x))
    with pytest.warns(UserWarning, match="unreadable tuning database"):
        cm = bc.tune(model, (x,), scheme=SCHEME, trials=1, db=db)
    assert (db / "database_tuning_record.json.corrupt").read_text() == "garbage\n"  # moved aside, not lost
    assert cm.report().extra["tuned kernels"] == 1
    assert_close(cm(x), cm.reference(x))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"trials": 0}, "trials must be a positive int"),
        ({"trials": -3}, "trials must be a positive int"),
        ({"trials": 2.5}, "trials must be a positive int"),
        ({"time_budget": 0}, "time_budget must be a positive"),
        ({"target": "tpu"}, "unknown target 'tpu'"),
        ({"target": "cortex-m4"}, "tuning supports target='cpu' only"),
    ],
)
def test_bad_arguments_are_clear_errors(kwargs: dict, message: str, tmp_path: Path) -> None:
    model, x = _linear()
    with pytest.raises(ValueError, match=message):
        bc.tune(model, (x,), scheme=SCHEME, db=tmp_path, **kwargs)
    assert not any(tmp_path.iterdir())  # rejected before any work


def test_sampled_template_replays_on_the_dynamic_kernel() -> None:
    """A record's trace (made on the batch-1 workload) schedules the symbolic-batch kernel."""
    import numpy as np
    import tvm
    from tvm import s_tir

    from bitcompiler.kernels import DenseSpec, dense_kernel
    from bitcompiler.kernels.template import apply_hand, sampled, scheduling_with
    from bitcompiler.tuning import workload

    found = []
    with scheduling_with(lambda t: found.append(t) or apply_hand(t)):
        dense_kernel(DenseSpec(256, 64, 1, "pm1", "binary", False, False))
    (template,) = found
    sch = s_tir.Schedule(workload(template.func, 1))
    template.apply(sch, sampled(sch))
    assert any(inst.kind.name == "SampleCategorical" for inst in sch.trace.insts)
    dyn = s_tir.Schedule(template.func)
    sch.trace.apply_to_schedule(dyn, remove_postproc=False)
    tuned = tvm.compile(dyn.mod, target="llvm")
    hand = tvm.compile(tvm.IRModule({"main": apply_hand(template)}), target="llvm")
    rng = np.random.default_rng(1)
    xp = rng.integers(-(2**31), 2**31, size=(3, 8), dtype="int32")
    p = rng.integers(-(2**31), 2**31, size=(1, 64, 8), dtype="int32")
    sc, of, bi = (rng.standard_normal(64).astype("float32") for _ in range(3))
    outs = []
    for lib in (tuned, hand):
        args = [tvm.runtime.tensor(a) for a in (xp, p, sc, of, bi, np.zeros((3, 64), "float32"))]
        lib(*args)
        outs.append(args[-1].numpy())
    np.testing.assert_array_equal(outs[0], outs[1])
