"""``mqsa-ted tune``: a real Optuna study of real training runs on synthetic data: pruning on the
valid NDCG@20 of each evaluation, the choice on validation only, best.yaml training as is; a
study SIGKILLed mid-trial resumes to the same trial count; bad input is refused in one line
before Optuna or torch is imported; the default space and docs/tuning.md agree."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mqsa_core.config import ConfigError
from mqsa_core.lease import lease_url, read_holder
from mqsa_ted import tune
from tests.synthetic import write_prepared

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
HEAVY = ("torch", "deepspeed", "pyspark", "torchrec", "optuna")
GOOD_LR, BAD_LR = 0.02, 1e-6  # valid NDCG@20 after one epoch: ~0.3 against ~0.04 (random)


def tiny_config(root: Path, epochs: int) -> Path:
    """160 users, 200 items (10 steps of 16 per epoch), ``epochs`` epochs at ``GOOD_LR``, with
    its prepared data, under ``root`` (as tests/test_checkpoint.py's, with more items: a
    random ranking scores a low NDCG@20)."""
    data = write_prepared(root / "data", num_users=160, num_items=200)
    path = root / "tiny.yaml"
    path.write_text(
        f"data:\n  dir: {data}\n  max_len: 12\nmodel:\n  dim: 16\n"
        f"train:\n  epochs: {epochs}\n  batch_size: 16\n  lr: {GOOD_LR}\n  progress: false\n"
        f"  threads: 1\n  run_dir: {root / 'run'}\n"
    )
    return path


def tune_cmd(config: Path, *args: str, overrides: tuple[str, ...] = ()) -> list[str]:
    return [sys.executable, "-m", "mqsa_ted.cli", "tune", str(config), *overrides, "--nproc", "1",
            *args]  # fmt: skip


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{cmd}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def load_study(tune_dir: Path):
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    storage = JournalStorage(JournalFileBackend(str(tune_dir / tune.JOURNAL)))
    return optuna.load_study(study_name=tune.STUDY_NAME, storage=storage)


def metrics(run_dir: str | Path) -> dict:
    return json.loads((Path(run_dir) / "metrics.json").read_text())


def test_a_study_prunes_a_bad_trial_and_its_best_config_trains(tmp_path):
    """Trial 0 is the config as given (lr 0.02); the sampler (seed 0) then draws 1e-6, 0.02,
    1e-6: each 1e-6 trial falls below the median at its first evaluation and is pruned; the
    0.02 one equals trial 0 and completes."""
    from optuna.trial import TrialState

    config = tiny_config(tmp_path, epochs=20)
    space = tmp_path / "space.yaml"
    space.write_text(f"train.lr: {{choices: [{GOOD_LR}, {BAD_LR}]}}\n")
    tune_dir = tmp_path / "study"
    args = ("--trials", "4", "--space", str(space), "--dir", str(tune_dir), "--seed", "0",
            "--prune-min-trials", "1", "--prune-warmup", "0")  # fmt: skip
    out = run(tune_cmd(config, *args)).stdout

    trials = load_study(tune_dir).trials
    lrs = [t.params["train.lr"] for t in trials]
    assert lrs == [GOOD_LR, BAD_LR, GOOD_LR, BAD_LR], out
    states = [t.state for t in trials]
    assert states == [TrialState.COMPLETE, TrialState.PRUNED] * 2, out
    for t in trials:
        run_dir = tmp_path / "study" / f"trial-{t.number:04d}"
        assert t.user_attrs["run_dir"] == str(run_dir)
        assert {"config.yaml", "metrics.json", "train.log"} <= {p.name for p in run_dir.iterdir()}
        valid = {r["epoch"]: r["valid"]["NDCG@20"] for r in metrics(run_dir)["epochs"]}
        # what the study was told is the run's validation series, epoch by epoch
        assert t.intermediate_values == {e: valid[e] for e in t.intermediate_values}
        if t.state == TrialState.PRUNED:
            assert list(t.intermediate_values) == [1]  # stopped at its first evaluation
            assert "interrupted by SIGTERM" in (run_dir / "train.log").read_text()
            assert len(valid) < 20
        else:
            assert t.value == metrics(run_dir)["valid"]["NDCG@20"]
    assert "pruned at epoch 1" in out

    best = json.loads((tune_dir / "best.json").read_text())
    chosen = max((t for t in trials if t.state == TrialState.COMPLETE), key=lambda t: t.value)
    assert best["trial"] == chosen.number == 0  # the first of two equal values
    assert best["test"] == metrics(chosen.user_attrs["run_dir"])["test"]
    assert best["trials"] == {"complete": 2, "pruned": 2, "failed": 0, "cut off": 0}
    assert f"chosen on validation: trial {chosen.number}" in out

    # best.yaml trains as is and, same settings and seed, repeats the chosen trial exactly
    run([sys.executable, "-m", "trainer.train", str(tune_dir / "best.yaml")])
    again = metrics(tune_dir / "best-run")
    assert again["valid"] == best["valid"] and again["test"] == best["test"]


def test_a_killed_study_resumes_to_the_same_number_of_trials(tmp_path):
    """Two trials run at once (``--jobs 2``); the study is SIGKILLed once trial 0 has a
    checkpoint. Its trainers get SIGTERM and checkpoint (no trial trains on); the rerun marks
    the cut-off trials failed, runs them again in their own directories (trial 0 resumes from
    its checkpoint) and the one trial never started: 3 counted trials in all."""
    from optuna.trial import TrialState

    config = tiny_config(tmp_path, epochs=40)
    space = tmp_path / "space.yaml"
    space.write_text("model.L: {low: 1, high: 3}\ntrain.lr: {low: 0.005, high: 0.05, log: true}\n")
    tune_dir = tmp_path / "study"
    args = ("--trials", "3", "--space", str(space), "--dir", str(tune_dir), "--jobs", "2",
            "--no-prune")  # fmt: skip
    cmd = tune_cmd(config, *args)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    first = tune_dir / "trial-0000"
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        if list((first / "checkpoints").glob("step-*/COMPLETE")):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the study ended before it could be killed: make trials longer"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # the trainers outlive the study by their checkpoint only
    deadline = time.time() + 120
    while any(trains(tune_dir / f"trial-{n:04d}") for n in (0, 1)) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(trains(tune_dir / f"trial-{n:04d}") for n in (0, 1))
    first_log = (first / "train.log").read_text()
    assert "interrupted by SIGTERM" in first_log  # stopped, not trained to its end
    assert len(metrics(first)["epochs"]) < 40

    out = run(cmd).stdout
    assert "trial 0 was cut off: queued again" in out
    trials = load_study(tune_dir).trials
    assert [t.state for t in trials[:2]] == [TrialState.FAIL] * 2
    again = {t.user_attrs["retry_of"]: t for t in trials if "retry_of" in t.user_attrs}
    assert sorted(again) == [0, 1]
    for number, retry in again.items():
        assert retry.state == TrialState.COMPLETE
        assert retry.params == trials[number].params
        assert retry.user_attrs["run_dir"] == str(tune_dir / f"trial-{number:04d}")
    resumed = (first / "train.log").read_text()[len(first_log) :]
    assert "resumed from" in resumed
    assert len(metrics(first)["epochs"]) == 40
    counted = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(counted) == 3 and len(trials) == 5
    assert json.loads((tune_dir / "best.json").read_text())["trials"] == {
        "complete": 3, "pruned": 0, "failed": 0, "cut off": 2,
    }  # fmt: skip
    assert (tune_dir / "best.yaml").exists()

    # the same command once more has nothing to run; another config is refused, naming it
    assert "3 of 3 trials done, 0 to run" in run(cmd).stdout
    other = subprocess.run(tune_cmd(config, *args, overrides=("train.epochs=41",)), cwd=ROOT,
                           env=ENV, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert other.returncode == 2
    assert "holds a study of another config or space (config.train.epochs: 40" in other.stderr


def trains(run_dir: Path) -> bool:
    """Whether a live trainer holds ``run_dir`` (its lease)."""
    holder = read_holder(lease_url(str(run_dir)))
    return holder is not None and holder.gone(time.time()) is None


def refused(argv: list[str]) -> str:
    """``mqsa-ted ARGV``'s one stderr line; asserts exit 2 and no heavy import."""
    code = (
        "import sys; from mqsa_ted.cli import main; rc = main(sys.argv[1:]);"
        f"print(rc, sorted(m for m in {HEAVY!r} if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code, *argv], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.stdout.strip() == "2 []", proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return tiny_config(tmp_path_factory.mktemp("tune"), epochs=2)


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "CONFIG is required"),
        (["{config}"], "--trials N is required"),
        (["{config}", "--trials", "0"], "--trials must be at least 1, got 0"),
        (["{config}", "--trials", "two"], "argument --trials: invalid int value: 'two'"),
        (["{root}/missing.yaml", "--trials", "2"], "config file not found: {root}/missing.yaml"),
        (["{config}", "--trials", "2", "--jobs", "0"], "--jobs must be at least 1, got 0"),
        (["{config}", "--trials", "2", "--timeout", "0"], "--timeout must be a number of "
         "seconds > 0"),
        (["{config}", "--trials", "2", "--space", "{root}/none.yaml"], "--space "
         "{root}/none.yaml: cannot read it: No such file or directory"),
        (["{config}", "--trials", "2", "--space", "{root}/L.yaml"], "--space {root}/L.yaml: "
         "unknown key 'model.LL': did you mean 'model.L'?"),
        (["{config}", "--trials", "2", "--dir", "/"], "--dir '/': the study needs a local "
         "directory other than a filesystem root"),
        (["{config}", "--trials", "2", "--dir", "{root}/data/tune"], "must be outside data.dir"),
        (["{config}", "--trials", "2", "data.dir={root}/nothing"], "{root}/nothing is not a "
         "complete prepared-data directory"),
    ],
)  # fmt: skip
def test_bad_input_is_refused_in_one_line_before_optuna_or_torch(tiny, args, message):
    root = tiny.parent
    (root / "L.yaml").write_text("model.LL: {low: 1, high: 3}\n")
    argv = ["tune", *(a.format(config=tiny, root=root) for a in args)]
    assert message.format(root=root) in refused(argv)


