"""Incremental prepare: a previous prepare output (``data.base_dir``) extended with new events.

- Which new events are added: the base must share at least ``data.base_min_overlap`` of the
  new log's items and of its users (else it is refused as another log's base). An event that
  the base already holds (same user, item and timestamp) is not added again
  (``base_duplicate_events``); a previous user's event older than that user's newest event in
  the base is not added either (``late_events``: appended it would sit after newer history,
  inserted it would move the split the previous run trained on; a full rebuild takes it). A
  new user needs 3 events (else ``short_user_events``). Every such event is counted, and so is
  every new item left without events (``late_items``, ``short_user_items``).
- Items: previous items keep their index and their row (their count grows by their new
  events); new items are appended as indices ``N_base..``, ordered like a vocab (count desc,
  then raw id asc).
- Users: each previous user's history as stored (train items, validation item, test item and
  their ``times``) continues with the user's added events in time order, and the
  leave-one-out split is taken on the combined history; previous users without new events
  keep their rows.
- Transitions: the previous counts times ``data.transition_decay`` (rounded half up to
  integers; an edge that reaches 0 is dropped) plus the pairs of the combined train sequences
  that the previous train sequences did not hold (their later item lies past the previous
  train part), counted like a full prepare (spans, paper-mode cut); top-K on the sum. With a
  decay of 1, ``paper_mode: false`` and no top-K this equals a full count over the combined
  histories. ``data.max_time_gap`` compares the stored times of the previous events with the
  new ones'.
- Refused: a base that is not a committed prepare output, that holds no event times (an older
  version's output), whose graph was built with other settings (``time_span``,
  ``paper_mode``, ``max_time_gap``, ``max_len`` in paper mode) or whose timestamps have
  another unit; ``data.kcore`` (it would drop previous items); ids whose type cannot be
  matched with the base's.

Everything runs in Spark: joins on the user and item ids, no per-user or per-item data on the
driver.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pyspark.sql import Column, DataFrame, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T

from mqsa_core.config import ConfigError, DataConfig
from mqsa_core.prepared import SEQUENCES, TRANSITIONS, VOCAB, DataError, read_stats
from spark_jobs.errors import PrepareError
from spark_jobs.sequences import MIN_EVENTS
from spark_jobs.vocab import dense_rank_index

GRAPH_SETTINGS = ("time_span", "paper_mode", "max_time_gap")  # and max_len in paper mode
# Why a new event is not added, in the order they are tested (an event is counted under its
# first reason; ``drop`` holds the 1-based position, 0 for an event that is added).
EVENT_REASONS = ("base_duplicate_events", "late_events", "short_user_events")
IN_BASE, LATE, SHORT = 1, 2, 3


@dataclass
class Base:
    """The previous output: its URL (as configured), stats and datasets (lazy)."""

    url: str
    stats: dict[str, Any]
    vocab: DataFrame
    sequences: DataFrame
    transitions: DataFrame

    def summary(self) -> dict[str, Any]:
        """What ``stats.json`` records about the base."""
        keys = ("users", "items", "events", "source", "version")
        return {"dir": self.url, **{k: self.stats.get(k) for k in keys}}


def check_incremental(cfg: DataConfig) -> None:
    """Raise :class:`ConfigError` for settings an incremental prepare cannot honour (the
    values' own ranges are the config layer's rules)."""
    if not cfg.base_dir:
        return
    if cfg.kcore > 0:
        raise ConfigError(
            "data.kcore cannot be used with data.base_dir: the k-core would remove previous "
            "items, which keep their rows; set data.kcore: 0 or prepare from scratch"
        )


def base_stats(cfg: DataConfig) -> dict[str, Any]:
    """The ``stats.json`` of ``cfg.base_dir``, checked: a committed prepare output whose graph
    was built with this run's settings. Runs before Spark starts."""
    try:
        stats = read_stats(cfg.base_dir)
    except DataError as e:
        raise PrepareError(f"data.base_dir: {e}") from e
    wanted = {key: getattr(cfg, key) for key in GRAPH_SETTINGS}
    if cfg.paper_mode:
        wanted["max_len"] = cfg.max_len
    differ = {k: (stats.get(k), v) for k, v in wanted.items() if stats.get(k) != v}
    if differ:
        listed = ", ".join(f"data.{k}: {new} (base: {old})" for k, (old, new) in differ.items())
        raise PrepareError(
            f"data.base_dir {cfg.base_dir} was prepared with other graph settings ({listed}); "
            "use the base's settings or prepare from scratch"
        )
    return stats


