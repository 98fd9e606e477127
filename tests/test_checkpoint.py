"""Checkpoint and resume: a SIGKILLed run resumes to the uninterrupted run's exact metrics;
unfinished checkpoints are never loaded; mismatches are refused; 2 <-> 1 rank loading."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.synthetic import write_prepared

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def train_cmd(config: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "trainer.train", str(config), *overrides]


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
            "--rdzv_backend=c10d", "--rdzv_endpoint=127.0.0.1:0", *args]  # fmt: skip


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{cmd}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


def comparable(metrics_json: Path) -> dict:
    """metrics.json without the wall-clock fields."""
    metrics = json.loads(metrics_json.read_text())
    for record in metrics["epochs"]:
        record.pop("seconds"), record.pop("eval_seconds", None)
    return metrics


def mid_epoch_steps(ckpts: Path, steps_per_epoch: int = 10) -> list[int]:
    """Steps of the complete checkpoints taken inside an epoch (160 users / batch 16 = 10)."""
    steps = [int(p.parent.name.split("-")[1]) for p in ckpts.glob("step-*/COMPLETE")]
    return [s for s in steps if s % steps_per_epoch]


def tiny_config(root: Path) -> Path:
    """A config of 160 users (10 steps of 16 per epoch, 12 epochs), checkpointing every 3 steps
    and keeping 2, with its prepared data, under ``root``."""
    data = write_prepared(root / "data", num_users=160)
    path = root / "tiny.yaml"
    path.write_text(
        f"data:\n  dir: {data}\n  max_len: 12\nmodel:\n  dim: 16\n"
        "train:\n  epochs: 12\n  batch_size: 16\n  progress: false\n  threads: 1\n"
        "checkpoint:\n  every: 3\n  keep: 2\n"
    )
    return path


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    return tiny_config(tmp_path_factory.mktemp("ckpt"))


# the TorchRec run also follows a learning-rate schedule: the resumed run continues it (the
# dense part's from DeepSpeed's scheduler state, the table's from the step count)
@pytest.mark.parametrize(
    "chosen",
    ["embeddings.backend=dense",
     "embeddings.backend=torchrec,train.warmup_steps=5,train.lr_schedule=linear"],
)  # fmt: skip
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted_run(config, tmp_path, chosen):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    chosen = chosen.split(",")
    run(train_cmd(config, f"train.run_dir={straight}", *chosen))

    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    proc = subprocess.Popen(train_cmd(config, f"train.run_dir={killed}", *chosen), cwd=ROOT,
                            env=ENV, **quiet)  # fmt: skip
    ckpts = killed / "checkpoints"
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        if any(step > 20 for step in mid_epoch_steps(ckpts)):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed: make it longer"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    metrics_before = json.loads((killed / "metrics.json").read_text())
    assert len(metrics_before["epochs"]) < 12
    # a half-written, newer checkpoint (no COMPLETE marker) must be ignored
    (ckpts / "step-999999999" / "ds").mkdir(parents=True)
    (ckpts / "step-999999999" / "trainer_state.json").write_text("{truncated")

    proc = run(train_cmd(config, f"train.run_dir={killed}", *chosen, "train.resume=auto"))
    assert "resumed from" in proc.stdout + proc.stderr
    assert comparable(killed / "metrics.json") == comparable(straight / "metrics.json")


def test_resume_refuses_a_checkpoint_of_another_model(config, tmp_path):
    run_dir = tmp_path / "run"
    run(train_cmd(config, f"train.run_dir={run_dir}", "train.epochs=1"))
    proc = subprocess.run(
        train_cmd(config, f"train.run_dir={run_dir}", "train.resume=auto", "model.dim=8"),
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "does not match this run: model.dim is 16 there and 8 here" in proc.stderr
    assert "train.resume=fresh" in proc.stderr


def test_checkpoint_moves_between_two_ranks_and_one(config, tmp_path):
    worker = str(ROOT / "tests" / "checkpoint_worker.py")
    for save_world, load_world in ((2, 1), (1, 2)):
        run_dir = tmp_path / f"run{save_world}"
        overrides = (f"train.run_dir={run_dir}", "train.epochs=1", "distributed.zero_stage=0")
        save = ["-m", "trainer.train", str(config), *overrides]
        run(torchrun(*save) if save_world == 2 else [sys.executable, *save])
        out = tmp_path / f"loaded{save_world}.pt"
        load = [worker, str(config), str(out), *overrides]
        run(torchrun(*load) if load_world == 2 else [sys.executable, *load])
        loaded = torch.load(out, weights_only=True)
        saved = torch.load(run_dir / "model.pt", weights_only=True)  # the epoch-1 weights
        assert loaded["epoch"] == 2
        saved["item_table"] = saved.pop("table.weight")[:-1]  # without the padding row
        saved = {k.removeprefix("encoder."): v for k, v in saved.items()}
        for name, value in saved.items():
            torch.testing.assert_close(loaded["params"][name], value, rtol=0, atol=0, msg=name)


def test_sharded_table_checkpoint_loads_on_one_rank_and_on_two(config, tmp_path):
    """A row-wise TorchRec checkpoint saved by 2 ranks reloads (DCP resharding) on 1 and on 2
    ranks to the same table and encoder weights."""
    worker = str(ROOT / "tests" / "checkpoint_worker.py")
    run_dir = tmp_path / "run"
    overrides = (f"train.run_dir={run_dir}", "train.epochs=1", "embeddings.backend=torchrec")
    run(torchrun("-m", "trainer.train", str(config), *overrides))
    loaded = {}
    for world in (1, 2):
        out = tmp_path / f"loaded{world}.pt"
        load = [worker, str(config), str(out), *overrides]
        run(torchrun(*load) if world == 2 else [sys.executable, *load])
        loaded[world] = torch.load(out, weights_only=True)
    assert loaded[1]["epoch"] == loaded[2]["epoch"] == 2
    for name, value in loaded[2]["params"].items():
        torch.testing.assert_close(loaded[1]["params"][name], value, rtol=0, atol=0, msg=name)
    moved = torch.load(run_dir / "model.pt", weights_only=True)  # dense part after epoch 1
    for name, value in moved.items():
        name = name.removeprefix("encoder.")
        torch.testing.assert_close(loaded[1]["params"][name], value, rtol=0, atol=0, msg=name)


def test_a_rerun_never_starts_over_silently(config, tmp_path):
    """The same command again on an ended run trains nothing and says so (same metrics);
    ``train.resume=fresh`` deletes the run's checkpoints, says so and trains from the start."""
    run_dir = tmp_path / "run"
    cmd = train_cmd(config, f"train.run_dir={run_dir}", "train.epochs=1")
    run(cmd)
    first = comparable(run_dir / "metrics.json")
    again = run(cmd)
    assert "this run has already ended (epoch 1 of 1): nothing to train" in again.stdout
    assert comparable(run_dir / "metrics.json") == first
    fresh = run([*cmd, "train.resume=fresh"])
    assert f"train.resume=fresh: deleted 2 checkpoint(s) of an earlier run under {run_dir}" in (
        fresh.stdout
    )
    assert "resumed from" not in fresh.stdout
    assert comparable(run_dir / "metrics.json") == first  # the same seeded run, from the start


