"""Turn raw rows into clean events and count every row or user that is dropped.

Clean events have the columns ``user`` and ``item`` (raw ids, input type kept; an empty or
whitespace-only string id counts as missing), ``ts`` (the timestamp as a number, see
:mod:`spark_jobs.timestamps`) and ``seq`` (the row's position in the input, the tie-breaker for
equal timestamps).
"""

from __future__ import annotations

from typing import NamedTuple

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T

from spark_jobs.read import CORRUPT_COLUMN
from spark_jobs.timestamps import UNIT_CODES, parse_time

# Row-level drop reasons, in the order they are tested (a row is counted under the first).
ROW_REASONS = ("malformed_row", "null_user", "null_item", "null_timestamp", "unparsable_timestamp")


def missing_id(col: Column, dtype: T.DataType) -> Column:
    """Whether an id is missing: null, or (string ids) empty or only whitespace."""
    if isinstance(dtype, T.StringType):
        return col.isNull() | col.rlike(r"^\s*$")
    return col.isNull()


def annotate(
    raw: DataFrame, user_col: str, item_col: str, time_col: str, time_unit: str
) -> DataFrame:
    """Columns ``user``, ``item``, ``ts``, ``seq``, ``unit`` (the timestamp's unit code, see
    :mod:`spark_jobs.timestamps`) and ``reason``: 0 for a kept row, else the 1-based position
    of the row's first drop reason in ``ROW_REASONS``."""
    malformed = F.col(CORRUPT_COLUMN).isNotNull() if CORRUPT_COLUMN in raw.columns else F.lit(False)
    ts, unit = parse_time(F.col(time_col), raw.schema[time_col].dataType, time_col, time_unit)
    staged = raw.select(
        F.col(user_col).alias("user"),
        F.col(item_col).alias("item"),
        ts.alias("ts"),
        unit.alias("unit"),
        F.monotonically_increasing_id().alias("seq"),
        F.col(time_col).isNull().alias("_ts_null"),
        malformed.alias("_malformed"),
        missing_id(F.col(user_col), raw.schema[user_col].dataType).alias("_no_user"),
        missing_id(F.col(item_col), raw.schema[item_col].dataType).alias("_no_item"),
    )
    tests = (
        F.col("_malformed"),
        F.col("_no_user"),
        F.col("_no_item"),
        F.col("_ts_null"),
        F.col("ts").isNull(),
    )
    code = F.lit(0)
    for number, test in reversed(list(enumerate(tests, start=1))):
        code = F.when(test, F.lit(number)).otherwise(code)
    return staged.select("user", "item", "ts", "unit", "seq", code.alias("reason"))


def item_tally(annotated: DataFrame) -> DataFrame:
    """Per raw item (null included): ``count`` of kept rows, the rows of each drop reason and
    the kept rows per timestamp unit (``unit_s``...``unit_parsed``).

    One pass over the input, combined map-side; the vocab counts, the drop totals and the unit
    check (:func:`tally_totals`) all come from it.
    """
    reason, kept = F.col("reason"), F.col("reason") == 0
    tallies = [F.count(F.when(kept, 1)).alias("count")]
    tallies += [
        F.count(F.when(reason == number, 1)).alias(name)
        for number, name in enumerate(ROW_REASONS, start=1)
    ]
    tallies += [
        F.count(F.when(kept & (F.col("unit") == code), 1)).alias(f"unit_{unit}")
        for unit, code in UNIT_CODES.items()
    ]
    return annotated.groupBy(F.col("item").alias("item_id")).agg(*tallies)


class Totals(NamedTuple):
    """What the item tally adds up to (:func:`tally_totals`)."""

    rows: int  # rows read
    reasons: dict[str, int]  # rows per drop reason (every reason present, 0 if none)
    units: dict[str, int]  # kept rows per timestamp unit
    items: int  # distinct non-missing item ids read
    row_drop_items: int  # of those, the items none of whose rows was kept


def tally_totals(tally: DataFrame) -> Totals:
    """The totals of an :func:`item_tally`, in one small aggregation."""
    units = [f"unit_{unit}" for unit in UNIT_CODES]
    named = ~missing_id(F.col("item_id"), tally.schema["item_id"].dataType)
    row = tally.agg(
        *(F.sum(c).alias(c) for c in ("count", *ROW_REASONS, *units)),
        F.count(F.when(named, 1)).alias("items"),
        F.count(F.when(named & (F.col("count") == 0), 1)).alias("row_drop_items"),
    ).first()
    reasons = {name: int(row[name] or 0) for name in ROW_REASONS}
    per_unit = {unit: int(row[f"unit_{unit}"] or 0) for unit in UNIT_CODES}
    rows = int(row["count"] or 0) + sum(reasons.values())
    return Totals(rows, reasons, per_unit, int(row["items"]), int(row["row_drop_items"]))


def unit_ranges(annotated: DataFrame) -> dict[str, tuple[float, float, int]]:
    """(min, max, rows) of the kept timestamps per unit (to word the mixed-units error)."""
    names = dict(enumerate(UNIT_CODES, start=1))
    kept = annotated.filter((F.col("reason") == 0) & (F.col("unit") > 0))
    rows = kept.groupBy("unit").agg(F.min("ts"), F.max("ts"), F.count(F.lit(1))).collect()
    return {names[r[0]]: (float(r[1]), float(r[2]), int(r[3])) for r in rows}


def kept_rows(annotated: DataFrame) -> DataFrame:
    """The rows with no drop reason, as clean events."""
    return annotated.filter(F.col("reason") == 0).drop("reason", "unit")


def deduplicate(events: DataFrame) -> DataFrame:
    """One event per distinct (user, item, ts), keeping the earliest row's position."""
    return events.groupBy("user", "item", "ts").agg(F.min("seq").alias("seq"))


def rare_keys(events: DataFrame, key: str, min_count: int) -> DataFrame:
    """Keys (``user`` or ``item``) with fewer than ``min_count`` events, with their counts."""
    counts = events.groupBy(key).agg(F.count(F.lit(1)).alias("n"))
    return counts.filter(F.col("n") < min_count)


def without_keys(events: DataFrame, key: str, drop: DataFrame) -> DataFrame:
    """``events`` minus those whose ``key`` is in ``drop`` (an anti join; AQE broadcasts a small
    ``drop`` side and splits skewed partitions otherwise)."""
    return events.join(drop.select(key), on=key, how="left_anti")
