"""OpenMP's idle threads spin briefly, then sleep, so that jobs sharing cores slow each other
about in proportion instead of many times over.

torch's libgomp lets an idle pool thread spin ``GOMP_SPINCOUNT`` = 300,000 times before it
sleeps. Each spin is one ``pause``, ~140 cycles on recent Intel cores (~15-20 ms in all): a
thread waiting for work holds a core that the other job's threads need, and two 2-thread
trainings on 2 cores took 10-11x their time alone (``bench/contention.py``). 3,000 spins (~0.2 ms
there) keep that near 1.6x at the cost of a few percent alone (docs/results.md has both
figures). libgomp reads the variable when it is loaded, so :func:`limit_spinning` runs in every
command's entry before torch is imported; a value the user set is kept.

:func:`usable_cores` is the number of cores a process's thread pools may fill.
"""

from __future__ import annotations

import os

SPIN_COUNT = "3000"


def limit_spinning() -> None:
    """``GOMP_SPINCOUNT`` for this process and its children, unless the user set it."""
    os.environ.setdefault("GOMP_SPINCOUNT", SPIN_COUNT)


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity (a container's or ``taskset``'s
    limit) where the OS reports one, else ``os.cpu_count()``."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1
