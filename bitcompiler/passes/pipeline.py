"""Passes and the pipeline that runs them.

A pass is a named, frozen object: ``run(gm, ctx) -> gm`` plus the facts it
``requires`` and ``ensures``. The pipeline is a flat list; its order is checked
from those facts (a networkx graph) before anything runs, and instruments
(verify, dump, timing) wrap every pass::

    >>> import bitcompiler as bc
    >>> pipe = bc.Pipeline.default("cpu").without("fold_scales")
    >>> "fold_scales" in pipe.names()
    False
"""

from __future__ import annotations

import inspect
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import networkx as nx
import torch
from torch import fx

from bitcompiler.errors import PassError, PipelineError
from bitcompiler.quant.schemes import Scheme
from bitcompiler.target import Target

INITIAL_FACTS = frozenset({"traced"})

# the built-in passes in their default order; bitcompiler.passes (which imports them all, and is
# imported before this module is) sets it with set_default_passes
_DEFAULT_PASSES: list[Pass] = []


def set_default_passes(passes: Sequence[Pass]) -> None:
    """Make ``passes`` what :meth:`Pipeline.default` runs."""
    _DEFAULT_PASSES[:] = passes


@dataclass(frozen=True)
class PassContext:
    """What passes may read besides the graph: the scheme, strictness, target and example inputs."""

    scheme: Scheme = field(default_factory=lambda: Scheme("binary"))
    strict: bool = False
    target: Target = field(default_factory=Target)
    example_inputs: tuple = ()
    notes: list = field(default_factory=list)  # passes append (layer, message) for the report

    def __post_init__(self) -> None:
        # a target name ("cortex-m4") is accepted and parsed: passes always see a Target
        object.__setattr__(self, "target", Target.parse(self.target))


@dataclass(frozen=True)
class Pass:
    """A named graph rewrite ``fn(gm, ctx) -> gm`` (``fn(gm)`` is accepted too)."""

    name: str
    fn: Callable[..., fx.GraphModule]
    requires: frozenset[str] = frozenset()
    ensures: frozenset[str] = frozenset()

    def run(self, gm: fx.GraphModule, ctx: PassContext | None = None) -> fx.GraphModule:
        ctx = ctx or PassContext()
        takes_ctx = len(inspect.signature(self.fn).parameters) >= 2
        out = self.fn(gm, ctx) if takes_ctx else self.fn(gm)
        return gm if out is None else out

    def __repr__(self) -> str:
        return f"Pass({self.name!r})"


def graph_pass(
    name: str | None = None, requires: Iterable[str] = (), ensures: Iterable[str] = ()
) -> Callable[[Callable[..., fx.GraphModule]], Pass]:
    """Decorator turning ``fn(gm[, ctx]) -> gm`` into a :class:`Pass`::

    @graph_pass(requires={"packed"})
    def count_nodes(gm):
        print(len(gm.graph.nodes))
        return gm
    """

    def wrap(fn: Callable[..., fx.GraphModule]) -> Pass:
        return Pass(name or fn.__name__, fn, frozenset(requires), frozenset(ensures))

    return wrap


FactCheck = Callable[..., "str | None"]
_FACT_CHECKS: dict[str, FactCheck] = {}


def fact_check(fact: str) -> Callable[[FactCheck], FactCheck]:
    """Register how ``fact`` is checked on a graph: ``check(gm[, ctx])`` returns what breaks the
    fact, or None. Under ``BITC_DEBUG`` the pipeline checks every fact a pass ensures after that pass runs,
    built-in passes and user passes alike::

        @fact_check("no_relu")
        def _no_relu(gm):
            bad = [n.name for n in gm.graph.nodes if n.target is torch.relu]
            return f"relu left at {bad}" if bad else None
    """

    def wrap(fn: FactCheck) -> FactCheck:
        _FACT_CHECKS[fact] = fn
        return fn

    return wrap


def checked_facts() -> frozenset[str]:
    """The facts that have a registered check."""
    return frozenset(_FACT_CHECKS)


def check_facts(gm: fx.GraphModule, p: Pass, ctx: PassContext | None = None, dump: str | None = None) -> None:
    """Raise :class:`PassError` when ``gm`` breaks a fact ``p`` ensures (one with a check)."""
    ctx = ctx or PassContext()
    for fact in sorted(p.ensures):
        check = _FACT_CHECKS.get(fact)
        if check is None:
            continue
        broken = check(gm, ctx) if len(inspect.signature(check).parameters) >= 2 else check(gm)
        if broken:
            raise PassError(p.name, f"ensures {fact!r}, but {broken}", dump=dump)