def read_base(spark: SparkSession, url: str, stats: dict[str, Any], spark_url: str) -> Base:
    """The previous output ``url`` (readable by Spark at ``spark_url``; ``stats`` from
    :func:`base_stats`), its datasets lazy."""
    read = spark.read.parquet
    sequences = read(f"{spark_url}/{SEQUENCES}")
    if "times" not in sequences.columns:
        raise PrepareError(
            f"data.base_dir {url} holds no event times (an output of a version before they "
            "were kept), so the events it already holds cannot be recognised: prepare it "
            "again from scratch once, then extend that"
        )
    return Base(
        url, stats, read(f"{spark_url}/{VOCAB}"), sequences, read(f"{spark_url}/{TRANSITIONS}")
    )


def check_time_unit(base: Base, unit: str | None) -> None:
    """Refuse new events whose timestamp unit (``unit``, as the read found it) is not the
    base's: their times could not be compared with the base's."""
    old = base.stats.get("time_unit_seen")
    if old and unit and old != unit:
        raise PrepareError(
            f"the new events' timestamps are in {unit} but data.base_dir {base.url}'s are in "
            f"{old}: they cannot be compared with the events the base holds; write the new "
            f"times in {old} (data.time_unit declares a unit, it does not convert numbers)"
        )


def _matched(column: str, new: T.DataType, old: T.DataType, what: str) -> Column:
    """``column`` cast to the base's id type ``old``, or a :class:`PrepareError`."""
    integral = (T.ByteType, T.ShortType, T.IntegerType, T.LongType)
    if new == old:
        return F.col(column)
    if isinstance(old, T.StringType) or (isinstance(new, integral) and isinstance(old, integral)):
        return F.col(column).cast(old)
    raise PrepareError(
        f"the new events' {what} ids are {new.simpleString()} but data.base_dir's are "
        f"{old.simpleString()}; write them with the base's type or prepare from scratch"
    )


def match_ids(events: DataFrame, base: Base) -> DataFrame:
    """``events`` with ``user`` and ``item`` cast to the base's id types (string ids take any
    id in its text form; integer widths widen)."""
    types = {f.name: f.dataType for f in events.schema.fields}
    user = _matched("user", types["user"], base.sequences.schema["user_id"].dataType, "user")
    item = _matched("item", types["item"], base.vocab.schema["item_id"].dataType, "item")
    rest = [c for c in events.columns if c not in ("user", "item")]
    return events.select(user.alias("user"), item.alias("item"), *rest)


def held_events(base: Base, users: DataFrame) -> DataFrame:
    """``_h_user``, ``_h_item`` (raw id), ``_h_ts``: the distinct events the base holds for
    ``users`` (a ``user`` column), from their stored histories and ``times``."""
    history = F.concat("train_items", F.array("valid_item", "test_item"))
    stored = base.sequences.join(users.withColumnRenamed("user", "user_id"), "user_id", "left_semi")
    zipped = F.arrays_zip(history.alias("index"), F.col("times").alias("ts"))
    exploded = stored.select(F.col("user_id").alias("_h_user"), F.explode(zipped).alias("e"))
    raw = base.vocab.select("index", F.col("item_id").alias("_h_item"))
    held = exploded.select("_h_user", "e.index", F.col("e.ts").alias("_h_ts")).join(raw, "index")
    return held.select("_h_user", "_h_item", "_h_ts").distinct()


