"""A rich progress bar fed by the engine's step callbacks (the engine itself never imports rich)."""

from __future__ import annotations

from typing import Any

from leakkit.engine.matching import StepEvent


class RichProgress:
    """Shows step, gradient distance and elapsed time for each attacked batch.

    Use as a context manager; call `start(label)` per batch and pass `self` as an engine callback.
    """

    def __init__(self, console: Any) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("step · distance {task.fields[distance]}"),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        )
        self._task: Any = None
        self._label = ""

    def __enter__(self) -> "RichProgress":
        self._progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._progress.__exit__(*exc)

    def start(self, label: str, total: int) -> None:
        if self._task is not None:
            self._progress.remove_task(self._task)
        self._label = label
        self._task = self._progress.add_task(label, total=total, distance="-")

    def __call__(self, event: StepEvent) -> None:
        self._progress.update(
            self._task,
            completed=event.step,
            total=event.steps,
            description=f"{self._label} · restart {event.restart + 1}/{event.restarts}",
            distance=f"{event.distance:.2e}",
        )
