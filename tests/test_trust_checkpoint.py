"""Checkpoint trust: a damaged newest checkpoint falls back to the previous one; a crafted one
runs no code; a refused resume changes no byte of the run; rotation deletes only what the run
created; DeepSpeed's files load through an allowlist that is exactly what ZeRO 0-2 write."""

import hashlib
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.test_checkpoint import ENV, ROOT, comparable, run, tiny_config, train_cmd

CKPT = "checkpoints/step-0000000{:02d}"


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    return tiny_config(tmp_path_factory.mktemp("trust"))


def fails(cmd: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, f"{cmd}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def first_epoch(config) -> Path:
    """A run of one epoch (10 steps): complete checkpoints at steps 9 and 10."""
    run_dir = config.parent / "first"
    run(train_cmd(config, f"train.run_dir={run_dir}", "train.epochs=1"))
    return run_dir


@pytest.fixture(scope="module")
def straight(config) -> Path:
    run_dir = config.parent / "straight"
    run(train_cmd(config, f"train.run_dir={run_dir}", "train.epochs=2"))
    return run_dir


@pytest.fixture
def copied(first_epoch, tmp_path) -> Path:
    return Path(shutil.copytree(first_epoch, tmp_path / "run"))


def test_what_a_run_creates_is_marked(first_epoch):
    marked = sorted(p.parent.relative_to(first_epoch) for p in first_epoch.rglob(".mqsa-ted-owned"))
    assert marked == [Path("."), Path("checkpoints"), Path(CKPT.format(9)), Path(CKPT.format(10))]


def test_truncated_newest_checkpoint_falls_back_to_the_previous_one(config, copied, straight):
    for file in (copied / CKPT.format(10)).rglob("*.pt"):
        file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    proc = run(train_cmd(config, f"train.run_dir={copied}", "train.resume=auto", "train.epochs=2"))
    warning = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
    assert warning and CKPT.format(10) in warning[0] and CKPT.format(9) in warning[0], proc.stderr
    assert "damaged" in warning[0]
    assert comparable(copied / "metrics.json") == comparable(straight / "metrics.json")


def test_a_damaged_checkpoint_named_explicitly_is_an_error(config, copied):
    newest = copied / CKPT.format(10)
    (newest / "rank-00000.pt").write_bytes(b"")
    proc = fails(train_cmd(config, f"train.run_dir={copied}", f"train.resume={newest}"))
    assert f"checkpoint {newest} is damaged: rank-00000.pt has 0 bytes" in proc.stderr


class WritesAFile:
    """Unpickling this calls ``open(path, "w")``: code run by the loader."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize(
    ("writer", "refusal"),
    [(torch.save, "was refused by the weights-only loader"),
     (lambda obj, f: f.write_bytes(pickle.dumps(obj)), "is not a torch.save archive")],
    ids=["torch_save", "plain_pickle"],
)  # fmt: skip
def test_a_crafted_checkpoint_runs_no_code(config, copied, tmp_path, writer, refusal):
    marker = tmp_path / "code-ran"
    states = copied / CKPT.format(10) / "ds" / "mp_rank_00_model_states.pt"
    writer({"module": WritesAFile(marker)}, states)
    cmd = train_cmd(config, f"train.run_dir={copied}", "train.resume=auto")
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert not marker.exists(), "loading the checkpoint ran code from it"
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"error: {states} {refusal}" in proc.stderr and "Traceback" not in proc.stderr


def digest(run_dir: Path) -> dict[str, str]:
    return {
        str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(run_dir.rglob("*"))
        if p.is_file()
    }


def test_a_refused_resume_leaves_the_run_byte_identical(config, copied):
    before = digest(copied)
    proc = fails(train_cmd(config, f"train.run_dir={copied}", "train.resume=auto", "model.dim=8"))
    assert "does not match this run: model.dim is" in proc.stderr
    assert digest(copied) == before


def test_rotation_deletes_only_checkpoints_the_run_created(config, tmp_path):
    ckpts = tmp_path / "ckpts"
    theirs = ckpts / "step-000000001"  # complete and oldest: rotation's first pick
    theirs.mkdir(parents=True)
    (theirs / "COMPLETE").write_text("{}")
    (theirs / "notes.txt").write_text("not the trainer's")
    proc = run(train_cmd(config, f"train.run_dir={tmp_path / 'run'}", f"checkpoint.dir={ckpts}",
                         "train.epochs=1", "checkpoint.keep=1"))  # fmt: skip
    assert (theirs / "notes.txt").read_text() == "not the trainer's"
    assert f"not deleting {theirs}" in proc.stderr
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-000000001", "step-000000010"]


TRAIN_EACH_STAGE = """
import sys
from mqsa_core.config import load_config
from trainer.runtime.builder import build_run
from trainer.runtime.distributed import init_distributed, shutdown
from trainer.runtime.trainer import Trainer
env = init_distributed()
for stage in (0, 1, 2):
    overrides = [f"train.run_dir={sys.argv[2]}/zero{stage}", f"distributed.zero_stage={stage}",
                 "train.epochs=1", "checkpoint.every=0", "checkpoint.keep=1"]
    Trainer(build_run(load_config(sys.argv[1], overrides), env)).fit()
shutdown()
"""


def same(a, b) -> bool:
    """Deep equality of loaded checkpoint contents (tensors exactly; objects by attributes)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if hasattr(a, "__dict__") and not isinstance(a, type):
        return type(a) is type(b) and same(vars(a), vars(b))
    return a == b


def test_deepspeed_allowlist_is_exactly_what_zero_0_1_2_write(config, tmp_path):
    from trainer.runtime.checkpoint import deepspeed_classes, load_torch_file

    run([sys.executable, "-c", TRAIN_EACH_STAGE, str(config), str(tmp_path)])
    allowed = {f"{c.__module__}.{c.__name__}" for c in deepspeed_classes()}
    needed = set()
    for stage in (0, 1, 2):
        files = sorted((tmp_path / f"zero{stage}" / CKPT.format(10) / "ds").glob("*.pt"))
        assert len(files) == (1 if stage == 0 else 2)
        for file in files:
            unsafe = set(torch.serialization.get_unsafe_globals_in_checkpoint(str(file)))
            assert unsafe <= allowed, (stage, file.name, unsafe - allowed)
            needed |= unsafe
            loaded = load_torch_file(str(file), file.name, "cpu")
            assert same(loaded, torch.load(file, map_location="cpu", weights_only=False))
    assert needed == allowed  # minimal: every allowlisted class is in some file
