"""The pipeline's one overall progress display: which step, how many training runs are done out
of all, elapsed and estimated remaining time.

On a terminal it is a ``rich`` progress bar; elsewhere (CI logs, a file, a SLURM output) it
prints one plain line per step and per finished run. A single training (``train.py``) keeps
Lightning's own progress bar; the pipeline's trainings run quiet (in worker processes or as
submitit jobs) and this display reports them.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from datetime import timedelta

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

STEPS = ("teachers", "distill", "students", "evaluate", "md", "report")
"""The pipeline's steps, in order (baselines and oracles train during the first three)."""
POLL_S = 0.5
"""Seconds between looks at unfinished runs."""


def _clock(seconds: float) -> str:
    return str(timedelta(seconds=round(seconds)))


class PipelineProgress:
    """Progress of one pipeline run over ``total_runs`` training runs.

    Runs are futures (``concurrent.futures.Future``, ``submitit.Job`` or anything with
    ``done()`` and ``result()``) registered with :meth:`track`; :meth:`wait` returns the
    results of some of them while reporting every tracked run that finishes meanwhile.

    Args:
        total_runs: training runs the pipeline will wait for (teachers, students, baselines,
            oracles).
        console: where to draw (default: stdout); a terminal gets the rich bar, anything else
            plain lines.
    """

    def __init__(self, total_runs: int, console: Console | None = None):
        self.console = console or Console()
        self.total = int(total_runs)
        self.done = 0
        self.start = time.perf_counter()
        self.step_name = ""
        self.pending: dict[int, tuple[object, str]] = {}  # id(future): (future, run name)
        self.bar: Progress | None = None
        if self.console.is_terminal:
            self.bar = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("runs"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                console=self.console,
            )
            self.task = self.bar.add_task("starting", total=self.total)

    def __enter__(self) -> PipelineProgress:
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()

    # ------------------------------------------------------------------ reporting
    def eta(self) -> float | None:
        """Seconds left for the remaining runs at the pace so far (None before the first)."""
        if not self.done:
            return None
        return (time.perf_counter() - self.start) / self.done * (self.total - self.done)

    def line(self, what: str) -> str:
        """The plain-text report: ``[ekd 0:01:05] step 1/6 teachers: runs 2/8 done (what), ETA 0:03:10``."""
        eta = self.eta()
        number = STEPS.index(self.step_name) + 1 if self.step_name in STEPS else 0
        return (f"[ekd {_clock(time.perf_counter() - self.start)}] step {number}/{len(STEPS)} "
                f"{self.step_name}: runs {self.done}/{self.total} done ({what}), ETA "
                f"{_clock(eta) if eta is not None else '?'}")

    def _show(self, what: str) -> None:
        if self.bar is None:
            self.console.print(self.line(what), markup=False, highlight=False, soft_wrap=True)
        else:
            number = STEPS.index(self.step_name) + 1 if self.step_name in STEPS else 0
            self.bar.update(self.task, completed=self.done,
                            description=f"step {number}/{len(STEPS)} {self.step_name} · {what}")

    def step(self, name: str) -> None:
        """A pipeline step begins (one of :data:`STEPS`)."""
        self.step_name = name
        self._show("started")

    # ------------------------------------------------------------------ runs
    def track(self, futures: Mapping[str, object]) -> list:
        """Follow ``{run name: future}``; returns the futures, in order."""
        for name, future in futures.items():
            self.pending[id(future)] = (future, name)
        return list(futures.values())

    def poll(self) -> None:
        """Report every tracked run that has finished since the last look."""
        for key, (future, name) in list(self.pending.items()):
            if future.done():
                del self.pending[key]
                self.done += 1
                self._show(f"{name} finished")

    def wait(self, futures: Sequence) -> list:
        """The results of ``futures`` (tracked ones), reporting finished runs while waiting."""
        self.poll()
        while any(id(f) in self.pending for f in futures):
            time.sleep(POLL_S)
            self.poll()
        return [f.result() for f in futures]