def classify(events: DataFrame, base: Base) -> DataFrame:
    """The new ``events`` (ids matched to the base's) with ``known_user`` (a previous user) and
    ``drop``: 0 for an event to add, else the position of its first reason in
    ``EVENT_REASONS``: an event the user's stored history holds (same item and timestamp), an
    event older than the user's newest stored one, an event of a new user with fewer than 3.

    Only the histories of users with events not newer than their newest stored one are
    exploded to find the duplicates (on a usual day: the few late arrivals)."""
    newest = base.sequences.select(
        F.col("user_id").alias("user"), F.array_max("times").alias("_newest")
    )
    events = events.join(newest, "user", "left")
    due = F.col("_newest").isNotNull() & (F.col("ts") <= F.col("_newest"))
    held = held_events(base, events.filter(due).select("user").distinct())
    same = (
        (F.col("user") == F.col("_h_user"))
        & (F.col("item") == F.col("_h_item"))
        & (F.col("ts") == F.col("_h_ts"))
    )
    events = events.join(held, same, "left")
    known_user = F.col("_newest").isNotNull()
    new_user_events = F.count(F.lit(1)).over(Window.partitionBy("user"))
    drop = (
        F.when(F.col("_h_user").isNotNull(), F.lit(IN_BASE))
        .when(due & (F.col("ts") < F.col("_newest")), F.lit(LATE))
        .when(~known_user & (new_user_events < MIN_EVENTS), F.lit(SHORT))
        .otherwise(F.lit(0))
    )
    return events.select(
        "user", "item", "ts", "seq", known_user.alias("known_user"), drop.alias("drop")
    )


def new_item_tally(classified: DataFrame, base: Base) -> DataFrame:
    """Per raw item of the new events: ``count`` (events added), the events of each reason in
    ``EVENT_REASONS``, ``lost`` (the largest reason: for an item left without events, the
    filter that removed its last ones) and ``known`` (the base holds the item)."""
    drop = F.col("drop")
    tallies = [F.count(F.when(drop == 0, 1)).alias("count"), F.max("drop").alias("lost")]
    tallies += [
        F.count(F.when(drop == number, 1)).alias(name)
        for number, name in enumerate(EVENT_REASONS, start=1)
    ]
    tally = classified.groupBy(F.col("item").alias("item_id")).agg(*tallies)
    known = base.vocab.select("item_id", F.lit(True).alias("known"))
    joined = tally.join(known, "item_id", "left")
    return joined.withColumn("known", F.coalesce("known", F.lit(False)))


def new_totals(tally: DataFrame, classified: DataFrame) -> dict[str, int]:
    """The counts of the new events: ``items`` and ``users`` (distinct, of the clean new
    events), how many of them the base holds (``known_items``, ``known_users``), the events
    per reason, ``short_users``, the ``new_items`` that get a row and the items left without
    events by the late and short filters (``late_items``, ``short_user_items``)."""
    unknown_empty = ~F.col("known") & (F.col("count") == 0)
    row = tally.agg(
        *(F.sum(name).alias(name) for name in EVENT_REASONS),
        F.count(F.lit(1)).alias("items"),
        F.count(F.when(F.col("known"), 1)).alias("known_items"),
        F.count(F.when(~F.col("known") & (F.col("count") > 0), 1)).alias("new_items"),
        F.count(F.when(unknown_empty & (F.col("lost") == LATE), 1)).alias("late_items"),
        F.count(F.when(unknown_empty & (F.col("lost") == SHORT), 1)).alias("short_user_items"),
    ).first()
    per_user = classified.groupBy("user").agg(
        F.first("known_user").alias("known"), F.max(F.col("drop") == SHORT).alias("short")
    )
    users = per_user.agg(
        F.count(F.lit(1)).alias("users"),
        F.count(F.when(F.col("known"), 1)).alias("known_users"),
        F.count(F.when(F.col("short"), 1)).alias("short_users"),
    ).first()
    return {key: int(value or 0) for key, value in {**row.asDict(), **users.asDict()}.items()}


def check_overlap(totals: dict[str, int], base: Base, minimum: float) -> None:
    """Refuse a base that holds less than ``minimum`` of the new events' distinct items or of
    their distinct users (``data.base_min_overlap``): it is another log's base."""
    shares = {
        kind: totals[f"known_{kind}"] / totals[kind] for kind in ("items", "users") if totals[kind]
    }
    if any(share < minimum for share in shares.values()):
        held = " and ".join(
            f"{totals[f'known_{kind}']:,} of their {totals[kind]:,} {kind} ({share:.1%})"
            for kind, share in shares.items()
        )
        raise PrepareError(
            f"data.base_dir {base.url} barely overlaps the new events: it holds {held}, below "
            f"data.base_min_overlap={minimum:g}; is it the base of this log? Set "
            "data.base_min_overlap lower (0 = no check) to extend it anyway"
        )


