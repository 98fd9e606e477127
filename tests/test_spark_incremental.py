"""Incremental prepare (data.base_dir): ids stable across versions, new items appended, each
user's history continued, the graph = previous (decayed) counts + the new pairs."""

from __future__ import annotations

import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mqsa_core.config import ConfigError, DataConfig
from spark_jobs.errors import PrepareError
from spark_jobs.prepare import main, prepare
from spark_jobs.progress import Progress
from tests.conftest import read_output
from tests.reference import reference_transitions
from tests.test_spark_bad_inputs import assert_accounted

BASE = [("a", "x", 1), ("a", "y", 2), ("a", "z", 3), ("a", "x", 4),
        ("b", "y", 1), ("b", "z", 2), ("b", "w", 3),
        ("c", "x", 1), ("c", "y", 2), ("c", "z", 3)]  # fmt: skip
NEW = [("a", "v", 11), ("a", "w", 10),  # a continues: w then v (time order, not file order)
       ("b", "u", 5),  # b continues with one event: its old validation item becomes train
       ("d", "v", 1), ("d", "u", 2), ("d", "x", 3), ("d", "t", 4),  # a new user
       ("e", "x", 1), ("e", "y", 2)]  # fmt: skip  # a new user with 2 events: dropped


def write_rows(path, rows) -> str:
    users, items, times = zip(*rows, strict=True)
    pq.write_table(pa.table({"user_id": users, "item_id": items, "timestamp": times}), path)
    return str(path)


def run(spark, events: str, out: str, **keys) -> dict:
    settings = {"num_files": 2, "paper_mode": False, "time_span": 2, **keys}
    cfg = DataConfig(events=events, dir=out, **settings)
    return prepare(cfg, spark, Progress(log=lambda line: None))


def outputs(out: str) -> tuple[dict, dict, dict]:
    """(item -> (index, count), user -> (train, valid, test) as raw ids, (src, dst) -> count)."""
    vocab = {v["item_id"]: (v["index"], v["count"]) for v in read_output(out, "vocab").to_pylist()}
    raw = {index: item for item, (index, _) in vocab.items()}
    seqs = {
        r["user_id"]: (
            [raw[i] for i in r["train_items"]],
            raw[r["valid_item"]],
            raw[r["test_item"]],
        )
        for r in read_output(out, "sequences").to_pylist()
    }
    edges = {(e["src"], e["dst"]): e["count"] for e in read_output(out, "transitions").to_pylist()}
    return vocab, seqs, edges


