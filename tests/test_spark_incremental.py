"""Incremental prepare (data.base_dir): ids stable across versions, new items appended, each
user's history continued, the graph = previous (decayed) counts + the new pairs."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from core.config import ConfigError, DataConfig
from spark_jobs.errors import PrepareError
from spark_jobs.prepare import prepare
from spark_jobs.progress import Progress
from spark_jobs.reference import reference_transitions
from tests.conftest import read_output

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
