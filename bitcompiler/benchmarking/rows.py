"""One row of a benchmark: a target x scheme (or a peer), what it measured, or why it could not."""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, fields
from typing import Any

#: row status: measured; compiled but not run here (the reason says why); not compiled
OK, COMPILED_ONLY, FAILED = "ok", "compiled only", "failed"


@dataclass
class Row:
    """``kind``: ``bitcompiler`` or ``peer``. Times in milliseconds, sizes in bytes; None: not
    measured on this target (e.g. latency on Cortex-M, instructions on the CPU). ``exact``: compiled
    == reference on the run's inputs (integer outputs equal, float within 1e-5 relative);
    ``accuracy_on``: ``compiled`` (the compiled code ran the test set), ``reference`` (the numeric
    reference did; the compiled code matched it on the checked inputs) or ``peer`` (the peer ran it)."""

    target: str
    scheme: str
    kind: str = "bitcompiler"
    status: str = OK
    reason: str = ""
    latency_ms: float | None = None
    latency_p90_ms: float | None = None
    instructions: int | None = None
    flash_bytes: int | None = None
    ram_bytes: int | None = None
    bits_per_weight: float | None = None
    weight_bytes: int | None = None
    compile_s: float | None = None
    exact: bool | None = None
    max_rel_error: float | None = None
    accuracy: float | None = None
    accuracy_on: str | None = None
    float_accuracy: float | None = None

    def to_dict(self, with_accuracy: bool = True) -> dict[str, Any]:
        d = asdict(self)
        if not with_accuracy:
            for k in ACCURACY_FIELDS:
                d.pop(k)
        return d

    def set_times(self, seconds: list[float]) -> None:
        ms = sorted(1e3 * s for s in seconds)
        self.latency_ms = statistics.median(ms)
        self.latency_p90_ms = ms[min(len(ms) - 1, round(0.9 * (len(ms) - 1)))]


ACCURACY_FIELDS = ("accuracy", "accuracy_on", "float_accuracy")
FIELDS = tuple(f.name for f in fields(Row))


def columns(rows: list[Row]) -> tuple[str, ...]:
    """The fields a table of ``rows`` shows: accuracy only when some row has one."""
    with_acc = any(r.accuracy is not None for r in rows)
    return tuple(f for f in FIELDS if with_acc or f not in ACCURACY_FIELDS)
