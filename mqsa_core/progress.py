"""Progress of long loops: a bar on a terminal, a plain line every ``interval`` seconds in a log,
both with the time left (ETA) of the loop and, for training, of the whole run.

A tqdm bar written to a file becomes one long line of carriage returns; when standard error is
not a terminal the loop instead prints
``desc: n/total (rate/s, 1m27s left[, run ~1h05m left]) key=value`` lines.

Every ETA is wall-clock arithmetic (``time.perf_counter``): nothing here reads a value back from
the device, so showing it adds no host read to a step.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from tqdm import tqdm

Item = TypeVar("Item")
# the run's seconds left given the current loop's seconds left (RunEta.remaining)
RunLeft = Callable[[float], float]


def format_duration(seconds: float) -> str:
    """``42s``, ``17m39s``, ``3h05m``, ``2d04h``: coarse enough to read at a glance."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, secs = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"


def loop_left(n: int, total: int, elapsed: float) -> float | None:
    """Seconds left in a loop of ``total`` items after ``n`` took ``elapsed`` s (None before the
    first item)."""
    if n <= 0 or elapsed <= 0:
        return None
    return (total - n) * elapsed / n


def eta_text(left: float | None, run_left: RunLeft | None) -> str:
    """``1m27s left, run ~1h05m left``: the loop's time left and, given ``run_left``, the
    run's."""
    if left is None:
        return ""
    text = f"{format_duration(left)} left"
    if run_left is not None:
        text += f", run ~{format_duration(run_left(left))} left"
    return text


class RunEta:
    """The run's wall-clock ETA: seconds per optimizer step measured over everything this
    process ran since :meth:`start` (training, evaluation, checkpoints, metrics), times the
    steps left in the planned epochs. Measured per step, a resumed run's partial first epoch
    counts for what it is."""

    def __init__(self, planned_epochs: int, steps_per_epoch: int, patience: int = 0) -> None:
        self.planned, self.steps_per_epoch, self.patience = (
            planned_epochs,
            steps_per_epoch,
            patience,
        )
        self.started: float | None = None
        self.start_step = 0
        self.seconds = 0.0  # wall-clock from start() to the last epoch end
        self.steps = 0  # optimizer steps in that time

    def start(self, global_step: int) -> None:
        """The clock starts (the first epoch of this process, at ``global_step``)."""
        if self.started is None:
            self.started, self.start_step = time.perf_counter(), global_step

    def epoch_done(self, global_step: int) -> None:
        """An epoch ended (evaluated, recorded) with ``global_step`` steps done in the run."""
        if self.started is not None:
            self.seconds = time.perf_counter() - self.started
            self.steps = global_step - self.start_step

    def mean_epoch(self) -> float | None:
        """Mean wall-clock seconds of an epoch including evaluation (None before one ended)."""
        return self.seconds / self.steps * self.steps_per_epoch if self.steps else None

    def epochs_left(self, epoch: int) -> int:
        """Planned epochs after ``epoch``."""
        return max(self.planned - epoch, 0)

    def title(self, epoch: int) -> str:
        """``epoch 3/20`` and, with early stopping, when it stops."""
        text = f"epoch {epoch}/{self.planned}"
        if self.patience:
            text += (
                f" (early stop after {self.patience} evaluations without a better valid NDCG@20)"
            )
        return text

    def remaining(self, epoch: int) -> RunLeft:
        """The run's seconds left during ``epoch``, given that epoch's training seconds left:
        the epochs after it at the mean epoch time (before one ended: at this epoch's
        training time, evaluation not yet known)."""

        def left(epoch_left: float) -> float:
            mean = self.mean_epoch()
            if mean is None:
                elapsed = time.perf_counter() - (self.started or time.perf_counter())
                mean = elapsed + epoch_left
            return epoch_left + self.epochs_left(epoch) * mean

        return left

    def line(self, epoch: int) -> str:
        """The log line after ``epoch``: mean epoch time x epochs left."""
        mean, left = self.mean_epoch(), self.epochs_left(epoch)
        if left == 0:
            return f"ETA: epoch {epoch} was the last planned one"
        if mean is None:
            return f"ETA: {left} epoch(s) left"
        finish = time.strftime("%H:%M %Z", time.localtime(time.time() + mean * left))
        line = (
            f"ETA: {left} epoch(s) left x {mean:.1f} s (mean epoch incl. evaluation) = "
            f"~{format_duration(mean * left)} (~{finish})"
        )
        if self.patience:
            line += f"; early stopping (train.patience={self.patience}) may end it sooner"
        return line


class PlainProgress:
    """An iterable with tqdm's ``set_postfix`` that logs one plain line per ``interval`` s."""

    def __init__(
        self,
        iterable: Iterable[Item],
        total: int,
        desc: str,
        interval: float,
        run_left: RunLeft | None = None,
    ) -> None:
        self.iterable, self.total, self.desc, self.interval = iterable, total, desc, interval
        self.run_left = run_left
        self.postfix = ""

    def set_postfix(self, **values: Any) -> None:
        self.postfix = " ".join(f"{k}={v}" for k, v in values.items())

    def status(self, n: int, elapsed: float) -> str:
        """The line after ``n`` items in ``elapsed`` seconds."""
        rate = n / elapsed if elapsed > 0 else 0.0
        eta = eta_text(loop_left(n, self.total, elapsed), self.run_left)
        timing = f"{rate:.1f}/s" + (f", {eta}" if eta else "")
        return f"{self.desc}: {n}/{self.total} ({timing}) {self.postfix}".rstrip()

    def __iter__(self) -> Iterator[Item]:
        start = last = time.perf_counter()
        for n, item in enumerate(self.iterable, 1):
            yield item
            now = time.perf_counter()
            if now - last >= self.interval and n < self.total:
                last = now
                print(self.status(n, now - start), file=sys.stderr, flush=True)


class NoProgress(PlainProgress):
    def __iter__(self) -> Iterator[Item]:
        return iter(self.iterable)


class EtaBar(tqdm):
    """tqdm's bar (which shows the loop's own time left) with the run's time left in its
    postfix."""

    def __init__(self, *args: Any, run_left: RunLeft | None = None, **kwargs: Any) -> None:
        self.run_left = run_left  # set first: tqdm's __init__ renders the bar
        super().__init__(*args, **kwargs)

    @property
    def format_dict(self) -> dict[str, Any]:
        values = super().format_dict
        left = loop_left(values["n"], values["total"] or 0, values["elapsed"])
        if self.run_left is not None and left is not None:
            run = f"run ~{format_duration(self.run_left(left))} left"
            values["postfix"] = f"{values['postfix']}, {run}" if values["postfix"] else run
        return values


def progress(
    iterable: Iterable[Item],
    total: int,
    desc: str,
    enabled: bool = True,
    interval: float = 30.0,
    run_left: RunLeft | None = None,
):
    """``iterable`` with progress shown on standard error (see the module docstring);
    ``run_left`` adds the run's time left (:meth:`RunEta.remaining`)."""
    if not enabled:
        return NoProgress(iterable, total, desc, interval)
    if sys.stderr.isatty():
        return EtaBar(iterable, total=total, desc=desc, leave=False, run_left=run_left)
    return PlainProgress(iterable, total, desc, interval, run_left)
