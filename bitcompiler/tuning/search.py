"""The MetaSchedule search behind :mod:`bitcompiler.tuning` (imports TVM)."""

from __future__ import annotations

import hashlib
import os
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import tvm
import tvm_ffi
from tvm import s_tir, tirx
from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms
from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder
from tvm.s_tir.meta_schedule.runner import PyRunner, PyRunnerFuture, RunnerResult

from bitcompiler import cache
from bitcompiler.kernels import dot_int8
from bitcompiler.kernels.template import TUNING_ATTR, Template, apply_hand, hand, sampled, scheduling_with
from bitcompiler.tuning import TuneOptions

CHUNK = 8  # schedules drawn per MetaSchedule round; the time budget and progress bar are checked between
FINALISTS = 3  # best drawn schedules measured again against the hand schedule


# --------------------------------------------------------------------------- the database
def open_database(db: str | os.PathLike | ms.Database | None, create: bool) -> tuple[ms.Database | None, str]:
    """The database for ``db`` (and where it is); None when there is none to read.

    An unreadable database is ignored with a warning; with ``create`` (tuning) its files are
    moved aside to ``*.corrupt`` and a fresh one is started.
    """
    if isinstance(db, ms.Database):
        return db, type(db).__name__
    base = cache.root()
    if db is None and base is None:  # BITC_CACHE=off: records live only as long as this call
        return (ms.database.MemoryDatabase() if create else None), "memory"
    path = Path(db) if db is not None else Path(str(base)) / "tuning"
    files = [path / "database_workload.json", path / "database_tuning_record.json"]
    if not create and not all(f.exists() for f in files):
        return None, str(path)
    # a record's trace names the tensor intrinsics its schedule used (the int8 dot products):
    # loading it needs them registered, in a process that has not built such a kernel yet too
    dot_int8.register()
    try:
        path.mkdir(parents=True, exist_ok=True)
        return ms.database.JSONDatabase(work_dir=str(path)), str(path)
    except Exception as e:  # noqa: BLE001 - a broken database must never break compile()
        warnings.warn(f"ignoring unreadable tuning database {path}: {str(e).strip()[-200:]}", stacklevel=3)
        if not create:
            return None, str(path)
        for f in files:
            if f.exists():
                f.replace(f.with_suffix(".json.corrupt"))
        return ms.database.JSONDatabase(work_dir=str(path)), str(path)


def workload(func: tirx.PrimFunc, batch: int) -> tvm.IRModule:
    """``func`` with its symbolic batch fixed to ``batch``, as MetaSchedule's workload module."""
    for buf in func.params:
        if any(not isinstance(d, tirx.IntImm) for d in buf.shape):
            shape = [d if isinstance(d, tirx.IntImm) else tirx.IntImm("int64", batch) for d in buf.shape]
            func = func.specialize({buf: tirx.decl_buffer(shape, buf.dtype, buf.name)})
            break
    return tvm.IRModule({"main": func.with_attr("global_symbol", "main")})


class Records:
    """The scheduler ``compile()`` lowers with: a kernel's best record for this target, else by hand."""

    def __init__(self, database: ms.Database | None, target: Any, batch: int) -> None:
        self.database = database
        self.target = target
        self.batch = batch
        self.applied: list[str] = []  # what each applied record scheduled (kind and time)

    def best(self, template: Template) -> ms.database.TuningRecord | None:
        db = self.database
        mod = workload(template.func, self.batch)
        if db is None or not db.has_workload(mod):
            return None
        key = str(self.target)
        return next((r for r in db.get_top_k(db.commit_workload(mod), 1000) if str(r.target) == key), None)

    def __call__(self, template: Template) -> tirx.PrimFunc:
        record = self.best(template)
        if record is None:
            return apply_hand(template)
        sch = s_tir.Schedule(template.func)
        record.trace.apply_to_schedule(sch, remove_postproc=False)
        func = template.finish(sch.mod["main"])
        self.applied.append(
            f"{template.kind}:{statistics.fmean(float(s) for s in record.run_secs) * 1e6:.1f}us"
        )
        return func.with_attr(TUNING_ATTR, "tuned")

    def fingerprint(self) -> str:
        """A digest of every record for this target: part of the compile cache key."""
        if self.database is None:
            return "untuned"
        h = hashlib.sha256(str(self.target).encode())
        for r in self.database.get_all_tuning_records():
            if str(r.target) == str(self.target):
                h.update(repr(r.as_json()).encode())
        return h.hexdigest()[:16]


def kernels_of(lower: Any) -> list[Template]:
    """The tunable kernels ``lower()`` builds (each workload once), scheduled by hand meanwhile."""
    found: list[Template] = []

    def collect(template: Template) -> tirx.PrimFunc:
        found.append(template)
        return apply_hand(template)

    with scheduling_with(collect):
        lower()
    unique: dict[tuple, Template] = {}
    for t in found:
        unique.setdefault((tvm_ffi.structural_hash(t.func), t.kind), t)
    return list(unique.values())


