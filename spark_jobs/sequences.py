"""Per-user time-ordered sequences and the leave-one-out split."""

from __future__ import annotations

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from mqsa_core.prepared import NEW_TARGETS

BROADCAST_MAX_ITEMS = 2_000_000  # above this the vocab join shuffles (AQE splits hot items)
MIN_EVENTS = 3  # leave-one-out needs a train item, a validation and a test target


def index_events(events: DataFrame, vocab: DataFrame, num_items: int) -> DataFrame:
    """Replace each event's raw ``item`` by its vocab ``index``.

    The vocab is broadcast while it has at most ``BROADCAST_MAX_ITEMS`` rows, so hot items
    put no extra work on any task; a larger vocab is joined by a shuffle, where AQE's skew-join
    handling splits the partitions of hot items.
    """
    side = vocab.select(F.col("item_id").alias("item"), "index")
    if num_items <= BROADCAST_MAX_ITEMS:
        side = F.broadcast(side)
    return events.join(side, on="item").drop("item")


def user_sequences(indexed: DataFrame, partitions: int) -> DataFrame:
    """``user``, ``items`` (vocab indices in time order) and ``times`` (their timestamps).

    One shuffle: the events are hash-partitioned by user into ``partitions`` parts and sorted
    by user there, so the per-user lists are collected in one streaming pass (with
    ``spark.sql.execution.replaceHashWithSortAgg``, set by :mod:`spark_jobs.session`; without
    it Spark falls back to a hash aggregation, same result). The order inside a list comes from
    ``sort_array`` on struct(ts, seq, index): time, then input row order on ties. A heavy user
    is one array, sorted within its task.
    """
    ordered = F.sort_array(F.collect_list(F.struct("ts", "seq", "index")))
    by_user = indexed.repartition(partitions, "user").sortWithinPartitions("user")
    grouped = by_user.groupBy("user").agg(ordered.alias("ev"))
    return grouped.select("user", F.col("ev.index").alias("items"), F.col("ev.ts").alias("times"))


def sequence_counts(seqs: DataFrame) -> dict[str, int]:
    """``users`` and ``events`` of ``seqs``, and of those the ``short_users`` (fewer than
    ``MIN_EVENTS`` events) and their ``short_user_events``; one pass."""
    n = F.size("items")
    short = n < MIN_EVENTS
    row = seqs.agg(
        F.count(F.lit(1)).alias("users"),
        F.sum(n).alias("events"),
        F.count(F.when(short, 1)).alias("short_users"),
        F.sum(F.when(short, n).otherwise(0)).alias("short_user_events"),
    ).first()
    return {key: int(row[key] or 0) for key in row.asDict()}


def short_users(seqs: DataFrame) -> DataFrame:
    """``user``: the users with fewer than ``MIN_EVENTS`` events."""
    return seqs.filter(F.size("items") < MIN_EVENTS).select("user")


def leave_one_out(seqs: DataFrame) -> DataFrame:
    """``user_id``, ``train_items`` (all but the last two), ``valid_item``, ``test_item``,
    ``times`` (the timestamps of all of them, in that order: what a later incremental prepare
    compares its events with); in an incremental run (``seqs`` with ``pos``,
    :func:`spark_jobs.incremental.combine`) also ``new_targets``: how many of the last train
    items the base did not train on (its valid and test items and the new events; every train
    item of a new user)."""
    n = F.size("items")
    columns = [
        F.col("user").alias("user_id"),
        F.slice("items", F.lit(1), n - 2).alias("train_items"),
        F.element_at("items", -2).alias("valid_item"),
        F.element_at("items", -1).alias("test_item"),
        F.col("times"),
    ]
    if "pos" in seqs.columns:  # the last item's pos is n - (the base's train length)
        unseen = F.least(F.greatest(F.element_at("pos", -1) - 2, F.lit(0)), n - 2)
        columns.append(unseen.cast("long").alias(NEW_TARGETS))
    return seqs.select(*columns)


def train_part(seqs: DataFrame, max_len: int | None) -> DataFrame:
    """``items`` (and ``times`` and ``pos`` if present): each user's train part, cut to the
    last ``max_len`` events if given."""
    n_train = F.size("items") - 2
    start = F.lit(1) if max_len is None else F.greatest(n_train - max_len + 1, F.lit(1))
    length = n_train if max_len is None else F.least(n_train, F.lit(max_len))
    names = [c for c in ("items", "times", "pos") if c in seqs.columns]
    return seqs.select(*(F.slice(c, start, length).alias(c) for c in names))
