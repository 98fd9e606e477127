"""scripts/convert_amazon.py turns a ratings-only file (user,item,rating,timestamp; no header)
into our event log, and prepare's data.kcore=5 applies the paper's 5-core filter to it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq

from mqsa_core.prepared import read_stats
from mqsa_ted import cli

ROOT = Path(__file__).resolve().parents[1]
DAY = 86_400


def ratings_rows() -> list[str]:
    """Six users rate the same five items (a 5-core); U1 also rates Z1 (its only rating: the
    item goes, U1 keeps 5); U7 rates twice (goes)."""
    rows = []
    for u in range(1, 7):
        rows += [f"U{u},B{i},{1 + i % 5}.0,{1_360_000_000 + (u + i) * DAY}" for i in range(1, 6)]
    rows.append(f"U1,Z1,5.0,{1_360_000_000 + 20 * DAY}")
    rows += ["U7,B1,4.0,1360000000", "U7,B2,4.0,1360086400"]
    return rows


def test_convert_then_five_core(spark, tmp_path):
    ratings = tmp_path / "ratings_Beauty.csv"
    ratings.write_text("\n".join(ratings_rows()) + "\n")
    events = tmp_path / "amazon" / "beauty.parquet"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "convert_amazon.py"), str(ratings), str(events)],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"33 events, 7 users, 6 items -> {events}"
    table = pq.read_table(events)
    assert table.column_names == ["user_id", "item_id", "timestamp"]
    assert table.slice(0, 1).to_pylist() == [
        {"user_id": "U1", "item_id": "B1", "timestamp": 1_360_000_000 + 2 * DAY}
    ]
    out = tmp_path / "prepared"
    argv = ["prepare", "configs/beauty.yaml", f"data.events={events}", f"data.dir={out}"]
    assert cli.main([*argv, "data.kcore=5"]) == 0
    stats = read_stats(str(out))
    assert (stats["users"], stats["items"], stats["events"]) == (6, 5, 30)


def test_a_missing_input_is_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "convert_amazon.py"), str(tmp_path / "no.csv"),
         str(tmp_path / "out.parquet")],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith(f"error: {tmp_path / 'no.csv'}")