# --------------------------------------------------------------------------- tuning
def tune_kernels(templates: list[Template], records: Records, options: TuneOptions, where: str) -> float:
    """Tune ``templates`` into ``records.database``; returns the wall time in seconds."""
    from tqdm.auto import tqdm

    start = time.perf_counter()
    db = records.database
    assert db is not None
    todo = [t for t in templates if options.retune or records.best(t) is None]
    with tqdm(total=len(todo) * options.trials, desc="tuning", unit="trial", disable=not todo) as bar:
        for i, template in enumerate(todo):
            budget = None
            if options.time_budget is not None:
                left = options.time_budget - (time.perf_counter() - start)
                budget = max(left, 0.0) / (len(todo) - i)
            bar.set_postfix_str(f"{template.kind} kernel {i + 1}/{len(todo)}")
            _tune_one(template, records, options.trials, budget, bar, options.runner)
    return time.perf_counter() - start


def _tune_one(
    template: Template,
    records: Records,
    trials: int,
    budget: float | None,
    bar: Any,
    runner: str | None = None,
) -> None:
    start = time.perf_counter()
    mod = workload(template.func, records.batch)
    measure = (
        _Measure(mod, records.target, template.finish)
        if runner is None
        else _RemoteMeasure(mod, records.target, runner, template.finish)
    )
    scratch = ms.database.MemoryDatabase()
    space = ms.space_generator.ScheduleFn(
        lambda sch: template.apply(sch, sampled(sch)), sch_rules=[], postprocs=[], mutator_probs={}
    )
    done = 0
    while done < trials and (budget is None or time.perf_counter() - start < budget):
        n = min(CHUNK, trials - done)
        task = _task(mod, records.target, space, template.kind, rand_state=done + 1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ms.tune_tasks(
                tasks=[task], task_weights=[1.0], work_dir="", max_trials_global=n,
                num_trials_per_iter=n, builder=measure.builder, runner=measure.runner, database=scratch,
                cost_model="random", measure_callbacks=[ms.measure_callback.AddToDatabase()],
                task_scheduler="round-robin",
            )  # fmt: skip
        done += n
        bar.update(n)
    bar.update(trials - done)
    hand_sch = s_tir.Schedule(mod)
    template.apply(hand_sch, hand)
    finalists = [hand_sch.trace] + [
        r.trace for r in scratch.get_top_k(scratch.commit_workload(mod), FINALISTS)
    ]
    trace, secs = measure.fastest(finalists)
    db = records.database
    assert db is not None
    args = ms.arg_info.ArgInfo.from_entry_func(mod, remove_preproc=True)
    db.commit_tuning_record(
        ms.database.TuningRecord(trace, db.commit_workload(mod), secs, records.target, args)
    )


def _task(mod: tvm.IRModule, target: Any, space: Any, name: str, rand_state: int) -> ms.TuneContext:
    """``ms.TuneContext(...)`` without its ``import tvm.s_tir.tensor_intrin``: no tensor intrinsic is
    used here, and that import parses hundreds of TVMScript functions, each walking the whole call
    stack (30 s in a fresh process, minutes under pytest with torch loaded)."""
    from tvm.s_tir.meta_schedule import _ffi_api
    from tvm.s_tir.meta_schedule.logging import get_logger, get_logging_func

    task = ms.TuneContext.__new__(ms.TuneContext)
    strategy = ms.search_strategy.ReplayFunc()
    logging_func = get_logging_func(get_logger(__name__))
    task.__init_handle_by_constructor__(
        _ffi_api.TuneContext, mod, target, space, strategy, name, 1, rand_state, logging_func
    )
    _ffi_api.TuneContextInitialize(task)
    return task


class _Measure:
    """In-process MetaSchedule builder and runner for one workload (random inputs at its batch)."""

    def __init__(self, mod: tvm.IRModule, target: Any, finish: Callable[[Any], Any] = lambda f: f) -> None:
        self.mod = mod
        self.target = target
        self.finish = finish  # a scheduled workload -> the kernel to build (Template.finish)
        self.args = _random_args(mod["main"])
        self.built: dict[str, Any] = {}  # artifact key -> module, or a cached RunnerResult
        self.seen: dict[int, str] = {}  # structural hash of a scheduled module -> artifact key
        self.results: dict[str, RunnerResult] = {}
        self.builder = _InProcessBuilder(self)
        self.runner = _InProcessRunner(self)

    def kernel(self, mod: tvm.IRModule) -> tvm.IRModule:
        """The module to build for the scheduled workload ``mod``."""
        return tvm.IRModule({"main": self.finish(mod["main"])})

    def build(self, mod: tvm.IRModule, target: Any) -> BuilderResult:
        mod = self.kernel(mod)  # (generated templates: schedules naming one kernel are built once)
        h = tvm_ffi.structural_hash(mod)
        if h in self.seen:
            return BuilderResult(self.seen[h], None)
        try:
            lib = tvm.compile(mod, target=target)
        except Exception as e:  # noqa: BLE001 - a failed candidate is a record MetaSchedule skips
            return BuilderResult(None, f"{type(e).__name__}: {e}")
        key = f"bitc-mem:{len(self.built)}"
        self.built[key], self.seen[h] = lib, key
        return BuilderResult(key, None)

    def time(self, lib: Any, repeat: int = 3) -> list[float]:
        f = lib.mod.time_evaluator("main", tvm.cpu(), number=1, repeat=repeat, min_repeat_ms=20)
        return [float(s) for s in f(*self.args).results]

    def run(self, key: str) -> RunnerResult:
        if key not in self.results:
            try:
                self.results[key] = RunnerResult(self.time(self.built[key]), None)
            except Exception as e:  # noqa: BLE001
                self.results[key] = RunnerResult(None, f"{type(e).__name__}: {e}")
        return self.results[key]

    def fastest(self, traces: list[Any], rounds: int = 3) -> tuple[Any, list[float]]:
        """The fastest of ``traces`` (the first is the hand schedule), measured in turns; ties go to it."""
        libs = []
        for trace in traces:
            sch = s_tir.Schedule(self.mod)
            trace.apply_to_schedule(sch, remove_postproc=False)
            libs.append(tvm.compile(self.kernel(sch.mod), target=self.target))
        times: list[list[float]] = [[] for _ in libs]
        for _ in range(rounds):
            for lib, t in zip(libs, times):
                t.extend(self.time(lib))
        medians = [statistics.median(t) for t in times]
        best = min(range(len(libs)), key=lambda i: (medians[i], i))
        return traces[best], times[best]


def _random_args(func: tirx.PrimFunc) -> list[Any]:
    rng = np.random.default_rng(0)
    out = []
    for buf in func.params:
        shape = [int(d) for d in buf.shape]
        dtype = str(buf.dtype)
        if dtype.startswith(("int", "uint")):
            info = np.iinfo(dtype)
            a = rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)
        else:
            a = rng.standard_normal(shape).astype(dtype)
        out.append(tvm.runtime.tensor(a, tvm.cpu()))
    return out


