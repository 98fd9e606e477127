"""The item vocabulary: raw id -> dense index, ordered by count desc then raw id asc."""

from __future__ import annotations

from pyspark import StorageLevel
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

PARTITION_SHIFT = 33  # monotonically_increasing_id() = partition << 33 | row in partition


def item_counts(events: DataFrame) -> DataFrame:
    """``item_id``, ``count`` over ``events`` (map-side combined, so hot items cost no skew)."""
    return events.groupBy(F.col("item").alias("item_id")).agg(F.count(F.lit(1)).alias("count"))


def dense_rank_index(ordered: DataFrame) -> tuple[DataFrame, int]:
    """Add ``index`` 0..N-1 following the global order of ``ordered`` (sorted, distinct keys).

    Returns the indexed frame and N. No single-partition window: each partition of the
    range-partitioned sort numbers its rows locally (``monotonically_increasing_id``) and adds
    the total size of the partitions before it, from one small per-partition count (a map
    literal of one entry per partition).
    """
    numbered = ordered.withColumn("_mono", F.monotonically_increasing_id()).persist(
        StorageLevel.MEMORY_AND_DISK
    )
    part = F.shiftright(F.col("_mono"), PARTITION_SHIFT)
    sizes = numbered.groupBy(part.alias("_part")).agg(F.count(F.lit(1)).alias("n")).collect()
    offsets, start = [], 0
    for row in sorted(sizes, key=lambda r: r["_part"]):
        offsets += [F.lit(int(row["_part"])).cast("long"), F.lit(start).cast("long")]
        start += int(row["n"])
    if not offsets:
        return numbered.withColumn("index", F.col("_mono")).drop("_mono"), 0
    local = F.col("_mono") - F.shiftleft(part, PARTITION_SHIFT)
    index = F.element_at(F.create_map(*offsets), part) + local
    return numbered.withColumn("index", index).drop("_mono"), start


def build_vocab(counts: DataFrame) -> tuple[DataFrame, int]:
    """``item_id`` (raw), ``index`` (int64, dense), ``count`` (int64), sorted by ``index``;
    and the number of items. ``counts`` holds ``item_id``, ``count``; rows with a null id or
    a zero count are left out."""
    present = counts.filter(F.col("item_id").isNotNull() & (F.col("count") > 0))
    ordered = present.orderBy(F.desc("count"), F.asc("item_id"))
    vocab, size = dense_rank_index(ordered)
    return vocab.select("item_id", "index", "count").sortWithinPartitions("index"), size
