"""Incremental prepare: a previous prepare output (``data.base_dir``) extended with new events.

- Items: previous items keep their index and their row (their count grows by their new
  events); new items are appended as indices ``N_base..``, ordered like a vocab (count desc,
  then raw id asc).
- Users: each previous user's history as stored (train items, validation item, test item)
  continues with the user's new events in time order, and the leave-one-out split is taken on
  the combined history; previous users without new events keep their rows. A new user needs
  3 events (else dropped and counted under ``short_users``). The base holds no timestamps, so
  a user's new events come after the previous ones whatever their times.
- Transitions: the previous counts times ``data.transition_decay`` (rounded half up to
  integers; an edge that reaches 0 is dropped) plus the pairs of the combined train sequences
  that the previous train sequences did not hold (their later item lies past the previous
  train part), counted like a full prepare (spans, paper-mode cut); top-K on the sum. With a
  decay of 1, ``paper_mode: false`` and no top-K this equals a full count over the combined
  histories.
- Refused: a base that is not a committed prepare output, or whose graph was built with other
  settings (``time_span``, ``paper_mode``, ``max_time_gap``, ``max_len`` in paper mode);
  ``data.kcore`` (it would drop previous items) and ``data.max_time_gap`` (the base holds no
  times); ids whose type cannot be matched with the base's.

Everything runs in Spark: joins on the user and item ids, no per-user or per-item data on the
driver.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from core.config import ConfigError, DataConfig
from core.prepared import SEQUENCES, TRANSITIONS, VOCAB, DataError, read_stats
from spark_jobs.clean import without_keys
from spark_jobs.errors import PrepareError
from spark_jobs.sequences import MIN_EVENTS
from spark_jobs.vocab import dense_rank_index

GRAPH_SETTINGS = ("time_span", "paper_mode", "max_time_gap")  # and max_len in paper mode


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
    if cfg.max_time_gap > 0:
        raise ConfigError(
            "data.max_time_gap cannot be used with data.base_dir: the previous output holds "
            "no timestamps; set data.max_time_gap: 0 or prepare from scratch"
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
    return Base(
        url,
        stats,
        read(f"{spark_url}/{VOCAB}"),
        read(f"{spark_url}/{SEQUENCES}"),
        read(f"{spark_url}/{TRANSITIONS}"),
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


def drop_short_new_users(events: DataFrame, base: Base) -> tuple[DataFrame, dict[str, int]]:
    """``events`` without the new users (not in the base) that have fewer than 3 events, and
    the counts ``short_users``, ``short_user_events``."""
    per_user = events.groupBy("user").agg(F.count(F.lit(1)).alias("n"))
    known = base.sequences.select(F.col("user_id").alias("user"))
    short = per_user.filter(F.col("n") < MIN_EVENTS).join(known, on="user", how="left_anti")
    row = short.agg(F.count(F.lit(1)).alias("users"), F.sum("n").alias("events")).first()
    counts = {"short_users": int(row["users"] or 0), "short_user_events": int(row["events"] or 0)}
    if counts["short_users"]:
        events = without_keys(events, "user", short)
    return events, counts


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
    ``pos`` (each item's position relative to the end of the previous train part: > 0 for a
    position the previous train sequence did not hold) and ``new_user``.

    The base side is hash-partitioned by user like ``new_seqs`` (``partitions`` parts), so
    the full outer join adds one shuffle of the base and keeps the file layout of a full run.
    """
    history = F.concat("train_items", F.array("valid_item", "test_item"))
    old = base.sequences.select(F.col("user_id").alias("user"), history.alias("old"))
    old = old.repartition(partitions, "user")
    joined = old.join(new_seqs.select("user", F.col("items").alias("new")), "user", "full_outer")
    empty = F.array().cast(T.ArrayType(T.LongType()))
    items = F.concat(F.coalesce("old", empty), F.coalesce("new", empty))
    base_train = F.greatest(F.size(F.coalesce("old", empty)) - 2, F.lit(0))
    pos = F.sequence(F.lit(1) - base_train, F.size(items) - base_train)
    return joined.select(
        "user", items.alias("items"), pos.alias("pos"), F.col("old").isNull().alias("new_user")
    )


def add_decayed(base: Base, edges: DataFrame, decay: float) -> DataFrame:
    """``src``, ``dst``, ``count``: the base's counts times ``decay`` (rounded half up) plus
    ``edges``' counts; edges with a total of 0 are left out."""
    old = F.col("count") if decay == 1.0 else F.round(F.col("count") * F.lit(decay))
    previous = base.transitions.select("src", "dst", old.cast("long").alias("old"))
    joined = previous.join(edges, on=["src", "dst"], how="full_outer")
    total = F.coalesce(F.col("old"), F.lit(0)) + F.coalesce(F.col("count"), F.lit(0))
    return joined.select("src", "dst", total.alias("count")).filter(F.col("count") > 0)