@pytest.mark.parametrize(
    "text, message",
    [
        ("[1, 2]", "a search space must be a YAML mapping"),
        ("model.L: {low: 3, high: 1}", "key 'model.L': low must be below high, got 3 .. 1"),
        ("model.L: {low: 1.5, high: 3}", "key 'model.L' must be int, got float 1.5"),
        ("model.dropout: {low: 0.1, high: 1.5}", "key 'model.dropout' must be >= 0 and < 1, "
         "got 1.5"),
        ("train.lr: {low: 0, high: 0.1, log: true}", "key 'train.lr' must be > 0, got 0.0"),
        ("model.l2: {low: 0, high: 0.1, log: true}", "a log scale needs low > 0, got 0.0"),
        ("model.alpha: {low: 0.1, high: 0.9, lo: 1}", "unknown field(s) lo (known: low, high"),
        ("model.alpha: {high: 0.9}", "give a range (low and high) or choices"),
        ("model.transition_term: {low: 0, high: 1}", "key 'model.transition_term' is bool: give "
         "its choices"),
        ("train.optimizer: [adam, adagrad]", "key 'train.optimizer' must be one of adam, sgd, "
         "got 'adagrad'"),
        ("train.batch_size: {choices: [64, 64]}", "choices [64, 64] repeat a value"),
        ("train.seed: {low: 1, high: 9}", "key 'train.seed' cannot be searched: a seed picked "
         "on validation"),
        ("data.max_len: [10, 20]", "key 'data.max_len' cannot be searched: the prepared data"),
        ("L: {low: 1, high: 3}", "give dotted config keys"),
    ],
)  # fmt: skip
def test_a_space_is_checked_by_the_configs_own_rules(tiny, text, message):
    import yaml

    checked = tune.checker(str(tiny), [])
    with pytest.raises((tune.TuneError, ConfigError)) as caught:
        tune.parse_space(yaml.safe_load(text), "--space s.yaml", checked)
    assert message in str(caught.value)


