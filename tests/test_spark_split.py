"""The leave-one-out split, vocab and stats on handcrafted logs and against the reference."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from mqsa_core.prepared import read_stats
from spark_jobs.synth import SynthSpec, write_log
from tests.conftest import read_output
from tests.reference import reference_split

ROWS = [  # (user, item, timestamp) in file order
    ("a", "x", 3), ("a", "y", 1), ("a", "z", 2), ("a", "w", 2), ("a", "v", 5),
    ("b", "x", 10),  # one event: dropped
    ("c", "y", 7), ("c", "x", 8), ("c", "y", 9),  # a repeated item is kept
    ("d", "z", 1), ("d", "x", 1), ("d", "y", 1),  # all tied: input order
]  # fmt: skip


def write_rows(path, rows, names=("user_id", "item_id", "timestamp")) -> str:
    columns = list(zip(*rows, strict=True))
    pq.write_table(pa.table(dict(zip(names, columns, strict=True))), path)
    return str(path)


def sequences_by_user(out: str) -> dict:
    table = read_output(out, "sequences").to_pylist()
    return {r["user_id"]: (r["train_items"], r["valid_item"], r["test_item"]) for r in table}


def test_handcrafted_split(tmp_path, run_prepare):
    stats = run_prepare(write_rows(tmp_path / "events.parquet", ROWS))
    out = str(tmp_path / "out")
    vocab = read_output(out, "vocab").sort_by("index").to_pylist()
    assert [(v["item_id"], v["index"], v["count"]) for v in vocab] == [
        ("y", 0, 4), ("x", 1, 3), ("z", 2, 2), ("v", 3, 1), ("w", 4, 1),
    ]  # fmt: skip
    assert sequences_by_user(out) == {"a": ([0, 2, 4], 1, 3), "c": ([0], 1, 0), "d": ([2], 1, 0)}
    edges = read_output(out, "transitions").to_pylist()
    assert sorted((e["src"], e["dst"], e["count"]) for e in edges) == [(0, 2, 1), (2, 4, 1)]
    assert read_stats(out) == stats
    assert (stats["users"], stats["items"], stats["events"], stats["train_events"]) == (3, 5, 11, 5)
    assert stats["events_read"] == 12
    assert stats["dropped"]["short_users"] == 1 and stats["dropped"]["short_user_events"] == 1
    assert stats["num_transitions"] == 2


def test_iso_and_numeric_string_timestamps(tmp_path, run_prepare):
    csv = tmp_path / "events.csv"
    csv.write_text(
        "uid,iid,when\n"
        "u1,i1,2021-03-01T10:00:00Z\n"
        "u1,i2,2021-01-01 08:00:00\n"
        "u1,i3,2021-02-01\n"
        "u1,i4,yesterday\n"
        "u2,i1,1600000000\n"
        "u2,i2,1500000000\n"
        "u2,i3,1700000000\n"
    )
    stats = run_prepare(str(csv), user_col="uid", item_col="iid", time_col="when")
    out = str(tmp_path / "out")
    index = {v["item_id"]: v["index"] for v in read_output(out, "vocab").to_pylist()}
    seqs = sequences_by_user(out)
    assert seqs["u1"] == ([index["i2"]], index["i3"], index["i1"])
    assert seqs["u2"] == ([index["i2"]], index["i1"], index["i3"])
    assert stats["dropped"]["unparsable_timestamp"] == 1
    assert stats["format"] == "csv"


def test_matches_reference_on_synthetic_log(tmp_path, run_prepare):
    events = str(tmp_path / "log")
    write_log(events, SynthSpec(events=6000, users=300, items=80, seed=3))
    stats = run_prepare(events)
    rows = ds.dataset(events).to_table().to_pylist()  # part files in name order
    ref = reference_split((r["user_id"], r["item_id"], r["timestamp"]) for r in rows)
    out = str(tmp_path / "out")
    vocab = read_output(out, "vocab").sort_by("index").to_pylist()
    assert [(v["item_id"], v["count"]) for v in vocab] == ref.vocab()
    assert [v["index"] for v in vocab] == list(range(len(vocab)))
    raw = [v["item_id"] for v in vocab]
    got = {
        user: ([raw[i] for i in train], raw[valid], raw[test])
        for user, (train, valid, test) in sequences_by_user(out).items()
    }
    assert got == ref.split()
    assert stats["users"] == 300 and stats["events"] == 6000
    assert stats["train_events"] == 6000 - 2 * 300
    assert len(list((tmp_path / "out" / "sequences").glob("*.parquet"))) == 2


def test_kcore_iterates_to_a_fixed_point(tmp_path, run_prepare):
    baskets = {"u1": "abc", "u2": "abc", "u3": "abcd", "u4": "def", "u5": "abg"}
    rows = [(u, item, t) for u, items in baskets.items() for t, item in enumerate(items)]
    stats = run_prepare(write_rows(tmp_path / "e.parquet", rows), kcore=3)
    # round 1 drops the items d, e, f, g (and with them all of u4); round 2 drops u5 (a, b left)
    assert stats["dropped"]["kcore_items"] == 4 and stats["dropped"]["kcore_users"] == 2
    assert stats["dropped"]["kcore_events"] == 7
    assert (stats["users"], stats["items"], stats["events"]) == (3, 3, 9)
    assert set(sequences_by_user(str(tmp_path / "out"))) == {"u1", "u2", "u3"}


def test_kcore_peels_a_long_chain_one_round_at_a_time(tmp_path, run_prepare):
    # users p0..p19 each hold items q_i and q_{i+1}: with k=2 each round peels only the chain's
    # two ends, ~20 rounds (each round's plan read the previous one three times: the Java heap
    # ran out at 7 rounds before the plan was cut each round)
    core = [(f"c{u}", item, t) for u in range(3) for t, item in enumerate("XYZ")]
    chain = [(f"p{i}", f"q{i + j}", j) for i in range(20) for j in range(2)]
    stats = run_prepare(write_rows(tmp_path / "e.parquet", core + chain), kcore=2)
    assert stats["dropped"]["kcore_users"] == 20 and stats["dropped"]["kcore_items"] == 21
    assert (stats["users"], stats["items"], stats["events"]) == (3, 3, 9)
