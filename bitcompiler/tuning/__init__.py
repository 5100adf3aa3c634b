"""MetaSchedule tuning of bitcompiler's own kernel schedules; records kept on disk and reused.

>>> import torch, bitcompiler as bc
>>> model = torch.nn.Sequential(torch.nn.Linear(256, 256))
>>> cm = bc.tune(model, (torch.randn(1, 256),), scheme="binary:act=binary", trials=8)  # doctest: +SKIP
>>> cm.report().extra["tuned kernels"]  # doctest: +SKIP
1.0

How it works:

* The tunable kernels (:mod:`bitcompiler.kernels.template`) are found by lowering the model once
  with a collecting scheduler. Each is a MetaSchedule task: its unscheduled TIR, specialized to
  the example batch, is the workload; the space is a ``ScheduleFn`` running the kernel's hand
  schedule with every choice drawn by ``sample_categorical``; ``ReplayFunc`` draws schedules.
* Builds and measurements run in this process (:class:`_Measure`): no worker processes; a
  schedule drawn twice is measured once. With ``runner="rpc://host:port/key"`` the candidates are
  exported and measured on a server of that TVM RPC tracker instead (MetaSchedule's
  ``RPCRunner``; the finalists through an RPC session): :mod:`bitcompiler.rpc`.
* The best few drawn schedules and the hand schedule are measured again, in turns, and only the
  fastest is committed: a record is never slower than the hand schedule it replaces.
* Records live in a MetaSchedule ``JSONDatabase`` (``$BITC_CACHE/tuning`` or ``db=``), keyed by
  the workload's structural hash and the target string (threads included). ``compile()`` applies
  the best record of every kernel that has one and keeps the hand schedule for the rest; the
  compile cache key includes the records, so a build made before tuning is not reused after.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["TuneOptions"]


@dataclass(frozen=True)
class TuneOptions:
    """What ``compile(tune=...)`` does: ``trials`` schedules per kernel within ``time_budget`` s.

    ``retune=False`` (``compile(tune=True)``) tunes only kernels without a record. ``runner``:
    None (measure here) or ``"rpc://host:port/key"`` (on a server of that TVM RPC tracker).
    """

    trials: int = 64
    time_budget: float | None = None
    retune: bool = False
    runner: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.trials, bool) or not isinstance(self.trials, int) or self.trials <= 0:
            raise ValueError(
                f"trials must be a positive int (schedules measured per kernel), got {self.trials!r}"
            )
        if self.time_budget is not None and not self.time_budget > 0:
            raise ValueError(
                f"time_budget must be a positive number of seconds or None, got {self.time_budget!r}"
            )
        if self.runner is not None and not str(self.runner).startswith("rpc://"):
            raise ValueError(f"runner must be None or 'rpc://host:port/key', got {self.runner!r}")


def __getattr__(name: str) -> Any:
    # the search (MetaSchedule, so TVM) is imported when first used, not with bitcompiler
    import importlib

    search = importlib.import_module("bitcompiler.tuning.search")
    try:
        return getattr(search, name)
    except AttributeError:
        raise AttributeError(f"module 'bitcompiler.tuning' has no attribute {name!r}") from None
