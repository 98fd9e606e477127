"""The time column as comparable numbers, the unit of numeric timestamps, and mixed units refused.

Numeric values (integers, floats, decimals, numeric strings) are compared as they are:
integers stay int64, the others become float64. Timestamps, dates and ISO-8601 strings become
float64 seconds since the epoch (or, with ``data.time_unit`` set to ``ms``/``us``/``ns``, that
unit). Each kept value also gets a unit code: numeric values by magnitude, the unit in which
they would be a time since 1973-03 (below 1e8 no unit is assumed: sequence numbers, offsets),
and a separate code for values parsed from timestamps/dates/ISO strings (seconds):

    code  0: |v| < 1e8    1: s [1e8, 1e11)    2: ms [1e11, 1e14)    3: us [1e14, 1e17)
          4: ns >= 1e17   5: parsed from a timestamp, a date or an ISO-8601 string

``data.time_unit``:

- ``auto``: values of two units in one log (parsed values count as seconds) are refused:
  seconds mixed with milliseconds would order the events by unit, not by time.
- ``s``, ``ms``, ``us``, ``ns``: numeric values are in that unit (a numeric value of another
  unit is refused); parsed values are converted to it.
- ``order``: the values are sequence numbers; no check.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable

from pyspark.sql import Column
from pyspark.sql import functions as F
from pyspark.sql import types as T

from spark_jobs.errors import PrepareError

UNITS = ("s", "ms", "us", "ns")  # codes 1..4
PARSED = "parsed"  # code 5
UNIT_CODES = {unit: code for code, unit in enumerate((*UNITS, PARSED), start=1)}
PER_SECOND = {"s": 1, "ms": 10**3, "us": 10**6, "ns": 10**9}
NAMES = {"s": "seconds", "ms": "milliseconds", "us": "microseconds", "ns": "nanoseconds"}
SMALLEST_EPOCH = 1e8  # 1973-03-03 in seconds: smaller numbers get no unit


def _finite(value: Column) -> Column:
    """``value`` (float64) with NaN and +-infinity replaced by null."""
    bad = F.isnan(value) | (F.abs(value) == F.lit(float("inf")))
    return F.when(~bad, value)


def unit_code(number: Column) -> Column:
    """Code 0..4 of a numeric timestamp by its magnitude (module docstring); null for null."""
    magnitude = F.abs(number.cast("double"))
    code = F.when(magnitude.isNull(), F.lit(None).cast("int"))
    for unit in reversed(UNITS):
        code = code.when(magnitude >= SMALLEST_EPOCH * PER_SECOND[unit], UNIT_CODES[unit])
    return code.otherwise(0)


def parse_time(col: Column, dtype: T.DataType, name: str, unit: str) -> tuple[Column, Column]:
    """``col`` as a comparable number (null where it cannot be parsed) and its unit code.

    ``unit`` is ``data.time_unit``: values parsed from timestamps, dates and ISO strings are
    seconds, or that unit when it is ``ms``, ``us`` or ``ns``.
    """
    scale = PER_SECOND.get(unit, 1)
    parsed_code = F.lit(UNIT_CODES[PARSED])
    if isinstance(dtype, T.ByteType | T.ShortType | T.IntegerType | T.LongType):
        number = col.cast("long")
        return number, unit_code(number)
    if isinstance(dtype, T.FloatType | T.DoubleType | T.DecimalType):
        number = _finite(col.cast("double"))
        return number, unit_code(number)
    if isinstance(dtype, T.TimestampType | T.TimestampNTZType | T.DateType):
        seconds = F.unix_micros(col.cast("timestamp")) / F.lit(1e6)
        return seconds * F.lit(scale), F.when(seconds.isNotNull(), parsed_code)
    if isinstance(dtype, T.StringType):
        text = F.trim(col)
        number = _finite(text.try_cast("double"))
        seconds = F.unix_micros(F.try_to_timestamp(text)) / F.lit(1e6)
        value = F.coalesce(number, seconds * F.lit(scale))
        return value, F.coalesce(unit_code(number), F.when(seconds.isNotNull(), parsed_code))
    raise PrepareError(
        f"timestamp column '{name}' has type {dtype.simpleString()}; "
        "expected numbers, timestamps or ISO-8601 strings"
    )


def _date(seconds: float) -> str:
    """``seconds`` since the epoch as a UTC date (``?`` outside the calendar)."""
    try:
        return datetime.datetime.fromtimestamp(seconds, datetime.UTC).strftime("%Y-%m-%d")
    except (OverflowError, OSError, ValueError):
        return "?"


def describe(kind: str, low: float, high: float, rows: int, unit: str) -> str:
    """One unit's values in a message: how many, their range and the dates they would mean."""
    if kind == PARSED:
        seconds = (low / PER_SECOND.get(unit, 1), high / PER_SECOND.get(unit, 1))
        return f"{rows} timestamp/date/ISO values ({_date(seconds[0])}..{_date(seconds[1])})"
    per = PER_SECOND[kind]
    return (
        f"{rows} numbers that look like {NAMES[kind]} since the epoch "
        f"({low:.0f}..{high:.0f}, i.e. {_date(low / per)}..{_date(high / per)})"
    )


Ranges = Callable[[], dict[str, tuple[float, float, int]]]


def check_units(counts: dict[str, int], unit: str, column: str, ranges: Ranges) -> str | None:
    """Refuse timestamps whose units disagree; return the unit the values have (None if none).

    ``counts`` holds the kept rows per unit (``s``, ``ms``, ``us``, ``ns``, ``parsed``);
    ``ranges()`` (only called to word an error) gives (min, max, rows) per unit.
    """
    if unit == "order":
        return "order"
    numeric = [u for u in UNITS if counts.get(u)]
    if unit == "auto":
        seen = set(numeric) | ({"s"} if counts.get(PARSED) else set())
        if len(seen) <= 1:
            return next(iter(seen), None)
        found = ranges()
        parts = "; ".join(describe(k, *found[k], unit) for k in (*UNITS, PARSED) if k in found)
        fixes = "convert the column to one unit before prepare"
        if counts.get(PARSED) and len(numeric) == 1:
            only = numeric[0]
            fixes += f", or set data.time_unit: {only} to convert the dates to {NAMES[only]}"
        raise PrepareError(
            f"timestamp column '{column}' mixes units: {parts}. Ordered as they are, the events "
            f"of one unit would all come before the other's; {fixes}, or set data.time_unit: "
            "order if the values are sequence numbers, not times"
        )
    wrong = [u for u in numeric if u != unit]
    if wrong:
        found = ranges()
        parts = "; ".join(describe(k, *found[k], unit) for k in wrong)
        raise PrepareError(
            f"data.time_unit is {unit} ({NAMES[unit]}) but timestamp column '{column}' has "
            f"{parts}; convert them to {NAMES[unit]} or correct data.time_unit"
        )
    return unit