def extend_vocab(base: Base, counts: DataFrame) -> tuple[DataFrame, int, int]:
    """The vocab of the base with the items of ``counts`` (``item_id``, ``count`` of the new
    events) added: previous items keep their index, new ones are appended. Returns the vocab
    (``item_id``, ``index``, ``count``, in index order), its size and the new items."""
    num_base = int(base.stats["items"])
    old = base.vocab.select("item_id", "index", F.col("count").alias("base_count"))
    joined = old.join(counts, on="item_id", how="full_outer")
    added = F.coalesce(F.col("base_count"), F.lit(0)) + F.coalesce(F.col("count"), F.lit(0))
    known = F.col("index").isNotNull()
    kept = joined.filter(known).select("item_id", "index", added.alias("count"))
    fresh = joined.filter(~known).select("item_id", "count")
    ordered = fresh.orderBy(F.desc("count"), F.asc("item_id"))
    numbered, num_new = dense_rank_index(ordered)
    appended = numbered.select("item_id", (F.col("index") + num_base).alias("index"), "count")
    vocab = kept.unionByName(appended).orderBy("index")
    return vocab, num_base + num_new, num_new


def combine(base: Base, new_seqs: DataFrame, partitions: int) -> DataFrame:
    """Per user: ``items`` (the previous history followed by the new events' indices),
    ``times`` (theirs; as float64 where the base's and the new ones' types differ), ``pos``
    (each item's position relative to the end of the previous train part: > 0 for a
    position the previous train sequence did not hold) and ``new_user``.

    The base side is hash-partitioned by user like ``new_seqs`` (``partitions`` parts), so
    the full outer join adds one shuffle of the base and keeps the file layout of a full run.
    """
    history = F.concat("train_items", F.array("valid_item", "test_item"))
    old_type = base.sequences.schema["times"].dataType
    new_type = new_seqs.schema["times"].dataType
    times_type = old_type if old_type == new_type else T.ArrayType(T.DoubleType())
    old = base.sequences.select(
        F.col("user_id").alias("user"),
        history.alias("old"),
        F.col("times").cast(times_type).alias("old_times"),
    )
    old = old.repartition(partitions, "user")
    new = new_seqs.select(
        "user", F.col("items").alias("new"), F.col("times").cast(times_type).alias("new_times")
    )
    joined = old.join(new, "user", "full_outer")

    def joined_lists(before: str, after: str, kind: T.DataType) -> Column:
        empty = F.array().cast(kind)
        return F.concat(F.coalesce(before, empty), F.coalesce(after, empty))

    indices = T.ArrayType(T.LongType())
    items = joined_lists("old", "new", indices)
    base_train = F.greatest(F.size(F.coalesce("old", F.array().cast(indices))) - 2, F.lit(0))
    pos = F.sequence(F.lit(1) - base_train, F.size(items) - base_train)
    return joined.select(
        "user",
        items.alias("items"),
        joined_lists("old_times", "new_times", times_type).alias("times"),
        pos.alias("pos"),
        F.col("old").isNull().alias("new_user"),
    )


def add_decayed(base: Base, edges: DataFrame, decay: float) -> DataFrame:
    """``src``, ``dst``, ``count``: the base's counts times ``decay`` (rounded half up) plus
    ``edges``' counts; edges with a total of 0 are left out."""
    old = F.col("count") if decay == 1.0 else F.round(F.col("count") * F.lit(decay))
    previous = base.transitions.select("src", "dst", old.cast("long").alias("old"))
    joined = previous.join(edges, on=["src", "dst"], how="full_outer")
    total = F.coalesce(F.col("old"), F.lit(0)) + F.coalesce(F.col("count"), F.lit(0))
    return joined.select("src", "dst", total.alias("count")).filter(F.col("count") > 0)
