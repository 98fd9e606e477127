"""The pipeline on ``s3://`` against a real S3 server on loopback (moto, tests/s3_server.py):
the event log, the prepared data, the run directory with its checkpoints, the export and
recommend's batch files all live in the bucket.

- prepare stages ``s3://`` through the driver when Spark has no S3A filesystem (the pip
  pyspark ships no hadoop-aws), says so in one progress line, and writes what local mode writes;
- which URLs Spark's executors reach themselves is asked of the session's JVM (the boundary);
- training on ``s3://`` checkpoints into the bucket and a resume from there reproduces an
  uninterrupted local run;
- export and recommend on ``s3://`` serve what a local export serves;
- a write that fails mid-export (the server answering errors) leaves the previous export the
  committed, readable one, and the next export cleans up.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs
import torch

import mqsa_ted.export
import mqsa_ted.recommend
from mqsa_core.config import load_config
from mqsa_core.prepared import read_stats
from mqsa_core.storage import load_state
from mqsa_ted.manifest import read_manifest
from spark_jobs.io import route
from spark_jobs.prepare import prepare
from spark_jobs.progress import Progress
from spark_jobs.synth import SynthSpec, write_log
from tests.prepared_compare import assert_same_datasets
from tests.s3_server import S3Server

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "mqsa-cloud"
S3 = f"s3://{BUCKET}"
NO_S3A = "staged via the driver (no Hadoop FileSystem for s3a:// on Spark's classpath)"
RUN_CONFIG = f"""\
data:
  events: {S3}/events
  dir: {S3}/prepared
  num_files: 2
  max_len: 12
  spark_master: local[2]
model:
  dim: 16
train:
  epochs: 2
  batch_size: 32
  run_dir: {S3}/runs/a
  progress: false
  threads: 1
checkpoint:
  every: 3
  keep: 2
