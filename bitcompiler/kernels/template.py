"""Schedule templates: a kernel's unscheduled TIR plus a schedule whose choices can be sampled.

A kernel builder that can be tuned returns ``scheduled(Template(...))`` instead of scheduling
its function itself. ``template.apply(sch, choose)`` is the kernel's hand schedule; every
choice it makes (rows per register block, vector width, unroll) goes through
``choose(name, candidates, default)``:

* :func:`hand` returns the default: the hand schedule, used when there is no tuning record;
* :func:`sampled` draws the choice with ``sch.sample_categorical``, so MetaSchedule records it
  in the trace (see :mod:`bitcompiler.tuning`).

Which of the two (or a tuning record) schedules a kernel is decided by whoever built it:
:func:`scheduling_with` installs a scheduler for the kernels built inside the ``with``.

A kernel written whole in TVMScript (the conv kernels: loops, vectors and parallel regions by
hand) has no schedule to vary; its choices are its generator's arguments. :func:`generated` makes
such a template: the schedule only records each choice as an annotation of the function's root
block (``bitc.knob.<name>``), and :meth:`Template.finish` generates the kernel those annotations
name. MetaSchedule samples, stores and replays the choices as for any other template.

>>> from bitcompiler.kernels import DenseSpec, dense_kernel
>>> with scheduling_with(lambda t: apply_hand(t)):
...     f = dense_kernel(DenseSpec(64, 8, 1, "pm1", "binary", False, False))
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass, field

from tvm import s_tir, tirx

Choose = Callable[[str, Sequence[int], int], int]
"""``choose(name, candidates, default) -> value`` for one schedule choice."""


@dataclass(frozen=True)
class Template:
    """``func`` unscheduled; ``apply(sch, choose)`` schedules ``sch`` (a schedule of ``func``) in place."""

    kind: str  # which kernel builder made it, for messages ("dense")
    func: tirx.PrimFunc
    apply: Callable[[s_tir.Schedule, Choose], None]
    # the kernel a schedule of ``func`` stands for (generated templates); None: the schedule itself
    realize: Callable[[tirx.PrimFunc], tirx.PrimFunc] | None = field(default=None, compare=False)

    def finish(self, scheduled: tirx.PrimFunc) -> tirx.PrimFunc:
        """The kernel to build for ``scheduled`` (``func`` after ``apply``)."""
        return scheduled if self.realize is None else self.realize(scheduled)


def hand(_name: str, candidates: Sequence[int], default: int) -> int:
    """The hand schedule's choice."""
    if default not in candidates:
        raise ValueError(f"default {default} is not among the candidates {list(candidates)}")
    return default


def sampled(sch: s_tir.Schedule) -> Choose:
    """Choices drawn (uniformly) by ``sch.sample_categorical``: recorded in ``sch.trace``."""

    def choose(_name: str, candidates: Sequence[int], default: int) -> int:
        hand(_name, candidates, default)
        values = list(candidates)
        rv = sch.sample_categorical(values, [1.0 / len(values)] * len(values))
        return int(sch.get(rv))

    return choose


def apply_hand(template: Template) -> tirx.PrimFunc:
    """``template.func`` with the hand schedule."""
    sch = s_tir.Schedule(template.func)
    template.apply(sch, hand)
    return template.finish(sch.mod["main"])


@dataclass(frozen=True)
class Knob:
    """One choice of a :func:`generated` template: a generator argument and its candidate values."""

    name: str
    candidates: tuple[int, ...]
    default: int


KNOB_PREFIX = "bitc.knob."
KERNEL_ATTR = "bitc.kernel"  # a generated template's stand-in: which kernel it stands for


