"""Convert an Amazon review data (2014) "ratings only" file into this project's event log.

    python scripts/convert_amazon.py ratings_Beauty.csv data/beauty/events.parquet

The public files (McAuley et al., http://jmcauley.ucsd.edu/data/amazon/index_2014.html, "ratings
only": ``ratings_Beauty.csv``, ``ratings_Toys_and_Games.csv``) are CSV without a header, with
the columns ``user,item,rating,timestamp`` (timestamp: Unix seconds, day resolution). The output
has the columns ``user_id``, ``item_id``, ``timestamp`` in the input's row order (prepare breaks
timestamp ties by that order); every rating counts as an interaction. The paper's 5-core filter
is not applied here: prepare does it with ``data.kcore=5`` (docs/quickstart.md).
Input and output may be any fsspec URL; the output format follows its extension (.parquet or
.csv).
"""

from __future__ import annotations

import argparse
import io
import sys

import fsspec
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from mqsa_core.errors import UserError
from mqsa_core.storage import atomic_write_bytes

COLUMNS = ["user", "item", "rating", "timestamp"]


def read_ratings(url: str) -> pa.Table:
    """The ratings file as ``user_id``, ``item_id`` (strings) and ``timestamp`` (int64)."""
    options = pacsv.ReadOptions(column_names=COLUMNS)
    types = {
        "user": pa.string(),
        "item": pa.string(),
        "rating": pa.float64(),
        "timestamp": pa.int64(),
    }
    with fsspec.open(url, "rb", compression="infer") as f:
        table = pacsv.read_csv(f, options, convert_options=pacsv.ConvertOptions(column_types=types))
    return pa.table(
        {"user_id": table["user"], "item_id": table["item"], "timestamp": table["timestamp"]}
    )


def write_events(table: pa.Table, url: str) -> None:
    """Write ``table`` atomically as Parquet or CSV, chosen by the extension of ``url``."""
    buffer = io.BytesIO()
    if url.endswith(".csv"):
        pacsv.write_csv(table, buffer)
    elif url.endswith(".parquet"):
        pq.write_table(table, buffer)
    else:
        raise UserError(f"{url}: the output must end in .parquet or .csv")
    atomic_write_bytes(url, buffer.getvalue())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("ratings", help="ratings-only CSV (user,item,rating,timestamp; no header)")
    parser.add_argument("out", help="output event log: .parquet or .csv")
    args = parser.parse_args(argv)
    try:
        table = read_ratings(args.ratings)
        write_events(table, args.out)
    except (OSError, UserError, pa.ArrowInvalid) as e:
        print(f"error: {args.ratings}: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    users = len(table["user_id"].unique())
    items = len(table["item_id"].unique())
    print(f"{table.num_rows} events, {users} users, {items} items -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
