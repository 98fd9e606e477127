"""A plain-Python reference of the prepare job's split and transition graph.

Independent of Spark (sorting and counting with the standard library), for the tests and
``bench/check_split.py``: it states the contract in the simplest possible code.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass


@dataclass
class ReferenceSplit:
    """Per-user raw item sequences in time order (users with >= 3 events) and their times."""

    items: dict[Hashable, list[Hashable]]
    times: dict[Hashable, list[float]]

    def vocab(self) -> list[tuple[Hashable, int]]:
        """(raw item, count) in index order: count desc, then raw id asc."""
        counts = Counter(i for seq in self.items.values() for i in seq)
        return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))

    def split(self) -> dict[Hashable, tuple[list[Hashable], Hashable, Hashable]]:
        """user -> (train items, validation item, test item), raw ids."""
        return {u: (s[:-2], s[-2], s[-1]) for u, s in self.items.items()}


def reference_split(events: Iterable[tuple[Hashable, Hashable, float]]) -> ReferenceSplit:
    """Group (user, item, timestamp) rows, given in input order, into time-ordered sequences.

    Ties in time keep input order (Python's sort is stable); users with < 3 events are left out.
    """
    rows: dict[Hashable, list[tuple[float, int, Hashable]]] = defaultdict(list)
    for position, (user, item, ts) in enumerate(events):
        rows[user].append((ts, position, item))
    items, times = {}, {}
    for user, evs in rows.items():
        if len(evs) >= 3:
            evs.sort(key=lambda e: (e[0], e[1]))
            items[user] = [e[2] for e in evs]
            times[user] = [e[0] for e in evs]
    return ReferenceSplit(items, times)


def reference_transitions(
    trains: Iterable[tuple[Sequence[int], Sequence[float]]],
    time_span: int = 1,
    max_len: int | None = None,
    max_gap: float = 0.0,
    top_k: int = 0,
) -> Counter[tuple[int, int]]:
    """Brute-force (src, dst) counts over (train items, train times) pairs of all users.

    ``max_len`` cuts each train sequence to its last ``max_len`` items first (paper mode).
    """
    counts: Counter[tuple[int, int]] = Counter()
    for items, times in trains:
        if max_len is not None:
            items, times = items[-max_len:], times[-max_len:]
        for n in range(len(items)):
            for s in range(1, time_span + 1):
                if n + s < len(items) and (max_gap <= 0 or times[n + s] - times[n] <= max_gap):
                    counts[(items[n], items[n + s])] += 1
    if top_k <= 0:
        return counts
    by_src: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for (src, dst), c in counts.items():
        by_src[src].append((dst, c))
    kept = Counter()
    for src, succ in by_src.items():
        for dst, c in sorted(succ, key=lambda dc: (-dc[1], dc[0]))[:top_k]:
            kept[(src, dst)] = c
    return kept
