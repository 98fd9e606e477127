"""Convert a ``user item [timestamp]`` log, one event per line, into this project's event log.

    python scripts/convert_sequences.py Beauty.txt data/beauty/events.parquet
    python scripts/convert_sequences.py events.txt.gz data/log/events.csv --skip-bad

The input is the per-line format of SASRec, BERT4Rec and many public logs: ``user item`` or
``user item timestamp``, separated by spaces or tabs; any fsspec URL, decompressed by its
extension (``.gz``, ``.bz2``...). The first event line decides the layout for the whole file:

- two fields: no timestamps; each user's events are in the file's line order, so the output's
  ``timestamp`` is the line number (1, 2, ...), which keeps that order in prepare (say so with
  ``data.time_unit: order``);
- three fields: the third is a number (Unix seconds, or any other unit used throughout), kept
  as it is.

The output has the columns ``user_id`` and ``item_id`` (strings, as written) and ``timestamp``
(int64; float64 if a timestamp has a fraction) in the input's line order, the names prepare reads
by default (``data.user_col``, ``data.item_col``, ``data.time_col``); Parquet or CSV by its
extension, written atomically.

Nothing is dropped silently. Blank lines are skipped and counted. A malformed line (one field,
more than three, a field count other than the first event line's, a timestamp that is not a
finite number, bytes that are not UTF-8) stops the conversion with one ``error:`` line naming
its line number and content, and nothing is written; ``--skip-bad`` skips such lines instead,
counts them and names the first few. The summary line accounts for every line read.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, field

import fsspec
import pyarrow as pa
from convert_amazon import write_events  # scripts/: Parquet or CSV by extension, atomic

from mqsa_core.errors import UserError, first_line

NAMED = 3  # malformed lines named in the summary of --skip-bad
CHUNK = 1 << 20  # events buffered in Python lists before they become Arrow arrays


class ConvertError(UserError):
    """The input cannot be converted as it is (the message names the line)."""


@dataclass
class Malformed:
    """Lines skipped as malformed: how many, and the first :data:`NAMED` of them."""

    count: int = 0
    named: list[str] = field(default_factory=list)

    def add(self, line: str) -> None:
        self.count += 1
        if len(self.named) < NAMED:
            self.named.append(line)


@dataclass
class Events:
    """The converted events as Arrow chunks, plus the Python rows of the chunk being filled."""

    users: list[str] = field(default_factory=list)
    items: list[str] = field(default_factory=list)
    times: list[int | float] = field(default_factory=list)
    chunks: list[pa.Table] = field(default_factory=list)

    def add(self, user: str, item: str, time: int | float) -> None:
        self.users.append(user)
        self.items.append(item)
        self.times.append(time)
        if len(self.users) >= CHUNK:
            self.flush()

    def flush(self) -> None:
        """Turn the rows held in Python into an Arrow chunk."""
        if self.users:
            self.chunks.append(table_of(self.users, self.items, self.times))
            self.users, self.items, self.times = [], [], []

    def table(self) -> pa.Table:
        """Every event: ``user_id``, ``item_id``, ``timestamp`` (float64 if any chunk has a
        fractional timestamp, else int64)."""
        self.flush()
        if any(pa.types.is_floating(c.schema.field("timestamp").type) for c in self.chunks):
            self.chunks = [c.set_column(2, "timestamp", c["timestamp"].cast(pa.float64()))
                           for c in self.chunks]  # fmt: skip
        return pa.concat_tables(self.chunks)


def table_of(users: list[str], items: list[str], times: list[int | float]) -> pa.Table:
    """One chunk of events; timestamps int64 unless one of them is a float."""
    kind = pa.float64() if any(isinstance(t, float) for t in times) else pa.int64()
    return pa.table(
        {
            "user_id": pa.array(users, pa.string()),
            "item_id": pa.array(items, pa.string()),
            "timestamp": pa.array(times, kind),
        }
    )


class BadLine(ValueError):
    """A malformed line; the message says why."""


def parse_time(text: str) -> int | float:
    """A timestamp field as an int64-sized int (a float where it has a fraction); raises
    :class:`BadLine` for anything else."""
    try:
        value = int(text)
    except ValueError:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise BadLine(f"timestamp '{text}' is not a finite number") from None
        if value.is_integer():
            value = int(value)
    if isinstance(value, int) and not -(2**63) <= value < 2**63:
        raise BadLine(f"timestamp '{text}' is out of the int64 range")
    return value


def event_time(fields: list[str], layout: int | None, number: int) -> int | float:
    """The timestamp of the event on line ``number`` (its third field, or the line number when
    the file has none); raises :class:`BadLine` for a malformed line (``layout``: the field
    count of the file's first event line, None before it)."""
    if not 2 <= len(fields) <= 3:
        raise BadLine(f"expected 'user item' or 'user item timestamp', got {len(fields)} field(s)")
    if layout is not None and len(fields) != layout:
        raise BadLine(f"{len(fields)} fields where the first event line has {layout}")
    return parse_time(fields[2]) if len(fields) == 3 else number


def shown(number: int, raw: bytes) -> str:
    """A line as messages name it: its number and (the start of) its content."""
    text = raw.decode("utf-8", "replace").rstrip("\r\n")
    return f"line {number} {text[:80]!r}" + (" ..." if len(text) > 80 else "")


@dataclass
class Log:
    """A converted log and the count of every kind of line read."""

    events: pa.Table
    lines: int
    blank: int
    malformed: Malformed


def read_log(url: str, skip_bad: bool) -> Log:
    """Read ``url`` line by line (see the module docstring). Raises :class:`ConvertError`
    naming the first malformed line unless ``skip_bad``, and when no line holds an event."""
    events, malformed = Events(), Malformed()
    layout, blank, number = None, 0, 0
    with fsspec.open(url, "rb", compression="infer") as f:
        for number, raw in enumerate(f, 1):
            try:
                fields = raw.decode("utf-8").split()
                if not fields:
                    blank += 1
                    continue
                time = event_time(fields, layout, number)
            except (UnicodeDecodeError, BadLine) as e:
                problem = "not UTF-8 text" if isinstance(e, UnicodeDecodeError) else str(e)
                if not skip_bad:
                    raise ConvertError(f"{url} {shown(number, raw)}: {problem} (--skip-bad "
                                       "skips and counts such lines)") from None  # fmt: skip
                malformed.add(f"{shown(number, raw)}: {problem}")
                continue
            layout = layout or len(fields)
            events.add(fields[0], fields[1], time)
    table = events.table() if events.chunks or events.users else None
    if table is None:
        raise ConvertError(f"{url} holds no event line ({number} lines: {blank} blank, "
                           f"{malformed.count} malformed)")  # fmt: skip
    return Log(table, number, blank, malformed)


def summary(log: Log, out: str) -> str:
    """The line that accounts for every line read."""
    table = log.events
    users = len(table["user_id"].unique())
    items = len(table["item_id"].unique())
    return (
        f"{log.lines} lines: {table.num_rows} events ({users} users, {items} items), "
        f"{log.blank} blank, {log.malformed.count} malformed skipped -> {out}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("log", help="the 'user item [timestamp]' file (any fsspec URL)")
    parser.add_argument("out", help="output event log: .parquet or .csv")
    parser.add_argument("--skip-bad", action="store_true",
                        help="skip (and count) malformed lines instead of stopping")  # fmt: skip
    args = parser.parse_args(argv)
    try:
        log = read_log(args.log, args.skip_bad)
        write_events(log.events, args.out)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {args.log}: {first_line(e)}", file=sys.stderr)
        return 2
    if log.malformed.count:
        print(f"skipped {log.malformed.count} malformed line(s) of {args.log}, first: "
              + "; ".join(log.malformed.named), file=sys.stderr)  # fmt: skip
    print(summary(log, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
