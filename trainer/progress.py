"""Progress of long loops: a bar on a terminal, a plain line every ``interval`` seconds in a log.

A tqdm bar written to a file becomes one long line of carriage returns; when standard error is
not a terminal the loop instead prints ``desc: n/total (rate/s) key=value`` lines.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from tqdm import tqdm

Item = TypeVar("Item")


class PlainProgress:
    """An iterable with tqdm's ``set_postfix`` that logs one plain line per ``interval`` s."""

    def __init__(self, iterable: Iterable[Item], total: int, desc: str, interval: float) -> None:
        self.iterable, self.total, self.desc, self.interval = iterable, total, desc, interval
        self.postfix = ""

    def set_postfix(self, **values: Any) -> None:
        self.postfix = " ".join(f"{k}={v}" for k, v in values.items())

    def __iter__(self) -> Iterator[Item]:
        start = last = time.perf_counter()
        for n, item in enumerate(self.iterable, 1):
            yield item
            now = time.perf_counter()
            if now - last >= self.interval and n < self.total:
                last = now
                rate = n / (now - start)
                line = f"{self.desc}: {n}/{self.total} ({rate:.1f}/s) {self.postfix}".rstrip()
                print(line, file=sys.stderr, flush=True)


class NoProgress(PlainProgress):
    def __iter__(self) -> Iterator[Item]:
        return iter(self.iterable)


def progress(
    iterable: Iterable[Item], total: int, desc: str, enabled: bool = True, interval: float = 30.0
):
    """``iterable`` with progress shown on standard error (see the module docstring)."""
    if not enabled:
        return NoProgress(iterable, total, desc, interval)
    if sys.stderr.isatty():
        return tqdm(iterable, total=total, desc=desc, leave=False)
    return PlainProgress(iterable, total, desc, interval)
