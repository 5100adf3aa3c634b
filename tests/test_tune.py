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


def _cnn() -> torch.nn.Module:
    torch.manual_seed(0)
    convs = [
        m
        for _ in range(2)
        for m in (torch.nn.Conv2d(64, 64, 3, padding=1), torch.nn.BatchNorm2d(64), torch.nn.Hardtanh())
    ]
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 64, 3, padding=1),
        torch.nn.BatchNorm2d(64),
        torch.nn.Hardtanh(),
        *convs,
        torch.nn.Flatten(),
        torch.nn.Linear(64 * 16 * 16, 10),
    ).eval()


def test_conv_templates_are_tuned_and_replayed(tmp_path: Path) -> None:
    """A binary CNN's convs (the int8 stem and the W1A1 convs, fused packed output included) are
    templates: tuned, applied by a later compile (in this process and in a fresh one, which has
    not registered the int8 dot products the stem's trace names), bit-exact at another batch."""
    import subprocess
    import sys

    model, x = _cnn(), torch.randn(1, 3, 16, 16)
    db = tmp_path / "db"
    untuned = bc.compile(model, (x,), scheme="binary:act=binary", db=tmp_path / "empty")
    status = untuned.report().extra["kernel tuning"]
    convs = sorted(name for name in status if "conv2d" in name)
    assert any("packed" in c for c in convs) and any("int8" in c for c in convs), convs
    if not all(status[c] == "no record" for c in convs):  # (the W1A1 templates need vpopcntq)
        pytest.skip(f"this CPU's conv kernels are not all templates: {status}")
    cm = bc.tune(model, (x,), scheme="binary:act=binary", trials=2, db=db)
    assert {c: cm.report().extra["kernel tuning"][c] for c in convs} == dict.fromkeys(convs, "tuned")
    assert cm.report().extra["tuned kernels"] == len(convs)
    again = bc.compile(model, (x,), scheme="binary:act=binary", db=db)
    assert again.report().extra["kernel tuning"] == cm.report().extra["kernel tuning"]
    xb = torch.randn(3, 3, 16, 16)
    assert torch.equal(again(xb), again.reference(xb))
    fresh = (
        "import torch, bitcompiler as bc; from tests.test_tune import _cnn\n"
        f"cm = bc.compile(_cnn(), (torch.randn(1, 3, 16, 16),), scheme='binary:act=binary', db={str(db)!r})\n"
        "print(cm.report().extra['tuned kernels'])"
    )
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-W", "error::UserWarning", "-c", fresh],
        cwd=root,
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] == str(len(convs))


def test_generated_template_stands_in_for_its_kernels() -> None:
    """kernels.template.generated: the workload is a stand-in naming the hand kernel (a changed
    generator is a new workload); a schedule's annotations pick the kernel ``finish`` builds,
    each distinct one built once; a default outside its candidates is refused."""
    from tvm import s_tir
    from tvm.script import tirx as T

    from bitcompiler.kernels.template import KERNEL_ATTR, Knob, generated

    calls = []

    def build(scale: int, offset: int = 0):
        calls.append((scale, offset))

        @T.prim_func(s_tir=True)
        def func(a: T.Buffer((8,), "int32"), b: T.Buffer((8,), "int32")):
            for i in range(8):
                b[i] = a[i] * scale + offset

        return func

    knobs = [Knob("scale", (2, 3, 5), 3)]
    template = generated("toy", knobs, build)
    other = generated("toy", knobs, lambda scale: build(scale, offset=1))
    name = str(template.func.body.block.annotations[KERNEL_ATTR])
    assert name.startswith("toy:") and name != str(other.func.body.block.annotations[KERNEL_ATTR])
    assert len(template.func.params) == 2 and "b[i]" not in template.func.script()
    calls.clear()
    for value in (5, 5, 2, 3):
        sch = s_tir.Schedule(template.func)
        template.apply(sch, lambda _n, _c, _d, v=value: v)
        assert f"a[i] * {value}" in template.finish(sch.mod["main"]).script()
    assert calls == [(5, 0), (2, 0)]  # 5 once; the default was built with the template
    with pytest.raises(ValueError, match="default 4 is not among the candidates"):
        generated("toy", [Knob("scale", (1, 2), 4)], build)
