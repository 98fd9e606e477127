"""Top-K recommendations from an export, for one history or a Parquet file of histories.

    mqsa-ted recommend EXPORT_DIR --history id1,id2,... [--k 10]
    mqsa-ted recommend EXPORT_DIR --batch histories.parquet --out recs.parquet

Reads the committed version of EXPORT_DIR (``CURRENT`` -> ``versions/ID/``: manifest, item
parts, the user encoder's tensors, the FAISS index) and, when the manifest's source run is
readable here, that run's ``model.pt``: an export older than the run's weights is refused
(``--allow-stale`` serves it anyway). Writes nothing but the ``--out`` Parquet of ``--batch``
(``user_id``, ``items``, ``scores``); without ``--out`` the results are printed.

A history is raw item ids, oldest first. Unknown ids are named on stderr and skipped; a history
with no known item is an error unless ``--popular-fallback`` (then the items most frequent in
the prepared data). The encoder reads the last ``max_len`` known items; which items are never
recommended follows the run's evaluation protocol (``train.eval_protocol``, in the manifest):
``paper`` excludes the WHOLE history, ``repeat_aware`` excludes nothing
(``--exclude-history`` / ``--no-exclude-history`` override it).

The arguments and inputs are checked before the export is loaded (which takes seconds): ``--k``
from 1 to the export's item count, ``--out`` only with ``--batch`` and in an existing
directory, ``--batch`` a Parquet file with ``user_id`` and a list column ``history``, a
committed export at EXPORT_DIR; each refusal is one ``error:`` line, exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys

import pyarrow as pa
import pyarrow.parquet as pq

from mqsa_core.errors import UserError, first_line
from mqsa_core.storage import is_local, url_to_fs
from mqsa_ted.manifest import read_manifest

BATCH_COLUMNS = ("user_id", "history")


class QueryError(UserError):
    """A query that cannot be answered as asked (``k`` out of range, no known item in a
    history, an unreadable ``--batch`` file)."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("export_dir")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--history", help="comma-separated raw item ids, oldest first")
    source.add_argument("--batch", help="Parquet with columns user_id, history (list of raw ids)")
    parser.add_argument("--out", help="output Parquet for --batch (default: print)")
    parser.add_argument("--k", type=int, default=10,
                        help="items per history (1 to the export's item count)")  # fmt: skip
    parser.add_argument(
        "--popular-fallback",
        action="store_true",
        help="answer a history without known items with the most popular ones",
    )
    parser.add_argument(
        "--exclude-history",
        action=argparse.BooleanOptionalAction,
        help="never recommend history items (default: the run's protocol, "
        "paper: yes, repeat_aware: no)",
    )
    parser.add_argument("--allow-stale", action="store_true",
                        help="serve an export older than its run's current model.pt")  # fmt: skip
    return parser.parse_args(argv)


def history_ids(text: str) -> list[str]:
    """The raw ids of a ``--history`` value (comma-separated, blanks ignored)."""
    return [s.strip() for s in text.split(",") if s.strip()]


def check_batch(url: str) -> None:
    """Refuse a ``--batch`` input that is missing, not Parquet, or lacks ``user_id`` and a list
    column ``history`` (only the file's footer is read)."""
    fs, path = url_to_fs(url)
    if not fs.exists(path):
        raise QueryError(f"--batch {url} not found")
    if fs.isdir(path):
        raise QueryError(f"--batch {url} is a directory: give one Parquet file")
    try:
        with fs.open(path, "rb") as f:
            schema = pq.ParquetFile(f).schema_arrow
    except (pa.ArrowException, OSError) as e:
        raise QueryError(f"--batch {url} is not a Parquet file ({first_line(e)})") from e
    missing = [c for c in BATCH_COLUMNS if c not in schema.names]
    if missing:
        raise QueryError(f"--batch {url} lacks the column(s) {', '.join(missing)} "
                         f"(it has: {', '.join(schema.names)})")  # fmt: skip
    kind = schema.field("history").type
    if not (pa.types.is_list(kind) or pa.types.is_large_list(kind)):
        raise QueryError(f"--batch {url}: history is {kind}, not a list of raw item ids")


def check_out(url: str) -> None:
    """Refuse an ``--out`` that could not be written once the work is done: a local path whose
    directory does not exist, or an existing directory."""
    if not is_local(url):
        return  # object stores: the write itself reports
    path = url_to_fs(url)[1]
    if os.path.isdir(path):
        raise QueryError(f"--out {url} is a directory: give a file name (recs.parquet)")
    if not os.path.isdir(os.path.dirname(path) or "."):
        raise QueryError(f"--out {url}: the directory {os.path.dirname(path)} does not exist")


def check(args: argparse.Namespace) -> None:
    """Everything about ``args`` that can be checked without loading the export (the manifest
    is read for the item count). Raises :class:`UserError` naming the first problem."""
    if args.k < 1:
        raise QueryError(f"--k must be at least 1, got {args.k}")
    if args.out is not None and args.batch is None:
        raise QueryError("--out is only for --batch (the answer to --history is printed)")
    if args.batch is not None:
        check_batch(args.batch)
    if args.out is not None:
        check_out(args.out)
    _, manifest = read_manifest(args.export_dir)
    if args.k > manifest.count:
        raise QueryError(f"--k {args.k} is more than the {manifest.count} items of the export")


def main(argv: list[str] | None = None) -> int:
    """``mqsa-ted recommend``: check, then load the export (torch) and answer."""
    args = parse_args(argv)
    try:
        check(args)
        from mqsa_ted.recommend import run  # torch, the model: only once the checks pass

        run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
