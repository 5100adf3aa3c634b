"""Progress bars of a benchmark (rich): one per phase (training, compiling, measuring, timing, accuracy)."""

from __future__ import annotations

from typing import Any


class Progress:
    """``step(phase, what, total)``: the previous step of ``phase`` is done, ``what`` is next."""

    def __init__(self, enabled: bool = True) -> None:
        self._bars: Any = None
        self._tasks: dict[str, Any] = {}
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
            from rich.progress import Progress as Bars

            self._bars = Bars(
                TextColumn("{task.fields[phase]:>10}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("{task.description}"),
            )
            self._bars.start()

    def step(self, phase: str, what: str, total: int | None) -> None:
        if self._bars is None:
            return
        task = self._tasks.get(phase)
        if task is None:
            self._tasks[phase] = self._bars.add_task(what, total=total, phase=phase)
            return
        self._bars.update(task, advance=1, description=what)

    def _finish(self, task: Any) -> None:
        done = self._bars.tasks[task].completed + 1  # the last step announced is done too
        self._bars.update(task, completed=done, total=done, description="done")

    def close(self) -> None:
        if self._bars is None:
            return
        for task in self._tasks.values():
            self._finish(task)
        self._bars.stop()