def test_ids_stable_new_items_appended_histories_continued(spark, tmp_path):
    base_dir, new_dir = str(tmp_path / "v1"), str(tmp_path / "v2")
    base_stats = run(spark, write_rows(tmp_path / "base.parquet", BASE), base_dir)
    new_events = write_rows(tmp_path / "new.parquet", NEW)
    stats = run(spark, new_events, new_dir, base_dir=base_dir)
    old_vocab, _, old_edges = outputs(base_dir)
    vocab, seqs, edges = outputs(new_dir)

    assert all(vocab[item][0] == index for item, (index, _) in old_vocab.items())
    n = len(old_vocab)  # u and v have 2 new events each (tie: id order), t has 1
    assert [vocab[i][0] for i in ("u", "v", "t")] == [n, n + 1, n + 2]
    assert sorted(index for index, _ in vocab.values()) == list(range(n + 3))
    assert {i: c for i, (_, c) in vocab.items()} == {
        "x": 3 + 1, "y": 3, "z": 3, "w": 1 + 1, "u": 2, "v": 2, "t": 1,
    }  # fmt: skip

    assert seqs == {
        "a": (["x", "y", "z", "x"], "w", "v"),
        "b": (["y", "z"], "w", "u"),
        "c": (["x"], "y", "z"),  # no new events: unchanged
        "d": (["v", "u"], "x", "t"),
    }
    # the train items the base did not train on (its valid and test items, the new events)
    rows = read_output(new_dir, "sequences").to_pylist()
    assert {r["user_id"]: r["new_targets"] for r in rows} == {"a": 2, "b": 1, "c": 0, "d": 2}
    assert stats["sequence_columns"] == ["new_targets"] and "sequence_columns" not in base_stats
    assert "new_targets" not in read_output(base_dir, "sequences").column_names
    assert (stats["users"], stats["items"], stats["new_users"], stats["new_items"]) == (4, 7, 1, 3)
    assert stats["dropped"]["short_users"] == 1 and stats["dropped"]["short_user_events"] == 2
    assert stats["new_events"] == 7 and stats["events"] == 10 + 7
    assert stats["base"]["dir"] == base_dir and stats["base"]["items"] == n
    assert stats["base"]["version"] == base_stats["version"] != stats["version"]  # warm start

    # decay 1, paper mode off: the graph equals a full count over the combined train parts
    trains = [([vocab[i][0] for i in train], [0.0] * len(train)) for train, _, _ in seqs.values()]
    assert edges == dict(reference_transitions(trains, time_span=2))
    new_pairs = {e: c - old_edges.get(e, 0) for e, c in edges.items()}
    decayed = run(spark, new_events, str(tmp_path / "v3"), base_dir=base_dir, transition_decay=0.4)
    expected = {e: int(old_edges.get(e, 0) * 0.4 + 0.5) + new_pairs.get(e, 0) for e in edges}
    assert outputs(str(tmp_path / "v3"))[2] == {e: c for e, c in expected.items() if c > 0}
    assert decayed["transition_decay"] == 0.4

    with pytest.raises(PrepareError, match=r"data.time_span: 1 \(base: 2\)"):
        run(spark, new_events, str(tmp_path / "v4"), base_dir=base_dir, time_span=1)
    with pytest.raises(ConfigError, match="data.kcore"):
        run(spark, new_events, str(tmp_path / "v4"), base_dir=base_dir, kcore=2)
    with pytest.raises(PrepareError, match="data.base_dir: .* not a complete prepared-data"):
        run(spark, new_events, str(tmp_path / "v4"), base_dir=str(tmp_path))
    assert not (tmp_path / "v4").exists()


# Against BASE: a's newest stored event is at 4, b's at 3, c's at 3.
AGAIN = [("a", "y", 2),  # held by the base: not added
         ("a", "q", 3),  # older than a's newest: late (q, a new item, is left without events)
         ("a", "z", 4),  # as old as a's newest but not held: added after it
         ("a", "v", 6),
         ("b", "w", 3), ("b", "w", 3),  # held (twice in the new log: both recognised)
         ("c", "x", 0),  # late
         ("f", "p", 1), ("f", "x", 2), ("f", "y", 3)]  # fmt: skip  # a new user: never late


def test_events_the_base_holds_or_that_come_late_are_counted_not_appended(spark, tmp_path):
    base_dir, new_dir, again_dir = (str(tmp_path / name) for name in ("v1", "v2", "v3"))
    run(spark, write_rows(tmp_path / "base.parquet", BASE), base_dir)
    log = write_rows(tmp_path / "new.parquet", AGAIN)
    stats = run(spark, log, new_dir, base_dir=base_dir)
    dropped = stats["dropped"]
    assert (dropped["base_duplicate_events"], dropped["late_events"]) == (3, 2)
    assert (dropped["late_items"], stats["new_items"], stats["new_events"]) == (1, 2, 5)
    assert stats["overlap"] == {"items": 7, "known_items": 4, "users": 4, "known_users": 3}
    assert_accounted(stats)
    vocab, seqs, _ = outputs(new_dir)
    assert "q" not in vocab and {"v", "p"} <= set(vocab)
    assert seqs["a"] == (["x", "y", "z", "x"], "z", "v") and seqs["f"] == (["p"], "x", "y")
    assert seqs["b"] == outputs(base_dir)[1]["b"] and seqs["c"] == outputs(base_dir)[1]["c"]
    times = {r["user_id"]: r["times"] for r in read_output(new_dir, "sequences").to_pylist()}
    assert times["a"] == [1, 2, 3, 4, 4, 6] and times["f"] == [1, 2, 3]

    # the same day's events again, against the output that holds them: nothing is added
    again = run(spark, log, again_dir, base_dir=new_dir)
    assert again["dropped"]["base_duplicate_events"] == 8 and again["dropped"]["late_events"] == 2
    assert again["new_events"] == again["new_items"] == again["new_users"] == 0
    assert outputs(again_dir) == outputs(new_dir)
    assert_accounted(again)