"""


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    """One S3 server for the module, reachable as ``s3://`` by this process and its children;
    the bucket created."""
    server = S3Server().start()
    with pytest.MonkeyPatch.context() as env:
        for key, value in server.environ().items():
            env.setenv(key, value)
        s3fs.S3FileSystem.clear_instance_cache()  # a cached client would keep another endpoint
        fsspec.filesystem("s3").mkdir(BUCKET)
        yield server
    s3fs.S3FileSystem.clear_instance_cache()
    server.stop()


def bucket() -> fsspec.AbstractFileSystem:
    """The s3 filesystem, its listings re-read (another process may have written since)."""
    fs = fsspec.filesystem("s3")
    fs.invalidate_cache()
    return fs


def run(*argv: str) -> subprocess.CompletedProcess:
    """``python -m mqsa_ted.cli ARGV`` in a subprocess (it inherits the server's environment)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "mqsa_ted.cli", *argv]
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{argv}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


def comparable(url: str) -> dict:
    """A run's metrics.json without the wall-clock fields."""
    with fsspec.open(url, "r") as f:
        metrics = json.load(f)
    for record in metrics["epochs"]:
        record.pop("seconds"), record.pop("eval_seconds", None)
    return metrics


@pytest.fixture(scope="module")
def pipeline(s3, spark) -> dict:
    """The event log written to the bucket, prepared there (progress lines kept) and trained
    there for 2 epochs on 2 processes (``mqsa-ted train`` with the config in the bucket)."""
    write_log(f"{S3}/events", SynthSpec(events=3000, users=150, items=60, seed=5))
    config = f"{S3}/configs/run.yaml"
    with fsspec.open(config, "w") as f:
        f.write(RUN_CONFIG)
    lines: list[str] = []
    stats = prepare(load_config(config).data, spark, Progress(log=lines.append))
    run("train", config)
    return {"config": config, "lines": lines, "stats": stats, "run": f"{S3}/runs/a"}


def test_route_asks_the_session_which_schemes_it_reads(spark, tmp_path):
    """Local paths go to the executors; s3:// does only when the JVM has an S3A filesystem
    (here it has none: staged via the driver); fsspec-only schemes are always staged."""
    local = route(spark, str(tmp_path / "events"))
    assert (local.spark_url, str(local)) == (str(tmp_path / "events"), "executors (local)")
    assert str(route(spark, "s3://bucket/events")) == NO_S3A
    assert route(spark, "s3a://bucket/events").spark_url is None
    memory = route(spark, "memory://x/events")
    assert str(memory) == "staged via the driver (memory:// is no Hadoop filesystem)"
    hdfs = route(spark, "hdfs://namenode:8020/events")
    assert hdfs.spark_url == "hdfs://namenode:8020/events"
    assert str(hdfs) == "executors (hdfs:// by DistributedFileSystem)"
    # a session whose Hadoop configuration names an S3A implementation that is on its classpath
    # (here Hadoop's local filesystem stands in for hadoop-aws) reads s3:// as s3a:// itself
    conf = spark.sparkContext._jsc.hadoopConfiguration()
    before = conf.get("fs.s3a.impl")
    conf.set("fs.s3a.impl", "org.apache.hadoop.fs.RawLocalFileSystem")
    try:
        connected = route(spark, "s3://bucket/events")
    finally:
        conf.set("fs.s3a.impl", before)
    assert connected.spark_url == "s3a://bucket/events"
    assert str(connected) == "executors (s3a:// by RawLocalFileSystem)"
    assert str(route(spark, "s3://bucket/events")) == NO_S3A


def test_prepare_on_s3_is_staged_through_the_driver_and_matches_local_mode(
    pipeline, spark, tmp_path
):
    assert f"[prepare] io: events={NO_S3A}, dir={NO_S3A}" in pipeline["lines"]
    # the same log prepared from a local copy: Spark reads and writes it itself
    bucket().get(f"{BUCKET}/events", str(tmp_path / "events"), recursive=True)
    cfg = load_config(pipeline["config"], [f"data.events={tmp_path / 'events'}",
                                           f"data.dir={tmp_path / 'prepared'}"]).data  # fmt: skip
    lines: list[str] = []
    local_stats = prepare(cfg, spark, Progress(log=lines.append))
    assert "[prepare] io: events=executors (local), dir=executors (local)" in lines
    remote = f"{S3}/prepared"
    assert_same_datasets(remote, str(tmp_path / "prepared"))
    differ = {"version", "source"}
    assert {k: v for k, v in read_stats(remote).items() if k not in differ} == {
        k: v for k, v in local_stats.items() if k not in differ
    }
    assert read_stats(remote)["users"] == 150
    names = [p.rsplit("/", 1)[1] for p in bucket().find(f"{BUCKET}/prepared")]
    assert "_COMPLETE" in names and not [n for n in names if n.endswith(".crc")]
    assert not [p for p in bucket().ls(BUCKET) if ".prepared." in p]  # no staging, lock, aside


def test_training_on_s3_checkpoints_there_and_a_resume_matches_a_straight_run(pipeline, tmp_path):
    run_dir = pipeline["run"]
    files = {p.removeprefix(f"{BUCKET}/runs/a/") for p in bucket().find(f"{BUCKET}/runs/a")}
    assert {"config.yaml", "metrics.json", "model.pt", ".mqsa-ted-owned"} <= files
    done = sorted(p.split("/")[1] for p in files
                  if p.startswith("checkpoints/") and p.endswith("/COMPLETE"))  # fmt: skip
    assert len(done) == 2, files  # checkpoint.keep: the older ones were deleted in the bucket
    for step in done:
        for name in ("ds/mp_rank_00_model_states.pt", "rank-00000.pt", "rank-00001.pt"):
            assert f"checkpoints/{step}/{name}" in files
    # resume from the newest checkpoint in the bucket for one more epoch, into another run dir
    resumed, newest = f"{S3}/runs/resumed", f"{run_dir}/checkpoints/{done[-1]}"
    proc = run("train", pipeline["config"], "train.epochs=3", f"train.run_dir={resumed}",
               f"train.resume={newest}")  # fmt: skip
    assert f"resumed from {newest}: epoch 3, step 0" in proc.stdout + proc.stderr
    straight = tmp_path / "straight"
    run("train", pipeline["config"], "train.epochs=3", f"train.run_dir={straight}")
    assert comparable(f"{resumed}/metrics.json") == comparable(f"{straight}/metrics.json")
    got, want = load_state(f"{resumed}/model.pt"), load_state(f"{straight}/model.pt")
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0)


def test_export_and_recommend_on_s3_serve_what_a_local_export_serves(pipeline, tmp_path, capsys):
    run_dir = pipeline["run"]
    assert mqsa_ted.export.main([run_dir]) == 0  # default: <run_dir>/export, in the bucket
    assert mqsa_ted.export.main([run_dir, "--out", str(tmp_path / "export")]) == 0
    capsys.readouterr()
    remote, local = f"{run_dir}/export", str(tmp_path / "export")
    (remote_version, remote_manifest), (_, local_manifest) = map(read_manifest, (remote, local))
    assert remote_version.startswith(f"{S3}/runs/a/export/versions/")
    assert remote_manifest.source.run == local_manifest.source.run == run_dir
    assert remote_manifest.files == local_manifest.files  # the same bytes, file by file
    history = ["--history", "i000001,i000002,i000003", "--k", "5"]
    printed = []
    for export in (remote, local):
        assert mqsa_ted.recommend.main([export, *history]) == 0
        printed.append(capsys.readouterr().out)
    assert printed[0] == printed[1] and len(printed[0].splitlines()) == 5
    # --batch: histories read from the bucket, recommendations written there
    histories = pa.table({"user_id": ["a", "b"],
                          "history": [["i000001", "i000002"], ["i000010"]]})  # fmt: skip
    buffer = io.BytesIO()
    pq.write_table(histories, buffer)
    bucket().pipe(f"{BUCKET}/queries/histories.parquet", buffer.getvalue())
    args = ["--batch", f"{S3}/queries/histories.parquet", "--k", "4"]
    assert mqsa_ted.recommend.main([remote, *args, "--out", f"{S3}/queries/recs.parquet"]) == 0
    assert mqsa_ted.recommend.main([local, *args, "--out", str(tmp_path / "recs.parquet")]) == 0
    with fsspec.open(f"{S3}/queries/recs.parquet", "rb") as f:
        recs = pq.read_table(f)
    assert recs.num_rows == 2 and recs.equals(pq.read_table(tmp_path / "recs.parquet"))


