"""The prepared-data contract: what ``spark_jobs.prepare`` writes under ``data.dir``, and the
readers the trainer, the baselines and the exports use.

Layout (docs/data_pipeline.md)::

    vocab/        item_id (raw), index (0..N-1), count
    sequences/    user_id, train_items (list of indices, time order), valid_item, test_item;
                  prepared against a base also new_targets (how many of the last train items
                  the base did not train on), listed in stats.json's ``sequence_columns``
    transitions/  src, dst, count
    stats.json    counts, every dropped row by reason, the settings that shaped the data,
                  this output's ``version`` and, when prepared against an earlier output
                  (``data.base_dir``), ``base``: that output's dir, version, items, users
    _COMPLETE     the commit marker, written last: a directory without it is never read

Writers live in :mod:`spark_jobs.io` (staging + atomic rename); readers live here, and every
reader checks the commit marker first.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from mqsa_core.errors import UserError
from mqsa_core.storage import parquet_files, read_json, read_parquet, url_to_fs

COMPLETE_MARKER = "_COMPLETE"
STATS_FILE = "stats.json"
VOCAB, SEQUENCES, TRANSITIONS = "vocab", "sequences", "transitions"
NEW_TARGETS = "new_targets"  # the optional column of sequences/ (an incremental prepare)


class DataError(UserError):
    """The prepared data is missing, unfinished, empty or does not match the config."""


def is_data_file(name: str) -> bool:
    """Hadoop convention: names starting with ``_`` or ``.`` and checksums are not data."""
    base = name.rstrip("/").rsplit("/", 1)[-1]
    return not base.startswith(("_", ".")) and not base.endswith(".crc")


def require_complete(data_dir: str) -> None:
    """Raise :class:`DataError` unless ``data_dir`` is a committed prepare output."""
    fs, path = url_to_fs(data_dir)
    if not fs.exists(f"{path.rstrip('/')}/{COMPLETE_MARKER}"):
        raise DataError(
            f"{data_dir} is not a complete prepared-data directory (no {COMPLETE_MARKER}); "
            "run `mqsa-ted prepare CONFIG` first"
        )


def read_stats(data_dir: str) -> dict[str, Any]:
    """The ``stats.json`` of a committed prepare output."""
    require_complete(data_dir)
    return read_json(f"{data_dir.rstrip('/')}/{STATS_FILE}")


def dataset_url(data_dir: str, name: str) -> str:
    """The URL of one dataset (``vocab``, ``sequences``, ``transitions``) of ``data_dir``."""
    return f"{data_dir.rstrip('/')}/{name}"


def dataset_files(data_dir: str, name: str) -> list[str]:
    """Sorted Parquet data files (URLs) of one dataset of a committed prepare output."""
    require_complete(data_dir)
    return parquet_files(dataset_url(data_dir, name))


def read_dataset(data_dir: str, name: str, columns: list[str], filter=None) -> pa.Table:
    """The ``columns`` of one dataset of a committed prepare output as one Arrow table."""
    require_complete(data_dir)
    return read_parquet(dataset_url(data_dir, name), columns, filter)