def check_order(passes: Sequence[Pass], initial: frozenset[str] = INITIAL_FACTS) -> None:
    """Raise PipelineError unless every pass's requirements are ensured by an earlier pass.

    The error suggests a valid order: a topological sort (networkx) of the
    graph ensurer -> requirer, keeping the given order where it can.
    """
    names = [p.name for p in passes]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise PipelineError(f"pass names must be unique; repeated: {dup}")
    facts = set(initial)
    for j, p in enumerate(passes):
        missing = p.requires - facts
        if not missing:
            facts |= p.ensures
            continue
        later = [q.name for q in passes[j + 1 :] if q.ensures & missing]
        if not later:
            raise PipelineError(f"pass {p.name!r} requires {sorted(missing)}, which no earlier pass ensures")
        raise PipelineError(
            f"pass {p.name!r} requires {sorted(missing)} but runs before {later}, which ensure it; "
            f"a valid order: {suggest_order(passes, initial)}"
        )


def suggest_order(passes: Sequence[Pass], initial: frozenset[str] = INITIAL_FACTS) -> list[str]:
    g = nx.DiGraph()
    g.add_nodes_from(range(len(passes)))
    for j, p in enumerate(passes):
        for i, q in enumerate(passes):
            if i != j and (p.requires - initial) & q.ensures:
                g.add_edge(i, j)
    if not nx.is_directed_acyclic_graph(g):
        cycle = [passes[i].name for i, _ in nx.find_cycle(g)]
        return [f"none: passes {cycle} require each other"]
    return [passes[i].name for i in nx.lexicographical_topological_sort(g)]


class Pipeline:
    """A flat, ordered list of passes with instruments around each."""

    def __init__(self, passes: Sequence[Pass]) -> None:
        self.passes: tuple[Pass, ...] = tuple(passes)
        check_order(self.passes)

    @classmethod
    def default(cls, target: str | object = "cpu") -> Pipeline:
        """The default pipeline for ``target`` (the same passes for every target today; the list
        is :data:`bitcompiler.passes.DEFAULT_PASSES`)."""
        return cls(_DEFAULT_PASSES)

    def names(self) -> list[str]:
        return [p.name for p in self.passes]

    def _index(self, name: str) -> int:
        try:
            return self.names().index(name)
        except ValueError:
            raise KeyError(f"no pass named {name!r}; passes: {', '.join(self.names())}") from None

    def without(self, *names: str) -> Pipeline:
        for n in names:
            self._index(n)
        return Pipeline([p for p in self.passes if p.name not in names])

    def insert_after(self, name: str, p: Pass) -> Pipeline:
        i = self._index(name) + 1
        return Pipeline([*self.passes[:i], p, *self.passes[i:]])

    def insert_before(self, name: str, p: Pass) -> Pipeline:
        i = self._index(name)
        return Pipeline([*self.passes[:i], p, *self.passes[i:]])

    def __iter__(self):
        return iter(self.passes)

    def __len__(self) -> int:
        return len(self.passes)

    def __repr__(self) -> str:
        return "Pipeline([" + ", ".join(self.names()) + "])"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
        """Run every pass with the instruments: verify, dump (BITC_DUMP), timing (BITC_TIMING)."""
        dump_dir = os.environ.get("BITC_DUMP")
        verify = os.environ.get("BITC_DEBUG", "") not in ("", "0")
        timing = os.environ.get("BITC_TIMING", "") not in ("", "0")
        if dump_dir:
            Path(dump_dir).mkdir(parents=True, exist_ok=True)
            _dump(gm, Path(dump_dir) / "000_captured.txt")
        for i, p in enumerate(self.passes, start=1):
            dump = str(Path(dump_dir) / f"{i:03d}_{p.name}.txt") if dump_dir else None
            t0 = time.perf_counter()
            try:
                gm = p.run(gm, ctx)
            except PassError:
                raise
            except Exception as e:
                if dump:
                    _dump(gm, Path(dump))
                raise PassError(
                    p.name, f"{type(e).__name__}: {e}", node=getattr(e, "node", None), dump=dump
                ) from e
            if dump:
                _dump(gm, Path(dump))
            if verify:
                verify_graph(gm, p.name, ctx.example_inputs, dump)
                check_facts(gm, p, ctx, dump)
            if timing:
                print(f"[bitc] {p.name:<20} {1e3 * (time.perf_counter() - t0):8.1f} ms")
        return gm


def _dump(gm: fx.GraphModule, path: Path) -> None:
    path.write_text(f"{gm.graph}\n\n# modules\n{gm}\n")


def verify_graph(
    gm: fx.GraphModule, pass_name: str, example_inputs: tuple = (), dump: str | None = None
) -> None:
    """Graph lint + the graph still runs on the example inputs with finite outputs."""
    try:
        gm.graph.lint()
        gm.recompile()
    except Exception as e:
        raise PassError(pass_name, f"invalid graph: {e}", dump=dump) from e
    if not example_inputs:
        return
    try:
        with torch.no_grad():
            out = gm(*example_inputs)
    except Exception as e:
        raise PassError(pass_name, f"graph no longer runs: {type(e).__name__}: {e}", dump=dump) from e
    for t in out if isinstance(out, (tuple, list)) else (out,):
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not torch.isfinite(t).all():
            raise PassError(pass_name, "graph produces non-finite values on the example inputs", dump=dump)
