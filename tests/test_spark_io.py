"""fsspec URLs (memory:// in and out), the atomic commit, what the job may delete, and the
output readers."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mqsa_core.config import DataConfig
from mqsa_core.lease import LeaseHeld
from mqsa_core.prepared import COMPLETE_MARKER, DataError, dataset_files, read_stats
from spark_jobs.errors import PrepareError
from spark_jobs.io import OutputStaging, staged_output
from spark_jobs.ownership import OWNER_MARKER, STALE_AFTER_S, mark_owned
from spark_jobs.prepare import PREPARED_DATA, main, prepare
from spark_jobs.progress import Progress
from spark_jobs.synth import SynthSpec, write_log
from tests.conftest import read_output

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_memory_urls_round_trip(spark, tmp_path):
    fs = fsspec.filesystem("memory")
    write_log("memory://rt/events", SynthSpec(events=600, users=40, items=20, seed=5))
    cfg = DataConfig(events="memory://rt/events", dir="memory://rt/prepared", num_files=3)
    lines: list[str] = []
    stats = prepare(cfg, spark, Progress(log=lines.append))
    assert read_stats("memory://rt/prepared") == stats
    assert stats["users"] == 40 and stats["events"] == 600
    files = dataset_files("memory://rt/prepared", "sequences")
    assert len(files) == 3 and all(f.startswith("memory://") for f in files)
    assert read_output("memory://rt/prepared", "sequences").num_rows == 40
    assert any(line.startswith("[prepare] sequences:") for line in lines)
    assert not [p for p in fs.ls("/rt", detail=False) if "staging" in p or ".old-" in p]


def test_commit_replaces_an_earlier_output_only(tmp_path):
    out = tmp_path / "out"
    for value in (1, 2):
        with staged_output(str(out), PREPARED_DATA) as staging:
            staging.write_json("stats.json", {"v": value})
        assert read_stats(str(out)) == {"v": value}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(PrepareError, match="refusing"):
        staged_output(str(precious), PREPARED_DATA).__enter__()
    assert (precious / "notes.txt").read_text() == "keep me"
    with pytest.raises(PrepareError, match="synthetic-events"):  # ours, but another kind
        staged_output(str(out), "synthetic-events").__enter__()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "precious"]


def test_prepare_replaces_only_what_it_wrote(tmp_path, capsys):
    """A user's folder holding a stats.json, and an output of the version without ownership
    markers (_COMPLETE, no marker), are refused: exit 2, one line, nothing touched."""
    events = str(tmp_path / "events.parquet")
    pq.write_table(
        pa.table({"user_id": ["u"] * 3, "item_id": ["a", "b", "c"], "timestamp": [1, 2, 3]}), events
    )
    mine = tmp_path / "mine"
    (mine / "notes").mkdir(parents=True)
    (mine / "important.txt").write_text("keep me")
    (mine / "stats.json").write_text("{}")
    config = tmp_path / "c.yaml"
    config.write_text(f"data:\n  events: {events}\n  num_files: 1\n  spark_master: local[2]\n")
    assert main([str(config), f"data.dir={mine}"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("[")]
    assert len(err) == 1 and err[0].startswith(
        f"error: refusing to replace the existing directory {mine}"
    )
    assert sorted(p.name for p in mine.iterdir()) == ["important.txt", "notes", "stats.json"]
    old = tmp_path / "old"
    old.mkdir()
    (old / COMPLETE_MARKER).write_text("")
    (old / "stats.json").write_text("{}")
    with pytest.raises(PrepareError, match="earlier version.*delete it yourself"):
        prepare(DataConfig(events=events, dir=str(old)), progress=Progress(log=lambda line: None))
    assert sorted(p.name for p in old.iterdir()) == [COMPLETE_MARKER, "stats.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml", "events.parquet", "mine", "old"]


def test_failed_job_leaves_no_partial_output(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError), staged_output(str(out), PREPARED_DATA) as staging:
        staging.write_json("stats.json", {})
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_staging_of_a_killed_prepare_is_swept(spark, tmp_path):
    """A prepare SIGKILLed while it writes leaves its staging directory; the next run on the
    same output removes it (and says so), while the staging of a live run stays."""
    events = str(tmp_path / "events.parquet")
    pq.write_table(
        pa.table(
            {
                "user_id": ["u"] * 3 + ["v"] * 3,
                "item_id": list("abcabc"),
                "timestamp": [1, 2, 3] * 2,
            }
        ),
        events,
    )
    out = tmp_path / "out"
    config = tmp_path / "c.yaml"
    config.write_text(
        f"data:\n  events: {events}\n  dir: {out}\n  num_files: 1\n  spark_master: local[1]\n"
    )
    env = {**os.environ, "PYTHONPATH": ROOT}
    command = [sys.executable, "-m", "spark_jobs.prepare", str(config)]
    proc = subprocess.Popen(
        command, cwd=ROOT, env=env, start_new_session=True, stderr=subprocess.DEVNULL
    )

    def writing() -> bool:  # the staging directory holds a first finished entry
        return any(
            ".tmp-" not in e.name for d in tmp_path.glob(".out.staging-*") for e in d.iterdir()
        )

    deadline = time.monotonic() + 300
    try:
        while not writing():
            assert proc.poll() is None and time.monotonic() < deadline, (
                "prepare never started writing"
            )
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert list(tmp_path.glob(".out.staging-*"))
    lines: list[str] = []
    prepare(DataConfig(events=events, dir=str(out), num_files=1), spark, Progress(log=lines.append))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []
    assert any(line.startswith("[prepare] output:") and "removed=1" in line for line in lines)
    assert read_stats(str(out))["users"] == 2

    live = OutputStaging(str(out), PREPARED_DATA)  # a run in progress (this process, alive)
    live.start()
    try:  # a second run on the output is refused by the live one's lease, touching nothing
        with pytest.raises(LeaseHeld, match="is in use by another job"):
            with staged_output(str(out), PREPARED_DATA):
                pass
        assert os.path.isdir(live.staging) and os.path.isfile(live.lock.path)
    finally:
        live.cleanup()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


def test_sweep_judges_each_leftover(tmp_path):
    """Other hosts: a heartbeat older than STALE_AFTER_S is dead, a fresh one is live. A
    leftover without our marker stays. A run killed between the two renames of its commit
    gets the previous output renamed back."""
    now = time.time()

    def leftover(token: str, what: str, owned: bool, heartbeat: float | None) -> None:
        path = tmp_path / f".out.{what}-{token}"
        path.mkdir()
        (path / COMPLETE_MARKER).write_text("")
        if owned:
            mark_owned(str(path), PREPARED_DATA)
        if heartbeat is not None:
            lock = {
                "pid": 1,
                "host": f"not-{socket.gethostname()}",
                "started": 0,
                "heartbeat": heartbeat,
            }
            (tmp_path / f".out.lock-{token}").write_text(json.dumps(lock))

    leftover("a" * 12, "staging", True, now - STALE_AFTER_S - 60)  # dead: removed
    leftover("b" * 12, "staging", True, now - 5)  # live elsewhere: kept
    leftover("c" * 12, "staging", False, None)  # not ours: kept
    leftover("d" * 12, "old", True, None)  # the previous output, set aside: renamed back
    leftover("d" * 12, "staging", True, None)  # the new one of that run: removed
    with staged_output(str(tmp_path / "out"), PREPARED_DATA) as staging:
        assert staging.swept == {"removed": 2, "restored": 1, "running": 1, "not_ours": 1}
        assert (tmp_path / "out" / COMPLETE_MARKER).exists()
        staging.write_json("stats.json", {"v": 1})  # the restored output is ours to replace
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == [
        ".out.lock-" + "b" * 12,
        ".out.staging-" + "b" * 12,
        ".out.staging-" + "c" * 12,
        "out",
    ]
    assert (
        read_stats(str(tmp_path / "out")) == {"v": 1} and (tmp_path / "out" / OWNER_MARKER).exists()
    )


def test_readers_require_the_commit_marker(tmp_path):
    (tmp_path / "d" / "sequences").mkdir(parents=True)
    pq.write_table(pa.table({"x": [1]}), tmp_path / "d" / "sequences" / "part-0.parquet")
    with pytest.raises(DataError, match=COMPLETE_MARKER):
        dataset_files(str(tmp_path / "d"), "sequences")
    with pytest.raises(DataError, match=COMPLETE_MARKER):
        read_stats(str(tmp_path / "d"))