def test_a_step_budget_ends_the_run_mid_epoch_evaluated_and_a_rerun_trains_nothing(
    config, tmp_path
):
    """``train.max_steps=13`` with 10 steps per epoch: epoch 2 stops at step 13, is evaluated
    and checkpointed; its first epoch is a longer run's; a rerun trains nothing."""
    budget = tmp_path / "budget"
    cmd = train_cmd(config, f"train.run_dir={budget}", "train.max_steps=13", "checkpoint.every=0")
    out = run(cmd).stdout
    assert "train.max_steps=13: 10 steps per epoch, the run stops at step 13, in epoch 2" in out
    metrics = comparable(budget / "metrics.json")
    assert [r["epoch"] for r in metrics["epochs"]] == [1, 2]
    assert "valid" in metrics["epochs"][1]
    assert (budget / "checkpoints" / "step-000000013" / "COMPLETE").exists()
    assert "nothing to train" in run(cmd).stdout
    assert comparable(budget / "metrics.json") == metrics
    longer = tmp_path / "longer"
    run(train_cmd(config, f"train.run_dir={longer}", "train.epochs=1", "train.max_steps=0"))
    first = comparable(longer / "metrics.json")["epochs"][0]
    assert metrics["epochs"][0] == first  # the budget changed nothing before it
