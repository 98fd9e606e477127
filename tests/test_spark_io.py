"""fsspec URLs (memory:// in and out), the atomic commit and the output readers."""

from __future__ import annotations

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from core.config import DataConfig
from core.prepared import COMPLETE_MARKER, DataError, dataset_files, read_stats
from spark_jobs.errors import PrepareError
from spark_jobs.io import staged_output
from spark_jobs.prepare import prepare
from spark_jobs.progress import Progress
from spark_jobs.synth import SynthSpec, write_log
from tests.conftest import read_output


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
        with staged_output(str(out)) as staging:
            staging.write_json("stats.json", {"v": value})
        assert read_stats(str(out)) == {"v": value}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(PrepareError, match="refusing"):
        staged_output(str(precious)).__enter__()
    assert (precious / "notes.txt").read_text() == "keep me"


def test_failed_job_leaves_no_partial_output(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError), staged_output(str(out)) as staging:
        staging.write_json("stats.json", {})
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_readers_require_the_commit_marker(tmp_path):
    (tmp_path / "d" / "sequences").mkdir(parents=True)
    pq.write_table(pa.table({"x": [1]}), tmp_path / "d" / "sequences" / "part-0.parquet")
    with pytest.raises(DataError, match=COMPLETE_MARKER):
        dataset_files(str(tmp_path / "d"), "sequences")
    with pytest.raises(DataError, match=COMPLETE_MARKER):
        read_stats(str(tmp_path / "d"))