@derived_object
class _InProcessBuilder(PyBuilder):
    def __init__(self, measure: _Measure) -> None:
        self.measure = measure

    def build(self, build_inputs: list) -> list:
        return [self.measure.build(b.mod, b.target) for b in build_inputs]


@derived_object
class _Done(PyRunnerFuture):
    def __init__(self, result: RunnerResult) -> None:
        self._result = result

    def done(self) -> bool:
        return True

    def result(self) -> RunnerResult:
        return self._result


@derived_object
class _InProcessRunner(PyRunner):
    def __init__(self, measure: _Measure) -> None:
        self.measure = measure

    def run(self, runner_inputs: list) -> list:
        return [_Done(self.measure.run(r.artifact_path)) for r in runner_inputs]


class _RemoteMeasure(_Measure):
    """Candidates exported to files and measured on a server of a TVM RPC tracker: MetaSchedule's
    ``RPCRunner`` for the search, one RPC session for the finalists (:mod:`bitcompiler.rpc`)."""

    def __init__(self, mod: tvm.IRModule, target: Any, address: str, finish: Callable[[Any], Any]) -> None:
        import tempfile

        from bitcompiler import rpc

        super().__init__(mod, target, finish)
        self.address = rpc.parse(address)
        self.dir = tempfile.TemporaryDirectory(prefix="bitc-tune-rpc-")
        evaluator = ms.runner.EvaluatorConfig(
            number=1, repeat=3, min_repeat_ms=20, enable_cpu_cache_flush=False
        )
        self.runner = ms.runner.RPCRunner(rpc.rpc_config(self.address), evaluator)
        self._session: Any = None
        self._remote: dict[int, Any] = {}  # id(lib) -> its time evaluator on the server

    def build(self, mod: tvm.IRModule, target: Any) -> BuilderResult:
        result = super().build(mod, target)
        if result.artifact_path is None:
            return result
        path = Path(self.dir.name) / f"{result.artifact_path.replace(':', '_')}.so"
        if not path.exists():
            self.built[result.artifact_path].export_library(str(path))
        return BuilderResult(str(path), None)

    def time(self, lib: Any, repeat: int = 3) -> list[float]:
        from bitcompiler import rpc

        if self._session is None:
            self._session = rpc.session(self.address)
        dev = self._session.cpu()
        if id(lib) not in self._remote:
            name = f"finalist{len(self._remote)}.so"
            lib.export_library(str(Path(self.dir.name) / name))
            self._session.upload(str(Path(self.dir.name) / name))
            remote = self._session.load_module(name)
            self._remote[id(lib)] = remote.time_evaluator(
                "main", dev, number=1, repeat=repeat, min_repeat_ms=20
            )
        args = [tvm.runtime.tensor(a.numpy(), dev) for a in self.args]
        return [float(s) for s in self._remote[id(lib)](*args).results]
