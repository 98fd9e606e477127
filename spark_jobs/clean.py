"""Turn raw rows into clean events and count every row or user that is dropped.

Clean events have the columns ``user`` and ``item`` (raw ids, input type kept), ``ts`` (the
timestamp as a number: integer input stays int64; fractional, ISO-string and timestamp input
become float64 seconds) and ``seq`` (the row's position in the input, the tie-breaker for equal
timestamps).
"""

from __future__ import annotations

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T

from spark_jobs.errors import PrepareError
from spark_jobs.read import CORRUPT_COLUMN

# Row-level drop reasons, in the order they are tested (a row is counted under the first).
ROW_REASONS = ("malformed_row", "null_user", "null_item", "null_timestamp", "unparsable_timestamp")


def _finite(value: Column) -> Column:
    """``value`` (float64) with NaN and +-infinity replaced by null."""
    bad = F.isnan(value) | (F.abs(value) == F.lit(float("inf")))
    return F.when(~bad, value)


def timestamp_column(col: Column, dtype: T.DataType, name: str) -> Column:
    """``col`` as a comparable number (null where it cannot be parsed).

    Integers stay int64; floats and decimals become float64; timestamps, dates and ISO-8601
    strings become float64 seconds since the epoch; numeric strings are parsed as numbers.
    """
    if isinstance(dtype, T.ByteType | T.ShortType | T.IntegerType | T.LongType):
        return col.cast("long")
    if isinstance(dtype, T.FloatType | T.DoubleType | T.DecimalType):
        return _finite(col.cast("double"))
    if isinstance(dtype, T.TimestampType | T.TimestampNTZType | T.DateType):
        return F.unix_micros(col.cast("timestamp")) / F.lit(1e6)
    if isinstance(dtype, T.StringType):
        text = F.trim(col)
        as_number = _finite(text.try_cast("double"))
        as_time = F.unix_micros(F.try_to_timestamp(text)) / F.lit(1e6)
        return F.coalesce(as_number, as_time)
    raise PrepareError(
        f"timestamp column '{name}' has type {dtype.simpleString()}; "
        "expected numbers, timestamps or ISO-8601 strings"
    )


def annotate(raw: DataFrame, user_col: str, item_col: str, time_col: str) -> DataFrame:
    """Columns ``user``, ``item``, ``ts``, ``seq`` and ``reason``: 0 for a kept row, else the
    1-based position of the row's first drop reason in ``ROW_REASONS``."""
    malformed = F.col(CORRUPT_COLUMN).isNotNull() if CORRUPT_COLUMN in raw.columns else F.lit(False)
    staged = raw.select(
        F.col(user_col).alias("user"),
        F.col(item_col).alias("item"),
        timestamp_column(F.col(time_col), raw.schema[time_col].dataType, time_col).alias("ts"),
        F.monotonically_increasing_id().alias("seq"),
        F.col(time_col).isNull().alias("_ts_null"),
        malformed.alias("_malformed"),
    )
    tests = (
        F.col("_malformed"),
        F.col("user").isNull(),
        F.col("item").isNull(),
        F.col("_ts_null"),
        F.col("ts").isNull(),
    )
    code = F.lit(0)
    for number, test in reversed(list(enumerate(tests, start=1))):
        code = F.when(test, F.lit(number)).otherwise(code)
    return staged.select("user", "item", "ts", "seq", code.alias("reason"))


def item_tally(annotated: DataFrame) -> DataFrame:
    """Per raw item (null included): ``count`` of kept rows and the rows of each drop reason.

    One pass over the input, combined map-side; both the vocab counts and the drop totals
    (:func:`reason_totals`) come from it.
    """
    reason = F.col("reason")
    tallies = [F.count(F.when(reason == 0, 1)).alias("count")] + [
        F.count(F.when(reason == number, 1)).alias(name)
        for number, name in enumerate(ROW_REASONS, start=1)
    ]
    return annotated.groupBy(F.col("item").alias("item_id")).agg(*tallies)


def reason_totals(tally: DataFrame) -> tuple[int, dict[str, int]]:
    """Rows read and rows per drop reason (every reason present, 0 if none)."""
    row = tally.agg(*(F.sum(c).alias(c) for c in ("count", *ROW_REASONS))).first()
    reasons = {name: int(row[name] or 0) for name in ROW_REASONS}
    return int(row["count"] or 0) + sum(reasons.values()), reasons


def kept_rows(annotated: DataFrame) -> DataFrame:
    """The rows with no drop reason, as clean events."""
    return annotated.filter(F.col("reason") == 0).drop("reason")


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
