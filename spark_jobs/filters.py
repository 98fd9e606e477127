"""The iterated k-core filter on users and items."""

from __future__ import annotations

from pyspark import StorageLevel
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from spark_jobs.clean import rare_keys, without_keys


def sizes(events: DataFrame) -> tuple[int, int, int]:
    """(distinct users, distinct items, events) of ``events``."""
    row = events.agg(
        F.countDistinct("user").alias("users"),
        F.countDistinct("item").alias("items"),
        F.count(F.lit(1)).alias("events"),
    ).first()
    return int(row["users"]), int(row["items"]), int(row["events"])


def kcore(events: DataFrame, k: int) -> tuple[DataFrame, dict[str, int], int]:
    """Iterate "drop users and items with fewer than ``k`` events" to a fixed point.

    Returns the filtered events (a local checkpoint on the executors, memory and disk) and the
    removed ``kcore_users``, ``kcore_items`` and ``kcore_events``, and the rounds it took.
    """
    users0, items0, events0 = sizes(events)
    current, remaining, rounds = events, events0, 0
    while True:
        bad_users = rare_keys(current, "user", k)
        bad_items = rare_keys(current, "item", k)
        nxt = without_keys(without_keys(current, "user", bad_users), "item", bad_items)
        # a local checkpoint cuts the plan: each round reads ``current`` three times, so without
        # it the plan of round n holds 3^n copies of the first (Java heap exhausted in ~10 rounds)
        current = nxt.localCheckpoint(eager=True, storageLevel=StorageLevel.MEMORY_AND_DISK)
        count = current.count()
        rounds += 1
        if count == remaining:
            break
        remaining = count
    users1, items1, _ = sizes(current)
    removed = {
        "kcore_users": users0 - users1,
        "kcore_items": items0 - items1,
        "kcore_events": events0 - remaining,
    }
    return current, removed, rounds
