"""The item transition graph of TED from the train sequences."""

from __future__ import annotations

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F


def span_pairs(span: int, with_times: bool, with_pos: bool) -> Column:
    """Structs (src, dst[, t_src, t_dst][, p_src, p_dst]) for the pairs (items[n],
    items[n + span]) of a row, with the ``times`` and ``pos`` arrays' values alongside.

    Built with ``slice`` and ``arrays_zip`` (code-generated; no lambdas, no Python).
    """
    length = F.greatest(F.size("items") - span, F.lit(0))

    def heads_tails(name: str, head: str, tail: str) -> list[Column]:
        return [
            F.slice(name, F.lit(1), length).alias(head),
            F.slice(name, F.lit(span + 1), length).alias(tail),
        ]

    fields = heads_tails("items", "src", "dst")
    if with_times:
        fields += heads_tails("times", "t_src", "t_dst")
    if with_pos:
        fields += heads_tails("pos", "p_src", "p_dst")
    return F.arrays_zip(*fields)


def count_transitions(train: DataFrame, time_span: int, max_gap: float) -> DataFrame:
    """``src``, ``dst``, ``count`` summed over spans 1..``time_span`` of ``train``'s rows.

    ``train`` has ``items`` (and ``times`` when ``max_gap > 0``: pairs more than ``max_gap``
    apart in time are left out; and ``pos`` in an incremental run: only pairs whose later
    item has a position > 0 are counted, see :mod:`spark_jobs.incremental`). Pairs are
    exploded per user and counted with a map-side combine, so a hot source item spreads over
    many (src, dst) keys and a heavy user adds rows, not skew.
    """
    with_times, with_pos = max_gap > 0, "pos" in train.columns
    spans = range(1, time_span + 1)
    pairs = F.concat(*(span_pairs(s, with_times, with_pos) for s in spans))
    exploded = train.select(F.explode(pairs).alias("p")).select("p.*")
    if with_times:
        exploded = exploded.filter(F.col("t_dst") - F.col("t_src") <= F.lit(max_gap))
    if with_pos:
        exploded = exploded.filter(F.col("p_dst") > 0)
    return exploded.groupBy("src", "dst").agg(F.count(F.lit(1)).alias("count"))


def top_successors(edges: DataFrame, k: int) -> DataFrame:
    """The ``k`` largest-count successors of each source (ties: smaller ``dst`` first)."""
    order = Window.partitionBy("src").orderBy(F.desc("count"), F.asc("dst"))
    ranked = edges.withColumn("_rank", F.row_number().over(order))
    return ranked.filter(F.col("_rank") <= k).drop("_rank")