def test_a_space_file_reads_as_written(tiny, tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text(
        "model.L: {low: 1, high: 4}\ntrain.lr: {low: 1e-4, high: 1e-2, log: true}\n"
        "model.dropout: {low: 0, high: 0.5, step: 0.1}\nmodel.transition_term: [true, false]\n"
    )
    params = tune.read_space(str(space), tune.checker(str(tiny), []))
    assert params == (
        tune.Param("model.L", 1, 4, integer=True),
        tune.Param("train.lr", 1e-4, 1e-2, log=True),  # YAML's "1e-4" string read as a float
        tune.Param("model.dropout", 0.0, 0.5, step=0.1),
        tune.Param("model.transition_term", choices=(True, False)),
    )


def test_the_default_space_is_valid_for_the_paper_configs_and_documented(tmp_path):
    show = [sys.executable, "-m", "mqsa_ted.cli", "tune", "--show-space"]
    shown = subprocess.run(show, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    (tmp_path / "space.yaml").write_text(shown.stdout)
    for config in ("configs/beauty.yaml", "configs/toys.yaml", "configs/demo.yaml"):
        checked = tune.checker(str(ROOT / config), [])
        assert tune.read_space(str(tmp_path / "space.yaml"), checked) == tune.DEFAULT_SPACE
    doc = (ROOT / "docs" / "tuning.md").read_text()
    row = r"^\| `((?:model|train|loss|embeddings)\.\w+)` \| ([^|]+?) \|"
    table = dict(re.findall(row, doc, flags=re.M))
    assert table == {p.key: p.describe() for p in tune.DEFAULT_SPACE}
