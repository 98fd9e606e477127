"""Warm start (``train.init_from``): the encoder and the old item rows come from the previous
run, new rows are the mean of their old neighbours' rows; TorchRec tables move between world
sizes; a changed model shape or unrelated data is refused before anything is written."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mqsa_core.config import load_config
from tests.synthetic import write_prepared
from trainer.data.sequences import load_transitions
from trainer.runtime.optimizer_state import carry_optimizer_state
from trainer.runtime.warm_start import WarmStartError, previous_items, warm_optimizer

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
WORKER = str(ROOT / "tests" / "warm_start_worker.py")
OLD, NEW = 40, 48
BASE = ["data.max_len=12", "model.dim=16", "train.batch_size=32", "train.epochs=1",
        "train.progress=false", "train.eval_every=1"]  # fmt: skip


def run(cmd: list[str], check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, f"{cmd}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
            "--rdzv_backend=c10d", "--rdzv_endpoint=127.0.0.1:0", *args]  # fmt: skip


@pytest.fixture(scope="module")
def days(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("days")
    one = write_prepared(root / "day1", num_items=OLD, version="day1")
    base = {"dir": str(one), "version": "day1", "items": OLD}
    two = write_prepared(root / "day2", num_items=NEW, seed=1, version="day2", base=base)
    return {"root": root, "day1": one, "day2": two}


def trained(days, backend: str, world: int, zero: int = 0) -> Path:
    run_dir = days["root"] / f"run-{backend}-{world}-zero{zero}"
    if not (run_dir / "metrics.json").exists():
        args = ["-m", "trainer.train", "/dev/null", f"data.dir={days['day1']}", *BASE,
                f"embeddings.backend={backend}", f"train.run_dir={run_dir}",
                f"distributed.zero_stage={zero}"]  # fmt: skip
        run(torchrun(*args) if world == 2 else [sys.executable, *args])
    return run_dir


def started(days, previous: Path, out: Path, world: int, *extra: str) -> dict:
    args = [WORKER, str(out), f"data.dir={days['day2']}", *BASE, f"train.init_from={previous}",
            *extra]  # fmt: skip
    run(torchrun(*args) if world == 2 else [sys.executable, *args])
    return torch.load(out, weights_only=True)


def expected_new_rows(days, old_table: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """Rows OLD..NEW-1: count-weighted mean of old neighbours (both directions), else ``start``."""
    src, dst, count = load_transitions(str(days["day2"]))
    rows = start.clone()
    for item in range(OLD, NEW):
        pairs = [(d, c) for s, d, c in zip(src, dst, count, strict=True) if s == item and d < OLD]
        pairs += [(s, c) for s, d, c in zip(src, dst, count, strict=True) if d == item and s < OLD]
        if pairs:
            weights = np.array([c for _, c in pairs], dtype=np.float64)
            vectors = old_table[[n for n, _ in pairs]].double()
            rows[item - OLD] = (torch.from_numpy(weights / weights.sum())[:, None] * vectors).sum(0)
    return rows


@pytest.mark.parametrize(("backend", "trained_world", "world", "zero"),
                         [("dense", 1, 1, 0), ("torchrec", 2, 1, 0), ("torchrec", 1, 2, 0),
                          ("dense", 2, 2, 1)])  # fmt: skip
def test_warm_start_seeds_encoder_old_rows_and_new_rows(days, tmp_path, backend, trained_world,
                                                        world, zero):  # fmt: skip
    """... and the optimizer state; the last case saves and carries the dense part's state
    through ZeRO 1's flat partitions (the table's rows split between the two ranks)."""
    previous = trained(days, backend, trained_world, zero)
    state = torch.load(previous / "model.pt", weights_only=True)
    if backend == "dense":
        old_table = state["table.weight"][:OLD]
    else:  # the previous run's best table, as a 1-process export reads it
        export = tmp_path / "old"
        run([sys.executable, "-m", "mqsa_ted.export", str(previous), "--out", str(export),
             "--faiss", "none"])  # fmt: skip
        from mqsa_ted.export import read_vectors
        from mqsa_ted.manifest import resolve_version

        version, _ = resolve_version(str(export))
        old_table = torch.from_numpy(read_vectors(f"{version}/items", 16).copy())
    setup = [f"embeddings.backend={backend}", f"distributed.zero_stage={zero}"]
    got = started(days, previous, tmp_path / "start.pt", world, *setup)
    for name, value in got["encoder"].items():
        torch.testing.assert_close(value, state[f"encoder.{name}"], rtol=0, atol=0, msg=name)
    assert got["table"].shape == (NEW, 16)
    torch.testing.assert_close(got["table"][:OLD], old_table, rtol=0, atol=0)
    fresh = started(days, previous, tmp_path / "fresh.pt", world, *setup, "train.init_from=")
    want = expected_new_rows(days, old_table, fresh["table"][OLD:])
    torch.testing.assert_close(got["table"][OLD:], want.float(), rtol=1e-5, atol=1e-6)
    assert not torch.equal(got["table"][OLD:], fresh["table"][OLD:])  # neighbours were used
    assert fresh["optimizer"] == {} and all(not v.any() for v in fresh["fused"].values())
    check_optimizer_state(previous, got, backend)


def check_optimizer_state(previous: Path, got: dict, backend: str) -> None:
    """The best epoch's optimizer state came with the weights: the dense part's by name, a
    sharded table's row by row; the new items' rows start at zero."""
    saved = torch.load(previous / "optimizer.pt", weights_only=True)
    assert saved["epoch"] == 1 and saved["optimizer"] == "Adam"
    dense = saved["state"]
    assert set(got["optimizer"]) == set(dense)  # every dense parameter, the table's if dense
    for name, state in dense.items():
        for key, value in state.items():
            mine = got["optimizer"][name][key]
            if name == "table.weight":
                assert key == "step" or not mine[OLD:].any(), key  # new rows and padding: fresh
                mine, value = (mine, value) if key == "step" else (mine[:OLD], value[:OLD])
            torch.testing.assert_close(mine, value, rtol=0, atol=0, msg=f"{name}.{key}")
    if backend == "torchrec":
        import torch.distributed.checkpoint as dcp

        (snapshot,) = previous.glob("best_table-e*")
        key = "embeddings.item_table.weight"
        old = {"opt": {"state": {key: {"item_table.momentum1": torch.zeros(OLD + 1)}}}}
        dcp.load(old, checkpoint_id=str(snapshot), no_dist=True)  # rowwise Adagrad: [N + 1]
        momentum = old["opt"]["state"][key]["item_table.momentum1"]
        assert momentum[:OLD].gt(0).any()
        torch.testing.assert_close(got["fused"]["item_table.momentum1"][:OLD], momentum[:OLD],
                                   rtol=0, atol=0)  # fmt: skip
        assert not got["fused"]["item_table.momentum1"][OLD:].any()


def test_changed_model_dim_is_refused_and_nothing_is_written(days, tmp_path):
    previous = trained(days, "dense", 1)
    run_dir = tmp_path / "day2-run"
    proc = run([sys.executable, "-m", "trainer.train", "/dev/null", f"data.dir={days['day2']}",
                *BASE, "model.dim=8", f"train.init_from={previous}", f"train.run_dir={run_dir}"],
               check=False)  # fmt: skip
    assert proc.returncode == 2
    assert "model.dim was 16 there and is 8 here" in proc.stderr
    assert not run_dir.exists()


def test_data_that_does_not_extend_the_previous_run_is_refused(days, tmp_path):
    previous = trained(days, "dense", 1)
    unrelated = write_prepared(tmp_path / "other", num_items=NEW, version="other")
    cfg = load_config(None, [f"data.dir={unrelated}", *BASE, f"train.init_from={previous}"])
    with pytest.raises(WarmStartError, match="was not prepared against the data"):
        previous_items(cfg, str(previous))


def test_optimizer_state_starts_fresh_with_the_reason_when_it_cannot_be_carried(days, tmp_path):
    """A previous run without optimizer.pt (an older version), one whose optimizer.pt is from
    another epoch than its best weights, or an optimizer that holds neither the model's
    parameters nor ZeRO's partitions: the dense state starts fresh and the log line says why. A
    damaged optimizer.pt is a named error."""
    previous = tmp_path / "previous"
    shutil.copytree(trained(days, "dense", 1), previous)
    cfg = load_config(None, [f"data.dir={days['day2']}", *BASE, f"train.init_from={previous}"])
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.Adam(model.parameters())
    saved = torch.load(previous / "optimizer.pt", weights_only=True)
    torch.save({**saved, "epoch": 99}, previous / "optimizer.pt")
    assert warm_optimizer(cfg, model, optimizer).endswith(
        "optimizer.pt is from epoch 99, the best weights from epoch 1 (stopped while saving?)"
    )
    (previous / "optimizer.pt").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(WarmStartError, match=r"optimizer.pt cannot be read .*warm_optimizer=false"):
        warm_optimizer(cfg, model, optimizer)
    (previous / "optimizer.pt").unlink()
    assert "kept no optimizer.pt" in warm_optimizer(cfg, model, optimizer)
    flat = torch.optim.Adam([torch.nn.Parameter(torch.zeros(6))])
    assert "holds neither the parameters nor ZeRO's partitions" in warm_optimizer(cfg, model, flat)
    assert not optimizer.state and not flat.state


def test_a_stateless_optimizer_file_carries_nothing_whatever_the_optimizer_holds():
    """Plain SGD keeps no state: its optimizer.pt (from a ZeRO 0 run) lists no parameter, and a
    warm start under ZeRO 1/2 (an optimizer over flat partitions) carries nothing from it."""
    model = torch.nn.Linear(3, 2)
    flat = torch.optim.SGD([torch.nn.Parameter(torch.zeros(8))], lr=0.1)
    saved = {"epoch": 1, "optimizer": "SGD", "state": {}}
    assert carry_optimizer_state(model, flat, saved, num_old=0) == 0
    assert not flat.state