def generated(
    kind: str,
    knobs: Sequence[Knob],
    build: Callable[..., tirx.PrimFunc],
    key: Callable[..., Hashable] | None = None,
) -> Template:
    """A template whose choices are ``build``'s keyword arguments (one per knob, int values).

    ``func`` stands for the kernel: ``build``'s parameters with the defaults, and for a body a
    root block naming the hand kernel (``kind`` and the structural hash of ``build`` with the
    defaults: a changed generator is a new workload, so its old records no longer apply). The
    tuning database keys records by it, and MetaSchedule's task analysis (which cannot read the
    explicit vector code) sees an empty body. A schedule annotates the root block with the chosen
    values; :meth:`Template.finish` returns ``build(**values)``, each distinct kernel made once:
    ``key(**values)`` (default: the values) names the kernel, so choices that give the same kernel
    (a knob that does not apply to the others' values) share one build.
    """
    import tvm_ffi

    for k in knobs:
        hand(k.name, k.candidates, k.default)  # the default is a candidate
    defaults = {k.name: k.default for k in knobs}
    names = tuple(defaults)

    def kernel_key(values: tuple[int, ...]) -> Hashable:
        return values if key is None else key(**dict(zip(names, values)))

    base = build(**defaults)
    made = {kernel_key(tuple(defaults.values())): base}
    name = f"{kind}:{tvm_ffi.structural_hash(base) & (2**64 - 1):016x}"
    root = s_tir.SBlock([], [], [], "root", tirx.Evaluate(0), annotations={KERNEL_ATTR: name})
    func = base.with_body(s_tir.SBlockRealize([], True, root))

    def apply(sch: s_tir.Schedule, choose: Choose) -> None:
        root = sch.get_sblock("root")
        for k in knobs:
            sch.annotate(root, KNOB_PREFIX + k.name, choose(k.name, k.candidates, k.default))

    def realize(scheduled: tirx.PrimFunc) -> tirx.PrimFunc:
        marks = scheduled.body.block.annotations
        values = tuple(int(marks[KNOB_PREFIX + k.name]) for k in knobs)
        kernel = kernel_key(values)
        if kernel not in made:
            made[kernel] = build(**dict(zip(names, values)))
        out = made[kernel]
        symbol = (scheduled.attrs or {}).get("global_symbol")
        return out if symbol is None else out.with_attr("global_symbol", symbol)

    return Template(kind, func, apply, realize)


Scheduler = Callable[[Template], tirx.PrimFunc]
_ACTIVE: contextvars.ContextVar[Scheduler | None] = contextvars.ContextVar("bitc_scheduler", default=None)


@contextlib.contextmanager
def scheduling_with(scheduler: Scheduler) -> Iterator[None]:
    """Kernels built inside the ``with`` are scheduled by ``scheduler`` (e.g. from tuning records)."""
    token = _ACTIVE.set(scheduler)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


TUNING_ATTR = "bitc.tuning"
"""A kernel's PrimFunc attribute: ``"tuned"`` where a tuning record scheduled it, ``"no record"``
where a template was scheduled by hand; kernels without it are not tunable."""


def scheduled(template: Template) -> tirx.PrimFunc:
    """``template`` scheduled by the active scheduler, or by hand when none is active; marked
    (:data:`TUNING_ATTR`) ``"no record"`` unless the scheduler marked it ``"tuned"``."""
    scheduler = _ACTIVE.get()
    func = scheduler(template) if scheduler is not None else apply_hand(template)
    if TUNING_ATTR not in (func.attrs or {}):
        func = func.with_attr(TUNING_ATTR, "no record")
    return func


def as_kernel(made: tirx.PrimFunc | Template) -> tirx.PrimFunc:
    """A kernel builder's result as a kernel: a template :func:`scheduled`, a function as it is."""
    return scheduled(made) if isinstance(made, Template) else made


def tuning_status(func: tirx.PrimFunc) -> str:
    """``"tuned"``, ``"no record"`` or ``"untunable"`` (not a template) for a built kernel."""
    return str((func.attrs or {}).get(TUNING_ATTR, "untunable"))
