"""Bad input: clear PrepareErrors, or drops counted in stats.json. Nothing vanishes uncounted."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from spark_jobs.clean import ROW_REASONS
from spark_jobs.errors import PrepareError
from spark_jobs.prepare import main
from tests.conftest import read_output

GOOD = [("u1", "a", 1), ("u1", "b", 2), ("u1", "c", 3), ("u2", "a", 1), ("u2", "c", 2),
        ("u2", "b", 3)]  # fmt: skip


def write_table(path, columns: dict) -> str:
    pq.write_table(pa.table(columns), path)
    return str(path)


def rows_table(path, rows, ts_type=None) -> str:
    users, items, times = zip(*rows, strict=True)
    return write_table(
        path,
        {"user_id": pa.array(users, pa.string()), "item_id": pa.array(items, pa.string()),
         "timestamp": pa.array(times, ts_type or pa.int64())},
    )  # fmt: skip


def assert_accounted(stats: dict) -> None:
    """Every row read is either in the sequences or counted under a drop reason."""
    dropped = stats["dropped"]
    lost = sum(dropped[r] for r in ROW_REASONS) + dropped["duplicate_events"]
    lost += dropped["kcore_events"] + dropped["short_user_events"]
    assert stats["events_read"] == stats["events"] + lost


def test_nulls_are_counted(tmp_path, run_prepare):
    rows = GOOD + [(None, "a", 4), ("u1", None, 5), ("u2", "a", None), (None, None, None)]
    stats = run_prepare(rows_table(tmp_path / "e.parquet", rows))
    assert stats["dropped"]["null_user"] == 2  # a row is counted under its first reason
    assert stats["dropped"]["null_item"] == 1
    assert stats["dropped"]["null_timestamp"] == 1
    assert stats["events"] == 6
    assert_accounted(stats)


def test_duplicates_dropped_with_dedup(tmp_path, run_prepare):
    path = rows_table(tmp_path / "e.parquet", GOOD + [("u1", "a", 1), ("u1", "a", 1)])
    stats = run_prepare(path, dedup=True)
    assert stats["dropped"]["duplicate_events"] == 2
    assert stats["events"] == 6
    assert_accounted(stats)
    kept = run_prepare(path)  # without dedup the duplicates are ordinary events
    assert kept["events"] == 8 and kept["dropped"]["duplicate_events"] == 0


def test_non_numeric_timestamps(tmp_path, run_prepare):
    rows = [(u, i, str(t)) for u, i, t in GOOD] + [("u1", "d", "soon"), ("u2", "d", "")]
    stats = run_prepare(rows_table(tmp_path / "e.parquet", rows, pa.string()))
    assert stats["dropped"]["unparsable_timestamp"] == 2
    assert stats["events"] == 6
    nan = rows_table(tmp_path / "f.parquet", [*GOOD, ("u1", "d", float("nan"))], pa.float64())
    assert run_prepare(nan)["dropped"]["unparsable_timestamp"] == 1


def test_one_event_users_dropped_and_all_short_is_an_error(tmp_path, run_prepare):
    stats = run_prepare(rows_table(tmp_path / "e.parquet", [*GOOD, ("u3", "a", 1)]))
    assert stats["dropped"]["short_users"] == 1 and stats["dropped"]["short_user_events"] == 1
    assert_accounted(stats)
    with pytest.raises(PrepareError, match="no events left"):
        run_prepare(rows_table(tmp_path / "s.parquet", [("u1", "a", 1), ("u2", "a", 1)]))


def test_empty_inputs(tmp_path, run_prepare):
    schema_only = rows_table(tmp_path / "e.parquet", [("u", "a", 1)])
    pq.write_table(pq.read_table(schema_only).slice(0, 0), schema_only)
    with pytest.raises(PrepareError, match="input is empty"):
        run_prepare(schema_only)
    (tmp_path / "empty_dir.parquet").mkdir()
    with pytest.raises(PrepareError, match="input is empty"):
        run_prepare(str(tmp_path / "empty_dir.parquet"))
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(PrepareError, match="empty"):
        run_prepare(str(tmp_path / "empty.csv"))


def test_missing_column_names_it_and_lists_the_others(tmp_path, run_prepare):
    path = write_table(tmp_path / "e.parquet", {"user_id": ["u"], "item": ["a"], "ts": [1]})
    with pytest.raises(PrepareError) as err:
        run_prepare(path)
    message = str(err.value)
    assert "'item_id' (data.item_col)" in message and "user_id, item, ts" in message


def test_missing_file_and_unknown_format(tmp_path, run_prepare):
    with pytest.raises(PrepareError, match="not found"):
        run_prepare(str(tmp_path / "nope.parquet"))
    (tmp_path / "events.txt").write_text("x")
    with pytest.raises(PrepareError, match="data.format"):
        run_prepare(str(tmp_path / "events.txt"))


def test_mixed_type_ids_become_strings(tmp_path, run_prepare):
    lines = [
        {"user_id": 1, "item_id": 10, "timestamp": 1},
        {"user_id": 1, "item_id": "b", "timestamp": 2},
        {"user_id": 1, "item_id": 10, "timestamp": 3},
        {"user_id": "x", "item_id": "10", "timestamp": 1},
        {"user_id": "x", "item_id": 7, "timestamp": 2},
        {"user_id": "x", "item_id": "b", "timestamp": 3},
    ]
    path = tmp_path / "events.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n{broken\n")
    stats = run_prepare(str(path))
    vocab = read_output(str(tmp_path / "out"), "vocab")
    assert vocab.schema.field("item_id").type == pa.string()
    assert sorted(vocab.to_pydict()["item_id"]) == ["10", "7", "b"]  # 10 and "10" are one item
    assert stats["users"] == 2 and stats["dropped"]["malformed_row"] == 1
    assert_accounted(stats)


def test_cli_reports_errors_without_traceback(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("data:\n  max_len: fifty\n")
    assert main([str(config)]) == 2
    assert "data.max_len" in capsys.readouterr().err
    config.write_text("data:\n  events: x.parquet\n  time_span: 0\n")
    assert main([str(config)]) == 2
    assert "'data.time_span' must be >= 1" in capsys.readouterr().err
    config.write_text(f"data:\n  events: {tmp_path / 'missing.parquet'}\n")
    assert main([str(config), f"data.dir={tmp_path / 'out'}"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: input not found") and "Traceback" not in err
