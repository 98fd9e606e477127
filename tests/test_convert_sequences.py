"""scripts/convert_sequences.py turns ``user item [timestamp]`` per-line logs (SASRec's layout)
into our event log: every line accounted for, malformed lines named (or skipped and counted), the
output read by prepare with its default columns and each user's events kept in line order."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mqsa_core.config import DataConfig
from spark_jobs.read import read_events
from tests.conftest import read_output

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "convert_sequences.py"

# Users interleaved as in a merged log; no timestamps: each user's order is the line order.
SASREC = ["1 10", "2 20", "1 11", "3 30", "2 21", "", "1 12", "3 31", "2 22", "3 32", "1 13"]


def convert(src: Path, out: Path, *options: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), str(src), str(out), *options],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120,
    )  # fmt: skip


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def test_without_timestamps_each_users_order_is_the_line_order(tmp_path, run_prepare):
    src = write_lines(tmp_path / "Beauty.txt", SASREC)
    out = tmp_path / "events.parquet"
    proc = convert(src, out)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert proc.stdout.strip() == (
        f"11 lines: 10 events (3 users, 10 items), 1 blank, 0 malformed skipped -> {out}"
    )
    table = pq.read_table(out)
    assert table.schema == pa.schema(
        [("user_id", pa.string()), ("item_id", pa.string()), ("timestamp", pa.int64())]
    )
    assert table.slice(0, 3).to_pylist() == [
        {"user_id": "1", "item_id": "10", "timestamp": 1},
        {"user_id": "2", "item_id": "20", "timestamp": 2},
        {"user_id": "1", "item_id": "11", "timestamp": 3},
    ]
    assert table["timestamp"].to_pylist() == [1, 2, 3, 4, 5, 7, 8, 9, 10, 11]  # line 6: blank

    stats = run_prepare(str(out), time_unit="order")
    assert (stats["users"], stats["items"], stats["events"]) == (3, 10, 10)
    vocab = read_output(str(tmp_path / "out"), "vocab").to_pylist()
    raw = {row["index"]: row["item_id"] for row in vocab}
    sequences = {
        row["user_id"]: [raw[i] for i in row["train_items"]] + [raw[row["valid_item"]],
                                                               raw[row["test_item"]]]
        for row in read_output(str(tmp_path / "out"), "sequences").to_pylist()
    }  # fmt: skip
    assert sequences == {
        "1": ["10", "11", "12", "13"], "2": ["20", "21", "22"], "3": ["30", "31", "32"]
    }  # fmt: skip


def test_timestamps_are_kept_and_the_csv_reads_with_the_default_columns(tmp_path, spark):
    lines = ["u1\ti1\t1360000000", "u2 i2 1360086400.5", "u1  i2   1360172800"]
    src = tmp_path / "log.txt.gz"
    src.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))  # decompressed by name
    out = tmp_path / "events.csv"
    proc = convert(src, out)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("3 lines: 3 events (2 users, 2 items), 0 blank, 0 malformed")
    defaults = DataConfig()
    columns = {"user_col": defaults.user_col, "item_col": defaults.item_col,
               "time_col": defaults.time_col}  # fmt: skip
    rows = read_events(spark, str(out), str(out), "csv", columns).collect()
    assert [(r.user_id, r.item_id, r.timestamp) for r in rows] == [
        ("u1", "i1", 1360000000.0), ("u2", "i2", 1360086400.5), ("u1", "i2", 1360172800.0)
    ]  # fmt: skip


BAD = [
    ("u1 i1 100", None),
    ("u1", "line 2 'u1': expected 'user item' or 'user item timestamp', got 1 field(s)"),
    ("u1 i2 200 extra", "line 3 'u1 i2 200 extra': expected 'user item' or 'user item "
     "timestamp', got 4 field(s)"),
    ("u2 i1", "line 4 'u2 i1': 2 fields where the first event line has 3"),
    ("u2 i2 yesterday", "line 5 'u2 i2 yesterday': timestamp 'yesterday' is not a finite number"),
    ("u2 i3 inf", "line 6 'u2 i3 inf': timestamp 'inf' is not a finite number"),
    ("u2 i3 1e30", "line 7 'u2 i3 1e30': timestamp '1e30' is out of the int64 range"),
    ("u2 i3 300", None),
]  # fmt: skip


def test_a_malformed_line_stops_the_conversion_naming_it(tmp_path):
    for number, (line, problem) in enumerate(BAD, 1):
        if problem is None:
            continue
        src = write_lines(tmp_path / f"log{number}.txt", [BAD[0][0], *([""] * (number - 2)), line])
        out = tmp_path / f"events{number}.parquet"
        proc = convert(src, out)
        assert proc.returncode == 2 and proc.stdout == "", proc.stdout
        assert proc.stderr.splitlines() == [
            f"error: {src} {problem} (--skip-bad skips and counts such lines)"
        ]
        assert not out.exists()


def test_skip_bad_counts_and_names_every_skipped_line(tmp_path):
    src = tmp_path / "log.txt"
    body = "\n".join(line for line, _ in BAD) + "\n\xff\xfe 1\n\n"
    src.write_bytes(body.encode("utf-8").replace(b"\xc3\xbf\xc3\xbe", b"\xff\xfe"))
    out = tmp_path / "events.parquet"
    proc = convert(src, out, "--skip-bad")
    assert proc.returncode == 0, proc.stderr
    named = [problem for _, problem in BAD if problem][:3]
    assert proc.stderr.splitlines() == [
        f"skipped 7 malformed line(s) of {src}, first: " + "; ".join(named)
    ]  # 6 above + the line that is not UTF-8
    assert proc.stdout.strip() == (
        f"10 lines: 2 events (2 users, 2 items), 1 blank, 7 malformed skipped -> {out}"
    )
    assert pq.read_table(out).to_pylist() == [
        {"user_id": "u1", "item_id": "i1", "timestamp": 100},
        {"user_id": "u2", "item_id": "i3", "timestamp": 300},
    ]


@pytest.mark.parametrize(
    "lines, message",
    [
        (["", "  "], "holds no event line (2 lines: 2 blank, 0 malformed)"),
        (None, "[Errno 2] No such file or directory"),
    ],
)
def test_no_events_or_no_file_is_one_line(tmp_path, lines, message):
    src = tmp_path / "log.txt"
    if lines is not None:
        write_lines(src, lines)
    proc = convert(src, tmp_path / "events.parquet", "--skip-bad")
    assert proc.returncode == 2
    assert len(proc.stderr.splitlines()) == 1 and proc.stderr.startswith(f"error: {src}")
    assert message in proc.stderr
