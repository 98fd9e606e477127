"""Ctrl-C (SIGINT to the terminal's process group) and a scheduler's SIGTERM on a 2-rank
training: one line saying where it stopped and which checkpoint holds it, exit 130 / 143, no
traceback; running the same command again resumes there (never starts over silently) and ends
with an uninterrupted run's exact metrics."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.synthetic import write_prepared

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def train_cmd(config: Path, run_dir: Path) -> list[str]:
    """What ``mqsa-ted train CONFIG --nproc 2`` runs."""
    return [sys.executable, "-m", "mqsa_ted.torchrun", "--nproc_per_node=2",
            "--rdzv_backend=c10d", "--rdzv_endpoint=127.0.0.1:0", "-m", "trainer.train",
            str(config), f"train.run_dir={run_dir}"]  # fmt: skip


def comparable(run_dir: Path) -> dict:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for record in metrics["epochs"]:
        record.pop("seconds"), record.pop("eval_seconds", None)
    return metrics


def interrupt(cmd: list[str], signum: int, after_epochs: int, run_dir: Path) -> tuple[int, str]:
    """Start ``cmd``, send ``signum`` to its process group once ``after_epochs`` epochs are in
    ``metrics.json``; its exit status and stderr."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 180
    while True:
        assert proc.poll() is None, f"ended before the signal: {proc.communicate()[1]}"
        assert time.monotonic() < deadline
        try:
            if len(json.loads((run_dir / "metrics.json").read_text())["epochs"]) >= after_epochs:
                break
        except (FileNotFoundError, ValueError):
            pass
        time.sleep(0.05)
    os.killpg(proc.pid, signum)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


def test_sigint_and_sigterm_checkpoint_and_a_rerun_resumes(tmp_path):
    data = write_prepared(tmp_path / "data", num_users=320)
    config = tmp_path / "tiny.yaml"
    config.write_text(
        f"data:\n  dir: {data}\n  max_len: 12\nmodel:\n  dim: 16\n"
        "train:\n  epochs: 8\n  batch_size: 16\n  progress: false\n  threads: 1\n"
    )
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    subprocess.run(train_cmd(config, straight), cwd=ROOT, env=ENV, check=True,
                   capture_output=True, timeout=600)  # fmt: skip

    cmd = train_cmd(config, stopped)
    for signum, after_epochs, status in ((signal.SIGINT, 1, 130), (signal.SIGTERM, 4, 143)):
        code, err = interrupt(cmd, signum, after_epochs, stopped)
        lines = err.strip().splitlines()
        assert code == status, err
        assert "Traceback" not in err
        assert lines[-1].startswith(f"interrupted by {signal.Signals(signum).name} at epoch "), err
        assert lines[-1].endswith("; rerun the same command to resume")
        checkpoint = Path(lines[-1].split("; checkpoint ")[1].split(";")[0])
        assert (checkpoint / "COMPLETE").exists()

    resumed = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {checkpoint}" in resumed.stdout
    assert comparable(stopped) == comparable(straight)
