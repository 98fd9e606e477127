"""Tracking: TensorBoard event files and an MLflow run that hold exactly metrics.json's epoch
records (the report's source), plus the logged steps, learning rates and step times; read back
with TensorBoard's EventAccumulator and the MLflow client."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import fsspec
import pytest
from mlflow import MlflowClient
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mqsa_core.config import ConfigError, load_config
from tests.synthetic import write_prepared
from trainer.evaluation.metrics import METRIC_NAMES
from trainer.runtime.tracking import Tracker, TrackingError

ROOT = Path(__file__).resolve().parents[1]
EPOCH_KEYS = ("epoch", "loss", "loss_rec", "loss_kd", "seconds", "eval_seconds")


def scalars(events: EventAccumulator, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in events.Scalars(tag)]


def event_files(log_dir: Path) -> EventAccumulator:
    events = EventAccumulator(str(log_dir))
    events.Reload()
    return events


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path, str]:
    """A 2-epoch run (4 steps an epoch, losses logged every 2 steps, a 4-step warm-up) trained
    as two processes (epoch 1, then resumed for epoch 2), tracked in TensorBoard and MLflow;
    returns (run dir, MLflow tracking URI, the second process's stdout)."""
    root = tmp_path_factory.mktemp("tracking")
    data = write_prepared(root / "data", num_users=64)
    run_dir, uri = root / "run", (root / "mlruns").as_uri()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
           "MLFLOW_TRACKING_URI": uri, "MLFLOW_ALLOW_FILE_STORE": "true"}  # fmt: skip
    args = [f"data.dir={data}", "data.max_len=12", "model.dim=16", "train.batch_size=16",
            "train.threads=1", "train.progress=false", "train.log_every=2",
            "train.warmup_steps=4", f"train.run_dir={run_dir}",
            "train.tracking=tensorboard,mlflow"]  # fmt: skip
    config, out = root / "empty.yaml", ""
    config.write_text("")  # the defaults, then the overrides
    for epochs in (1, 2):
        proc = subprocess.run(
            [sys.executable, "-m", "trainer.train", str(config), *args, f"train.epochs={epochs}"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        out = proc.stdout
    return run_dir, uri, out


def test_tensorboard_holds_metrics_json_epoch_records(trained):
    run_dir, _, _ = trained
    records = json.loads((run_dir / "metrics.json").read_text())["epochs"]
    events = event_files(run_dir / "tensorboard")
    ends = [4, 8]  # the global step that ended each epoch
    for key in EPOCH_KEYS:
        got = scalars(events, f"epoch/{key}")
        assert [s for s, _ in got] == ends, key  # once each, the resume added no duplicate
        assert [v for _, v in got] == pytest.approx([r[key] for r in records], rel=1e-6), key
    for split in ("valid", "test"):
        for metric in METRIC_NAMES:
            got = [v for _, v in scalars(events, f"{split}/{metric}")]
            assert got == pytest.approx([r[split][metric] for r in records], rel=1e-6)


def test_tensorboard_holds_the_logged_steps(trained):
    run_dir, _, _ = trained
    records = json.loads((run_dir / "metrics.json").read_text())["epochs"]
    events = event_files(run_dir / "tensorboard")
    assert [s for s, _ in scalars(events, "step/loss")] == [2, 4, 6, 8]
    # the last logged step of an epoch is the whole epoch's mean: the epoch record's loss
    by_step = dict(scalars(events, "step/loss"))
    assert [by_step[4], by_step[8]] == pytest.approx([r["loss"] for r in records], rel=1e-6)
    # warm-up over 4 steps: the rate of step s (1-based) is s/4 of train.lr, then train.lr
    assert [v for _, v in scalars(events, "lr/dense")] == pytest.approx([5e-4, 1e-3, 1e-3, 1e-3])
    assert all(v > 0 for _, v in scalars(events, "step/seconds_per_step"))
    assert "lr/table" not in events.Tags()["scalars"]  # the dense table has no optimizer of its own


def test_mlflow_runs_hold_the_same_records(trained, monkeypatch):
    run_dir, uri, _ = trained
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks to opt in to files
    records = json.loads((run_dir / "metrics.json").read_text())["epochs"]
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("mqsa-ted")
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time"])
    assert [r.info.status for r in runs] == ["FINISHED", "FINISHED"]  # one per process
    assert [r.data.tags["mqsa_ted.start_step"] for r in runs] == ["0", "4"]
    assert {r.data.tags["mqsa_ted.run_dir"] for r in runs} == {str(run_dir)}
    assert runs[1].data.params["train.batch_size"] == "16"
    history = {
        key: [m for run in runs for m in client.get_metric_history(run.info.run_id, key)]
        for key in ("epoch/loss", "valid/NDCG_at_20", "test/HR_at_10")
    }
    assert [m.step for m in history["epoch/loss"]] == [4, 8]
    assert [m.value for m in history["epoch/loss"]] == pytest.approx([r["loss"] for r in records])
    assert [m.value for m in history["valid/NDCG_at_20"]] == pytest.approx(
        [r["valid"]["NDCG@20"] for r in records]
    )
    assert [m.value for m in history["test/HR_at_10"]] == pytest.approx(
        [r["test"]["HR@10"] for r in records]
    )


def test_the_log_has_an_eta_line_after_each_epoch(trained):
    _, _, out = trained  # the second process: epoch 2 of 2
    assert "ETA: epoch 2 was the last planned one" in out.splitlines()


def test_remote_run_dir_gets_the_event_files_copied(tmp_path: Path):
    cfg = load_config(None, ["train.run_dir=memory://tracking-test/run"])
    tracker = Tracker(cfg, is_main=True)
    with tracker:
        tracker.start(0)
        tracker.log_epoch({"epoch": 1, "loss": 2.5, "valid": {"NDCG@20": 0.25}}, step=7)
    fs = fsspec.filesystem("memory")
    remote = fs.find("/tracking-test/run/tensorboard")
    assert remote, "no event file was copied"
    for path in remote:
        (tmp_path / Path(path).name).write_bytes(fs.cat_file(path))
    events = event_files(tmp_path)
    assert scalars(events, "epoch/loss") == [(7, 2.5)]
    assert scalars(events, "valid/NDCG@20") == [(7, 0.25)]
    fs.rm("/tracking-test", recursive=True)


def test_tracking_setting_is_checked_and_mlflow_needs_its_uri(monkeypatch):
    with pytest.raises(ConfigError, match="train.tracking' must be none or a comma-separated"):
        load_config(None, ["train.tracking=tensorboard,wandb"])
    with pytest.raises(ConfigError, match="train.tracking"):
        load_config(None, ["train.tracking="])
    assert Tracker(load_config(None, ["train.tracking=none"]), is_main=True).names == ()
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(TrackingError, match="MLFLOW_TRACKING_URI is not set"):
        Tracker(load_config(None, ["train.tracking=tensorboard, mlflow"]), is_main=False)


def test_a_failing_tracker_is_dropped_and_training_goes_on(tmp_path, monkeypatch, capsys):
    store = tmp_path / "mlruns"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    cfg = load_config(None, [f"train.run_dir={tmp_path / 'run'}", "train.tracking=mlflow"])
    with Tracker(cfg, is_main=True) as tracker:
        tracker.start(0)
        tracker.log_epoch({"epoch": 1, "loss": 2.0}, step=4)
        shutil.rmtree(store)  # the tracking store is gone
        tracker.log_epoch({"epoch": 2, "loss": 1.5}, step=8)  # no exception
        assert tracker.backends == {}
    assert "warning: train.tracking: mlflow failed (" in capsys.readouterr().err


def test_a_resumed_run_hides_the_steps_after_its_checkpoint(tmp_path: Path):
    """An interrupted process logged steps 1-6; its checkpoint was at step 4, so the resumed
    process logs 5 and 6 again: TensorBoard shows each step once, 5 and 6 from the resume."""
    cfg = load_config(None, [f"train.run_dir={tmp_path}", "train.tracking=tensorboard"])
    with Tracker(cfg, is_main=True) as first:
        first.start(0)
        for step in range(1, 7):
            first.log_step(step, {"loss": float(step)})
    with Tracker(cfg, is_main=True) as resumed:
        resumed.start(4)
        for step in (5, 6):
            resumed.log_step(step, {"loss": 10.0 * step})
    events = event_files(tmp_path / "tensorboard")
    assert scalars(events, "step/loss") == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 50.0),
                                            (6, 60.0)]  # fmt: skip
