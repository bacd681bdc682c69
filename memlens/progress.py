"""Progress a user can plan around: which encoders are training, waiting and done, and the time left.

:class:`TrainingProgress` turns training events (a run started, finished an epoch, finished) into
log lines through a callback (library code never prints): when a run starts, with how many run,
wait and are done; at each quarter of a run's epochs, its elapsed time and estimates of the time
left for the run and for all the training; when it ends. The estimate assumes the runs still to
come take as long per epoch (wall time since their start, start-up included) as those seen so far,
with ``jobs`` of them at a time.
"""

from __future__ import annotations

import time
from typing import Callable


def clock(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"


class TrainingProgress:
    """Training events of several runs in, log lines out (see the module docstring)."""

    def __init__(self, runs: dict[str, int], *, jobs: int, log: Callable[[str], None], quarters: bool = True,
                 now: Callable[[], float] = time.monotonic):
        self.epochs = dict(runs)  # run name -> planned epochs
        self.quarters = quarters  # a line at each quarter of a run (a terminal); else start and end only (CI logs)
        self.jobs, self.log, self.now = max(1, jobs), log, now
        self.started: dict[str, float] = {}
        self.done_epochs: dict[str, int] = {name: 0 for name in runs}
        self.finished: set[str] = set()
        self.rate: dict[str, float] = {}  # wall seconds per epoch of each run so far (start-up included)

    def _counts(self) -> str:
        running = len(self.started) - len(self.finished)
        waiting = len(self.epochs) - len(self.started)
        return f"{running} running, {waiting} waiting, {len(self.finished)} done"

    def _left(self) -> float | None:
        """Seconds of training left, all runs together (None before any epoch was timed)."""
        if not self.rate:
            return None
        rate = sum(self.rate.values()) / len(self.rate)
        left_epochs = sum(e - self.done_epochs[n] for n, e in self.epochs.items() if n not in self.finished)
        return rate * left_epochs / min(self.jobs, max(1, len(self.epochs) - len(self.finished)))

    def start(self, name: str) -> None:
        self.started.setdefault(name, self.now())
        self.log(f"train {name}: started ({self._counts()})")

    def epoch(self, name: str, epoch: int, seconds: float = 0.0) -> None:
        """Run ``name`` finished epoch ``epoch`` (1-based; ``seconds``: the epoch's own time, for the record)."""
        if name not in self.started:
            self.start(name)
        self.done_epochs[name] = epoch
        self.rate[name] = (self.now() - self.started[name]) / max(epoch, 1)
        total = self.epochs[name]
        marks = {max(1, round(total * f)) for f in (0.25, 0.5, 0.75)} - {total}
        if self.quarters and epoch in marks:
            elapsed = self.now() - self.started[name]
            run_left = elapsed / epoch * (total - epoch)
            left = self._left()
            self.log(f"train {name}: epoch {epoch}/{total}, {clock(elapsed)} elapsed, about {clock(run_left)} left"
                     + (f" (all training: about {clock(left)} left)" if left is not None else ""))

    def finish(self, name: str) -> None:
        if name not in self.started:
            self.started[name] = self.now()
        self.finished.add(name)
        self.done_epochs[name] = self.epochs[name]
        self.rate[name] = (self.now() - self.started[name]) / max(self.epochs[name], 1)
        left = self._left()
        more = "" if len(self.finished) == len(self.epochs) else (
            f"; about {clock(left)} of training left" if left is not None else "")
        self.log(f"train {name}: done in {clock(self.now() - self.started[name])} ({self._counts()}{more})")