def test_a_write_failing_mid_export_leaves_the_previous_export_committed(pipeline, s3, capsys):
    run_dir, out = pipeline["run"], f"{S3}/exports/faulty"
    versions = f"{BUCKET}/exports/faulty/versions"
    history = [out, "--history", "i000001,i000002,i000003", "--k", "5"]
    assert mqsa_ted.export.main([run_dir, "--out", out]) == 0
    first, _ = read_manifest(out)
    capsys.readouterr()
    assert mqsa_ted.recommend.main(history) == 0
    served = capsys.readouterr().out

    # the server fails every PUT of the encoder, written after the item parts (500, retried)
    with s3.failing("PUT", r"/exports/faulty/versions/[^/]+/user_encoder\.pt") as refused:
        assert mqsa_ted.export.main([run_dir, "--out", out]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: cannot write {out}/versions/"), err
    assert "user_encoder.pt" in err[0] and "injected by the test server" in err[0]
    assert refused  # the write did reach the server
    assert read_manifest(out)[0] == first
    assert mqsa_ted.recommend.main(history) == 0
    assert capsys.readouterr().out == served
    unfinished = [p for p in bucket().ls(versions) if not first.endswith(p.rsplit("/", 1)[1])]
    assert len(unfinished) == 1
    assert bucket().ls(unfinished[0], detail=False) == [f"{unfinished[0]}/_MQSA_EXPORT",
                                                        f"{unfinished[0]}/items"]  # fmt: skip

    # the last step, switching CURRENT to the new version, is denied
    with s3.failing("PUT", r"/exports/faulty/CURRENT$", code="AccessDenied") as refused:
        assert mqsa_ted.export.main([run_dir, "--out", out]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: cannot write {out}/CURRENT"), err
    assert refused == [f"PUT /{BUCKET}/exports/faulty/CURRENT"]
    assert read_manifest(out)[0] == first
    assert mqsa_ted.recommend.main(history) == 0
    assert capsys.readouterr().out == served
    assert len(bucket().ls(versions)) == 3
    assert not [p for p in bucket().ls(f"{BUCKET}/exports/faulty") if ".tmp-" in p]

    # the next export commits and removes the older versions, finished or not
    assert mqsa_ted.export.main([run_dir, "--out", out]) == 0
    last, _ = read_manifest(out)
    assert last != first and [p.rsplit("/", 1)[1] for p in bucket().ls(versions)] == [
        last.rsplit("/", 1)[1]
    ]
    capsys.readouterr()
    assert mqsa_ted.recommend.main(history) == 0
    assert capsys.readouterr().out == served


def test_a_sharded_run_on_s3_exports_from_its_table_snapshot_in_the_bucket(pipeline, tmp_path):
    """The catalogue path (configs/catalog.yaml): a TorchRec table, users streamed from the
    bucket, the best table's DCP snapshot written there; its export equals the export of a
    local copy of the run."""
    run_dir = f"{S3}/runs/sharded"
    overrides = ("embeddings.backend=torchrec", "data.stream=true", f"train.run_dir={run_dir}")
    run("train", pipeline["config"], *overrides)
    snapshots = [p for p in bucket().ls(f"{BUCKET}/runs/sharded") if "/best_table-e" in p]
    assert len(snapshots) == 1 and bucket().exists(f"{snapshots[0]}/COMPLETE")
    bucket().get(f"{BUCKET}/runs/sharded", str(tmp_path / "run"), recursive=True)
    run("export", run_dir)
    run("export", str(tmp_path / "run"), "--out", str(tmp_path / "export"))
    (_, remote), (_, local) = (
        read_manifest(f"{run_dir}/export"),
        read_manifest(str(tmp_path / "export")),
    )
    assert remote.count == local.count == 60 and remote.files == local.files
