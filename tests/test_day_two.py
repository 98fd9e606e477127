"""Day two end to end: prepare day one, train, export; prepare day two against day one
(``data.base_dir``), warm-start from day one (``train.init_from``), export again. Every raw item
id keeps its row across the two exports, the second export says which data it extends, and it
lists exactly the items added since. Then both rollbacks of docs/daily_updates.md: the last good
run exported again (a bad day's model), and the day prepared again from the last good data with
corrected events and trained from the last good run (a bad day's data)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from mqsa_core.config import DataConfig, load_config
from mqsa_core.prepared import DataError
from mqsa_ted.manifest import ADDED_ITEMS, read_manifest
from spark_jobs.prepare import prepare
from spark_jobs.progress import Progress
from tests.conftest import read_output
from trainer.data.sequences import load_sequences

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ["data.max_len=12", "model.dim=16", "train.batch_size=32", "train.epochs=1",
         "train.progress=false"]  # fmt: skip


def events(rng: np.random.Generator, users: range, items: int, start: int) -> pa.Table:
    """Every user walks ``items`` items with a planted successor, ``start`` the first time."""
    rows = []
    for u in users:
        item = int(rng.integers(items))
        for t in range(int(rng.integers(4, 12))):
            rows.append((f"u{u}", f"i{item}", start + t))
            item = (item * 7 + 3) % items if rng.random() < 0.7 else int(rng.integers(items))
    user, item, time = zip(*rows, strict=True)
    return pa.table({"user_id": user, "item_id": item, "timestamp": time})


def items_of(export: Path) -> dict[str, int]:
    version, _ = read_manifest(str(export))
    table = pq.read_table(f"{version}/items")
    return dict(zip(table.column("item_id").to_pylist(), table.column("index").to_pylist(),
                    strict=True))  # fmt: skip


def vectors_of(export: Path) -> dict[str, list[float]]:
    """Each raw item id's vector in the export's current version."""
    version, _ = read_manifest(str(export))
    table = pq.read_table(f"{version}/items")
    return dict(zip(table.column("item_id").to_pylist(), table.column("vector").to_pylist(),
                    strict=True))  # fmt: skip


def run_command(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{cmd}\n{proc.stderr[-3000:]}"


def export(run_dir: Path, out: Path) -> None:
    run_command([sys.executable, "-m", "mqsa_ted.export", str(run_dir), "--out", str(out),
                 "--faiss", "none"])  # fmt: skip


def train_and_export(data: Path, run_dir: Path, out: Path, *extra: str) -> None:
    run_command([sys.executable, "-m", "trainer.train", "/dev/null", f"data.dir={data}",
                 f"train.run_dir={run_dir}", *TRAIN, *extra])  # fmt: skip
    export(run_dir, out)


def check_new_targets(day1: Path, day2: Path) -> None:
    """The trainer reads how many of each user's last targets are new since day one, and
    refuses ``train.new_target_weight`` on data prepared without a base."""
    old = {
        r["user_id"]: len(r["train_items"]) for r in read_output(str(day1), "sequences").to_pylist()
    }
    rows = read_output(str(day2), "sequences").to_pylist()
    want = [len(r["train_items"]) - old.get(r["user_id"], 0) for r in rows]
    weighted = ["data.max_len=12", "train.new_target_weight=3"]
    day2_cfg, day1_cfg = (load_config(None, [f"data.dir={d}", *weighted]) for d in (day2, day1))
    got = load_sequences(day2_cfg.data, day2_cfg.train.new_target_weight).new_targets
    assert got.tolist() == want and 0 < sum(want) < sum(len(r["train_items"]) for r in rows)
    with pytest.raises(DataError, match="not prepared against a base"):
        load_sequences(day1_cfg.data, day1_cfg.train.new_target_weight)


def test_day_two_keeps_ids_and_lists_what_it_added(spark, tmp_path):
    rng = np.random.default_rng(3)
    day1, day2 = tmp_path / "day1.parquet", tmp_path / "day2.parquet"
    pq.write_table(events(rng, range(150), 60, 0), day1)  # 60 items
    # day two holds only the new events: 20 more items, old users continuing and new users
    pq.write_table(events(rng, range(100, 220), 80, 100), day2)
    quiet = Progress(log=lambda line: None)
    one = prepare(DataConfig(events=str(day1), dir=str(tmp_path / "v1"), max_len=12), spark, quiet)
    two = prepare(DataConfig(events=str(day2), dir=str(tmp_path / "v2"), max_len=12,
                             base_dir=str(tmp_path / "v1")), spark, quiet)  # fmt: skip
    assert two["new_items"] > 0 and two["base"]["version"] == one["version"]

    train_and_export(tmp_path / "v1", tmp_path / "run1", tmp_path / "export")
    before, good_vectors = items_of(tmp_path / "export"), vectors_of(tmp_path / "export")
    check_new_targets(tmp_path / "v1", tmp_path / "v2")
    warm = [f"train.init_from={tmp_path / 'run1'}", "train.new_target_weight=3"]
    train_and_export(tmp_path / "v2", tmp_path / "run2", tmp_path / "export", *warm)
    after = items_of(tmp_path / "export")

    assert {item: after[item] for item in before} == before  # the same row for every old id
    version, manifest = read_manifest(str(tmp_path / "export"))
    assert manifest.data["extends"] == one["version"]
    assert manifest.data["version"] == two["version"]
    added = pq.read_table(f"{version}/{ADDED_ITEMS}").to_pylist()
    assert {r["item_id"] for r in added} == set(after) - set(before)
    assert sorted(r["index"] for r in added) == list(range(len(before), len(after)))

    # a bad day's model: the last good run exported again into the same export URL
    export(tmp_path / "run1", tmp_path / "export")
    rolled, manifest = read_manifest(str(tmp_path / "export"))
    assert rolled != version and manifest.source.run == str(tmp_path / "run1")
    assert manifest.data["version"] == one["version"] and manifest.data["extends"] is None
    assert items_of(tmp_path / "export") == before  # day two's added items are gone
    assert vectors_of(tmp_path / "export") == good_vectors  # the good run's weights, bitwise

    # a bad day's data: the day prepared again from the last good data with corrected events
    # (here: without the events of five items that came in by mistake), replacing the bad
    # output in place
    bad = pa.array(sorted(set(after) - set(before))[:5])
    corrected = pq.read_table(day2).filter(~pc.is_in(pc.field("item_id"), bad))
    pq.write_table(corrected, tmp_path / "corrected.parquet")
    fixed = DataConfig(events=str(tmp_path / "corrected.parquet"), dir=str(tmp_path / "v2"),
                       max_len=12, base_dir=str(tmp_path / "v1"))  # fmt: skip
    three = prepare(fixed, spark, quiet)
    assert three["base"]["version"] == one["version"] != three["version"] != two["version"]
    assert three["dropped"]["base_duplicate_events"] == three["dropped"]["late_events"] == 0
    vocab = {
        r["item_id"]: r["index"] for r in read_output(str(tmp_path / "v2"), "vocab").to_pylist()
    }
    assert {item: vocab[item] for item in before} == before
    assert set(vocab) - set(before) == set(corrected.column("item_id").to_pylist()) - set(before)
    assert set(after) - set(vocab) == set(bad.to_pylist())  # the items of the bad events
    # the bad day's run is not a warm start for the corrected data: refused before training
    proc = subprocess.run(
        [sys.executable, "-m", "trainer.train", "/dev/null", f"data.dir={tmp_path / 'v2'}",
         f"train.run_dir={tmp_path / 'run4'}", *TRAIN, f"train.init_from={tmp_path / 'run2'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 2 and "not prepared against the data that run trained on" in (
        proc.stderr
    ), proc.stderr[-3000:]
    train_and_export(tmp_path / "v2", tmp_path / "run3", tmp_path / "export", *warm)
    _, manifest = read_manifest(str(tmp_path / "export"))
    assert (
        manifest.data["extends"] == one["version"] and manifest.data["version"] == three["version"]
    )
    assert {
        item: index for item, index in items_of(tmp_path / "export").items() if item in before
    } == before