def test_a_base_of_another_log_is_refused(spark, tmp_path, capsys):
    base_dir = str(tmp_path / "v1")
    run(spark, write_rows(tmp_path / "base.parquet", BASE), base_dir)
    other = [(f"o{u}", f"k{i}", t) for u in range(3) for t, i in enumerate(range(u, u + 4))]
    log = write_rows(tmp_path / "other.parquet", other + [("a", "k9", 20)])  # one shared user
    with pytest.raises(PrepareError) as err:
        run(spark, log, str(tmp_path / "v2"), base_dir=base_dir)
    assert str(err.value) == (
        f"data.base_dir {base_dir} barely overlaps the new events: it holds 0 of their 7 items "
        "(0.0%) and 1 of their 4 users (25.0%), below data.base_min_overlap=0.1; is it the base "
        "of this log? Set data.base_min_overlap lower (0 = no check) to extend it anyway"
    )
    assert not (tmp_path / "v2").exists()
    config = tmp_path / "c.yaml"
    keys = {"events": log, "dir": tmp_path / "v2", "base_dir": base_dir, "paper_mode": "false",
            "time_span": 2, "spark_master": "local[2]"}  # fmt: skip
    config.write_text("data:\n" + "".join(f"  {key}: {value}\n" for key, value in keys.items()))
    assert main([str(config)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("[")]
    assert len(errors) == 1 and errors[0] == f"error: {err.value}"
    stats = run(spark, log, str(tmp_path / "v2"), base_dir=base_dir, base_min_overlap=0.0)
    assert stats["new_items"] == 7 and stats["overlap"]["known_items"] == 0


def test_bases_whose_times_cannot_be_compared_are_refused(spark, tmp_path):
    seconds = [(u, i, 1_600_000_000 + t) for u, i, t in BASE]
    base_dir = str(tmp_path / "v1")
    run(spark, write_rows(tmp_path / "base.parquet", seconds), base_dir)
    millis = write_rows(tmp_path / "ms.parquet", [(u, i, 1_600_000_100_000 + t) for u, i, t in NEW])
    with pytest.raises(PrepareError, match=r"timestamps are in ms but data.base_dir .* are in s"):
        run(spark, millis, str(tmp_path / "v2"), base_dir=base_dir)
    old = shutil.copytree(base_dir, tmp_path / "old")  # as an older version wrote it (a new path:
    for part in (old / "sequences").glob("*.parquet"):  # Spark caches the listing of v1)
        table = pq.read_table(part).drop_columns(["times"])  # and Spark's schema in its footer:
        pq.write_table(table.replace_schema_metadata(None), part)
        (part.parent / f".{part.name}.crc").unlink()  # Hadoop's checksum of the old bytes
    later = write_rows(tmp_path / "s.parquet", [(u, i, 1_600_000_100 + t) for u, i, t in NEW])
    with pytest.raises(PrepareError, match="holds no event times .* prepare it again from scratch"):
        run(spark, later, str(tmp_path / "v2"), base_dir=str(old))
    assert not (tmp_path / "v2").exists()


def test_the_time_gap_compares_stored_and_new_times(spark, tmp_path):
    """With data.max_time_gap the graph equals a brute-force count over the combined train parts
    with their times: pairs across the base's last event and the new ones included."""
    gapped = [("a", "p", 5), ("a", "q", 6), ("a", "r", 20), ("a", "s", 21), ("a", "t", 22),
              ("b", "x", 4), ("b", "y", 30), ("b", "z", 31)]  # fmt: skip
    base_dir, new_dir = str(tmp_path / "v1"), str(tmp_path / "v2")
    run(spark, write_rows(tmp_path / "base.parquet", BASE), base_dir, max_time_gap=2.0)
    run(spark, write_rows(tmp_path / "new.parquet", gapped), new_dir, base_dir=base_dir,
        max_time_gap=2.0)  # fmt: skip
    rows = read_output(new_dir, "sequences").to_pylist()
    trains = [(r["train_items"], r["times"][: len(r["train_items"])]) for r in rows]
    counted = reference_transitions(trains, time_span=2, max_gap=2.0)
    assert outputs(new_dir)[2] == dict(counted)
    assert len(counted) < len(reference_transitions(trains, time_span=2))  # the gap matters
