"""Tiny prepared-data directories for trainer tests (no Spark: written with pyarrow).

The layout is the data contract of ``spark_jobs.prepare``: ``vocab/``, ``sequences/``,
``transitions/``, ``stats.json``. Item k has the raw id ``f"i{k}"``.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def write_prepared(
    root: Path,
    num_users: int = 120,
    num_items: int = 40,
    max_len: int = 12,
    seed: int = 0,
    num_files: int = 2,
    row_group_size: int | None = None,
    version: str = "v1",
    base: dict | None = None,
) -> Path:
    """Users walk a planted item->item chain with noise; ``sequences/`` is ``num_files`` files
    of row groups of ``row_group_size`` users (None: one per file); ``stats.json`` carries
    ``version`` and, for data prepared against an earlier version, ``base``; returns ``root``."""
    rng = np.random.default_rng(seed)
    successor = rng.permutation(num_items)
    users = []
    for u in range(num_users):
        length = int(rng.integers(3, 2 * max_len))
        item = int(rng.integers(num_items))
        seq = []
        for _ in range(length):
            seq.append(item)
            item = int(successor[item]) if rng.random() < 0.7 else int(rng.integers(num_items))
        users.append((f"u{u}", seq[:-2], seq[-2], seq[-1]))
    pairs = Counter()
    for _, train, _, _ in users:
        cut = train[-max_len:]
        pairs.update(zip(cut[:-1], cut[1:], strict=False))
    (root / "sequences").mkdir(parents=True)
    (root / "transitions").mkdir()
    (root / "vocab").mkdir()
    counts = Counter(i for u in users for i in [*u[1], u[2], u[3]])
    pq.write_table(
        pa.table(
            {
                "item_id": [f"i{k}" for k in range(num_items)],
                "index": list(range(num_items)),
                "count": [counts[k] for k in range(num_items)],
            }
        ),
        root / "vocab" / "part-0.parquet",
    )
    for i, rows in enumerate(np.array_split(np.arange(num_users), num_files)):
        part = [users[r] for r in rows]
        pq.write_table(
            pa.table(
                {
                    "user_id": [u[0] for u in part],
                    "train_items": pa.array([u[1] for u in part], pa.list_(pa.int64())),
                    "valid_item": [u[2] for u in part],
                    "test_item": [u[3] for u in part],
                }
            ),
            root / "sequences" / f"part-{i}.parquet",
            row_group_size=row_group_size,
        )
    keys = sorted(pairs)
    pq.write_table(
        pa.table(
            {
                "src": [k[0] for k in keys],
                "dst": [k[1] for k in keys],
                "count": [pairs[k] for k in keys],
            }
        ),
        root / "transitions" / "part-0.parquet",
    )
    stats = {
        "users": num_users,
        "items": num_items,
        "max_len": max_len,
        "time_span": 1,
        "paper_mode": True,
        "version": version,
    }
    if base is not None:
        stats["base"] = base  # prepared against an earlier version (data.base_dir)
    (root / "stats.json").write_text(json.dumps(stats))
    (root / "_COMPLETE").write_text("")  # the commit marker of a finished prepare output
    return root


def write_vocab(workdir: Path, num_items: int, chunk: int = 1 << 20) -> None:
    """A synthetic ``vocab/`` (raw id ``f"item{index}"``) written in chunks."""
    (workdir / "vocab").mkdir(parents=True, exist_ok=True)
    schema = pa.schema([("item_id", pa.string()), ("index", pa.int64()), ("count", pa.int64())])
    with pq.ParquetWriter(workdir / "vocab" / "part-00000.parquet", schema) as writer:
        for start in range(0, num_items, chunk):
            index = np.arange(start, min(start + chunk, num_items))
            ids = pa.array([f"item{i}" for i in index])
            writer.write_table(
                pa.table([ids, pa.array(index), pa.array(num_items - index)], schema)
            )
    (workdir / "stats.json").write_text(json.dumps({"items": num_items}))
    (workdir / "_COMPLETE").write_text("")
