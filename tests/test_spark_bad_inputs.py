"""Bad input: clear PrepareErrors, or drops counted in stats.json. Nothing vanishes uncounted."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mqsa_core.config import DataConfig
from spark_jobs.clean import ROW_REASONS
from spark_jobs.errors import PrepareError
from spark_jobs.prepare import main, prepare
from spark_jobs.progress import Progress
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
    """Every row read is either in the sequences or counted under a drop reason, and every item
    read is in the vocab or counted under the filter that took its last event."""
    dropped = stats["dropped"]
    lost = sum(dropped[r] for r in ROW_REASONS) + dropped["duplicate_events"]
    lost += dropped["kcore_events"] + dropped["short_user_events"]
    lost += dropped["base_duplicate_events"] + dropped["late_events"]
    assert stats["events_read"] == stats.get("new_events", stats["events"]) + lost
    gone = dropped["row_drop_items"] + dropped["kcore_items"] + dropped["short_user_items"]
    gone += dropped["late_items"]
    if "base" in stats:  # the new log's items: held by the base, or new ones
        kept = stats["overlap"]["known_items"] + stats["new_items"]
    else:
        kept = stats["items"]
    assert stats["items_read"] == kept + gone


def test_nulls_are_counted(tmp_path, run_prepare):
    rows = GOOD + [(None, "a", 4), ("u1", None, 5), ("u2", "a", None), (None, None, None)]
    rows += [("", "a", 6), (" \t", "b", 7), ("u1", "", 8)]  # empty or blank ids are missing
    stats = run_prepare(rows_table(tmp_path / "e.parquet", rows))
    assert stats["dropped"]["null_user"] == 4  # a row is counted under its first reason
    assert stats["dropped"]["null_item"] == 2
    assert stats["dropped"]["null_timestamp"] == 1
    assert stats["events"] == 6
    assert_accounted(stats)


def test_item_drops_are_named_where_they_happen(tmp_path, spark):
    """The logged item counts add up: read, vocab, k-core and sequences name every item lost."""
    rows = GOOD + [("u3", "gone", None), ("u3", "gone", "later"), (" ", "gone", 5)]  # no kept row
    rows += [("u4", "solo", 1)]  # only in a user with one event
    rows += [("u5", "a", 1), ("u5", "b", 2), ("u5", "rare", 3)]  # rare: one event (k-core 2)
    rows = [(user, item, None if t is None else str(t)) for user, item, t in rows]
    path = rows_table(tmp_path / "e.parquet", rows, pa.string())
    for kcore, dropped in ((0, {"short_user_items": 1}), (2, {"kcore_items": 2})):
        lines: list[str] = []
        cfg = DataConfig(events=path, dir=str(tmp_path / f"out{kcore}"), num_files=2, kcore=kcore)
        stats = prepare(cfg, spark, Progress(log=lines.append))
        assert stats["items_read"] == 6 and stats["dropped"]["row_drop_items"] == 1
        assert {k: stats["dropped"][k] for k in dropped} == dropped
        assert stats["items"] == 6 - 1 - sum(dropped.values())
        assert_accounted(stats)
        logged = {line.split(":")[0]: line for line in lines}
        assert "items=6, row_drop_items=1," in logged["[prepare] read"]
        if kcore:
            assert "kcore_items=2" in logged["[prepare] kcore"]
            assert f"items={stats['items']} " in logged["[prepare] vocab"]
        else:
            assert "items=5 " in logged["[prepare] vocab"]
            assert f"short_user_items=1, items={stats['items']} " in logged["[prepare] sequences"]


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
        {"user_id": "", "item_id": "b", "timestamp": 4},
        {"user_id": "x", "item_id": " ", "timestamp": 5},
    ]
    path = tmp_path / "events.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n{broken\n")
    stats = run_prepare(str(path))
    vocab = read_output(str(tmp_path / "out"), "vocab")
    assert vocab.schema.field("item_id").type == pa.string()
    assert sorted(vocab.to_pydict()["item_id"]) == ["10", "7", "b"]  # 10 and "10" are one item
    assert stats["users"] == 2 and stats["dropped"]["malformed_row"] == 1
    assert stats["dropped"]["null_user"] == 1 and stats["dropped"]["null_item"] == 1
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
    assert main([str(config), f"data.dir={tmp_path / 'out'}"]) == 2  # every UserError: 2
    err = capsys.readouterr().err
    assert err.startswith("error: input not found") and "Traceback" not in err


def test_csv_is_read_as_rfc_4180(tmp_path, run_prepare):
    """Quoted fields may hold newlines, commas and doubled quotes; blank ids are missing."""
    path = tmp_path / "events.csv"
    path.write_text(
        'user_id,item_id,timestamp\n"u\nnl",a,1\n"u\nnl",b,2\n"u\nnl",c,3\n'
        'v,a,1\nv,"b ""x"", y",2\nv,c,3\n"",a,4\n" ",b,5\nv,"",6\n'
    )
    stats = run_prepare(str(path))
    users = sorted(read_output(str(tmp_path / "out"), "sequences").to_pydict()["user_id"])
    assert users == ["u\nnl", "v"]
    items = sorted(read_output(str(tmp_path / "out"), "vocab").to_pydict()["item_id"])
    assert items == ["a", "b", 'b "x", y', "c"]
    assert stats["events_read"] == 9 and stats["events"] == 6
    assert stats["dropped"]["null_user"] == 2 and stats["dropped"]["null_item"] == 1


def test_mixed_timestamp_units_are_refused(tmp_path, run_prepare):
    """Epoch seconds mixed with milliseconds: refused, naming the column and both ranges,
    unless declared; a declared unit converts ISO strings to it."""
    seconds = [("u1", "a", 1_600_000_000), ("u1", "b", 1_600_000_100)]
    millis = [("u1", "c", 1_600_000_050_000), ("u2", "a", 1_600_000_000_000),
              ("u2", "b", 1_600_000_100_000), ("u2", "c", 1_600_000_200_000)]  # fmt: skip
    path = rows_table(tmp_path / "e.parquet", seconds + millis)
    with pytest.raises(PrepareError) as err:
        run_prepare(path)
    message = str(err.value)
    assert "timestamp column 'timestamp' mixes units" in message
    assert "2 numbers that look like seconds since the epoch (1600000000..1600000100" in message
    assert "4 numbers that look like milliseconds" in message and "data.time_unit" in message
    with pytest.raises(PrepareError, match="data.time_unit is ms .* look like seconds"):
        run_prepare(path, time_unit="ms")
    # the ISO event is u1's latest (12:28:00 = 1600000080000 ms): its test item once converted
    iso = [("u1", "a", "2020-09-13T12:28:00Z")] + [(u, i, str(t)) for u, i, t in millis]
    iso.append(("u1", "b", "1600000020000"))
    path = rows_table(tmp_path / "iso.parquet", iso, pa.string())
    with pytest.raises(PrepareError, match="set data.time_unit: ms"):
        run_prepare(path)
    stats = run_prepare(path, time_unit="ms")
    assert stats["time_unit_seen"] == "ms" and stats["timestamps_per_unit"]["parsed"] == 1
    out = str(tmp_path / "out")
    index = {v["item_id"]: v["index"] for v in read_output(out, "vocab").to_pylist()}
    seqs = {r["user_id"]: r for r in read_output(out, "sequences").to_pylist()}
    assert (seqs["u1"]["valid_item"], seqs["u1"]["test_item"]) == (index["c"], index["a"])


def test_not_a_parquet_file_names_the_file(tmp_path, capsys):
    """A CSV named .parquet: the root cause (not the JVM's wrapper) in one line, exit 2."""
    path = tmp_path / "events.parquet"
    path.write_text("user_id,item_id,timestamp\nu,a,1\n")
    config = tmp_path / "c.yaml"
    config.write_text(f"data:\n  events: {path}\n  dir: {tmp_path / 'out'}\n")
    assert main([str(config), "data.spark_master=local[2]"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("[")]
    assert len(err) == 1 and "is not a Parquet file" in err[0] and str(path) in err[0]
    assert err[0].startswith("error: ") and "awaitResult" not in err[0]
