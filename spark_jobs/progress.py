"""One-line, timed progress messages per pipeline stage."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager


class Progress:
    """Prints ``[prepare] <stage>: <details> (<seconds>s)`` when each stage ends."""

    def __init__(self, tag: str = "prepare", log: Callable[[str], None] | None = None) -> None:
        self.tag = tag
        self.log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        self.timings: dict[str, float] = {}

    def note(self, name: str, **details: object) -> None:
        """Print one untimed line ``[<tag>] <name>: <details>``."""
        self.log(f"[{self.tag}] {name}: " + ", ".join(f"{k}={v}" for k, v in details.items()))

    @contextmanager
    def stage(self, name: str) -> Iterator[dict[str, object]]:
        """Time a stage; the caller fills the yielded dict with details to print."""
        details: dict[str, object] = {}
        start = time.perf_counter()
        yield details
        seconds = time.perf_counter() - start
        self.timings[name] = round(seconds, 3)
        text = ", ".join(f"{k}={v}" for k, v in details.items())
        self.log(f"[{self.tag}] {name}: {text} ({seconds:.1f}s)")
