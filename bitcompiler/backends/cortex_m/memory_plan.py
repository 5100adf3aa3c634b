"""Static memory planning: every activation gets a fixed offset in one arena.

A tensor lives from the step that writes it to the last step that reads it (both inclusive, so a
kernel's output never shares bytes with its own inputs). Tensors whose lifetimes overlap are the
edges of an interval graph (networkx); offsets are assigned greedily, largest tensor first, at the
lowest offset that collides with no already-placed neighbour (the classic first-fit heuristic for
interval-graph colouring with weights, the way TFLite Micro's greedy planner does it).

>>> plan = plan_arena([Buffer("a", 64, 0, 1), Buffer("b", 64, 1, 2), Buffer("c", 64, 2, 3)])
>>> plan.offsets["a"] == plan.offsets["c"], plan.arena_bytes, plan.naive_bytes
(True, 128, 192)
>>> plan.peak_bytes, plan.peak_step  # most bytes live at once, first at step 1
(128, 1)

In-place steps (an elementwise op writing over an input that dies there) are decided before
planning, by giving the output its input's buffer (:func:`bitcompiler.backends.cortex_m.program.plan_storage`).
"""

from __future__ import annotations

from dataclasses import dataclass

import networkx as nx

ALIGN = 8  # doubles/ints never straddle an alignment boundary, and LDRD/LDM work


@dataclass(frozen=True)
class Buffer:
    """One planned tensor: ``size`` bytes, alive from step ``first`` to step ``last`` inclusive."""

    name: str
    size: int
    first: int
    last: int

    def overlaps(self, other: Buffer) -> bool:
        return self.first <= other.last and other.first <= self.last


@dataclass(frozen=True)
class ArenaPlan:
    offsets: dict[str, int]
    arena_bytes: int
    naive_bytes: int  # every tensor in its own memory: what planning saves is the difference
    graph: nx.Graph  # the interference (interval) graph, for inspection
    peak_bytes: int = 0  # the most (aligned) bytes live at one step: no plan needs less arena
    peak_step: int = -1  # the first step where ``peak_bytes`` are live (-1: no buffers)
    buffers: tuple[Buffer, ...] = ()

    def live_bytes(self, step: int) -> int:
        """Aligned bytes of the buffers live at ``step``."""
        return sum(_align(b.size) for b in self.buffers if b.first <= step <= b.last)

    def check(self, buffers: list[Buffer]) -> None:
        """Raise if two live-at-once tensors share a byte (the planner's own invariant)."""
        by_name = {b.name: b for b in buffers}
        for u, v in self.graph.edges:
            a, b = by_name[u], by_name[v]
            oa, ob = self.offsets[u], self.offsets[v]
            if oa < ob + b.size and ob < oa + a.size:
                raise AssertionError(f"{u} and {v} are live together but overlap in the arena")


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def interference_graph(buffers: list[Buffer]) -> nx.Graph:
    g = nx.Graph()
    for b in buffers:
        g.add_node(b.name, size=b.size)
    ordered = sorted(buffers, key=lambda b: b.first)
    for i, a in enumerate(ordered):
        for b in ordered[i + 1 :]:
            if b.first > a.last:
                break
            g.add_edge(a.name, b.name)
    return g


def plan_arena(buffers: list[Buffer]) -> ArenaPlan:
    """Offsets for ``buffers`` in one arena; ``arena_bytes`` <= ``naive_bytes`` always."""
    names = [b.name for b in buffers]
    if len(set(names)) != len(names):
        raise ValueError("buffer names must be unique")
    g = interference_graph(buffers)
    by_name = {b.name: b for b in buffers}
    offsets: dict[str, int] = {}
    for b in sorted(buffers, key=lambda b: (-b.size, b.first, b.name)):
        taken = sorted(
            (offsets[n], offsets[n] + _align(by_name[n].size)) for n in g.neighbors(b.name) if n in offsets
        )
        at = 0
        for lo, hi in taken:
            if at + _align(b.size) <= lo:
                break
            at = max(at, hi)
        offsets[b.name] = at
    arena = max((offsets[b.name] + _align(b.size) for b in buffers), default=0)
    naive = sum(_align(b.size) for b in buffers)
    plan = ArenaPlan(offsets, arena, naive, g, buffers=tuple(buffers))
    steps = sorted({b.first for b in buffers})  # the live set only grows where a buffer starts
    if steps:
        peak_step = max(steps, key=lambda i: (plan.live_bytes(i), -i))
        plan = ArenaPlan(offsets, arena, naive, g, plan.live_bytes(peak_step), peak_step, tuple(buffers))
    plan.check(buffers)
    return plan
