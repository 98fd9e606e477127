"""Every bad setting is refused up front: by the config layer, before any heavy import, as one
``error:`` line and exit status 2 (also under launch.sh, before torchrun starts)."""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mqsa_core.config import (
    MEMORY_ENV,
    Config,
    ConfigError,
    check_prepare,
    check_section,
    human_bytes,
    job_machines,
    load_config,
    machine_memory,
    memory_estimates,
    rules_table,
)

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHON": sys.executable}

# (override, what the message must say the value must be)
BAD = [
    ("train.epochs=0", ">= 1"),
    ("model.dropout=1.5", ">= 0 and < 1"),
    ("model.dropout=1", ">= 0 and < 1"),
    ("train.batch_size=0", ">= 1"),
    ("train.batch_size=-8", ">= 1"),
    ("model.dim=0", ">= 1"),
    ("train.lr=-1", "> 0"),
    ("train.lr=.nan", "a finite number"),
    ("model.l2=.inf", "a finite number"),
    ("train.eval_every=0", ">= 1"),
    ("train.threads=-1", ">= 0"),
    ("model.tau=0", "> 0"),
    ("loss.num_negatives=0", ">= 1"),
    ("distributed.zero_stage=7", "one of 0, 1, 2"),
    ("distributed.zero_stage=3", "one of 0, 1, 2"),
    ("model.l2=-1e-4", ">= 0"),
    ("model.lambda_kd=-0.1", ">= 0"),
    ("model.alpha=1.5", "between 0 and 1"),
    ("model.L=0", ">= 1"),
    ("model.num_blocks=0", ">= 1"),
    ("data.max_len=0", ">= 1"),
    ("data.time_span=0", ">= 1"),
    ("data.num_files=0", ">= 1"),
    ("data.shuffle_buffer=0", ">= 1"),
    ("data.kcore=-1", ">= 0"),
    ("data.top_k_successors=-1", ">= 0"),
    ("data.max_time_gap=-1", ">= 0"),
    ("data.user_col=", "a non-empty string"),
    ("train.patience=-1", ">= 0"),
    ("train.score_chunk=0", ">= 1"),
    ("train.eval_batch_size=0", ">= 1"),
    ("train.log_every=-1", ">= 0"),
    ("train.grad_clip=-1", ">= 0"),
    ("train.seed=-1", ">= 0"),
    ("checkpoint.keep=0", ">= 1"),
    ("checkpoint.every=-1", ">= 0"),
    ("distributed.nproc_per_node=0", ">= 1"),
    ("embeddings.lr=0", "> 0"),
    # roots and empty locations: where a run would write (and delete what it created)
    ("train.run_dir=", "other than a filesystem or bucket root"),
    ("train.run_dir=/", "other than a filesystem or bucket root"),
    ("train.run_dir=/tmp/..", "other than a filesystem or bucket root"),
    ("train.run_dir=file:///", "other than a filesystem or bucket root"),
    ("train.run_dir=memory://", "other than a filesystem or bucket root"),
    ("data.dir=", "other than a filesystem or bucket root"),
    ("data.dir=hdfs://namenode:8020/", "other than a filesystem or bucket root"),
    ("checkpoint.dir=/", "other than a filesystem or bucket root"),
    ("checkpoint.dir=s3://bucket/", "other than a filesystem or bucket root"),
    ("export.out=gs://bucket", "other than a filesystem or bucket root"),
]


@pytest.mark.parametrize(("override", "rule"), BAD, ids=[b[0] for b in BAD])
def test_out_of_range_settings_are_refused_naming_key_value_rule_and_source(override, rule):
    key, _, text = override.partition("=")
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    message = str(err.value)
    assert message.startswith(f"override '{override}': key '{key}' must be ")
    assert rule in message and ", got " in message


def test_a_bad_value_in_a_file_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  dropout: 1.5\n")
    with pytest.raises(ConfigError, match=re.escape(f"{path}: key 'model.dropout' must be")):
        load_config(str(path))


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["data.dir=/d", "train.run_dir=/d/run"], "key 'train.run_dir' must be outside data.dir"),
        (["data.dir=/d", "checkpoint.dir=/d"], "key 'checkpoint.dir' must be outside data.dir"),
        (["train.run_dir=/r", "export.out=/r"], "key 'export.out' must be neither train.run_dir"),
    ],
)
def test_outputs_that_would_clash_are_refused_naming_both_keys(overrides, needle):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert needle in str(err.value) and f"(from override '{overrides[0]}')" in str(err.value)


def test_defaults_shipped_configs_and_good_locations_pass():
    defaults = Config()
    for name in ("data", "model", "embeddings", "loss", "train", "distributed", "checkpoint"):
        check_section(name, getattr(defaults, name))
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        load_config(str(path))
    good = ["train.run_dir=s3://bucket/runs/a", "checkpoint.dir=/tmp/ck", "export.out=",
            "model.dropout=0", "distributed.zero_stage=2", "train.threads=0"]  # fmt: skip
    load_config(None, good)


def test_prepare_needs_the_event_log():
    cfg = load_config(None).data
    with pytest.raises(ConfigError, match="key 'data.events' is empty"):
        check_prepare(cfg)
    cfg.num_files = 0
    with pytest.raises(ConfigError, match="key 'data.num_files' must be >= 1"):
        check_prepare(cfg)


def test_docs_list_every_rule():
    docs = (ROOT / "docs" / "configuration.md").read_text()
    missing = [f"| `{k}` | {t} |" for k, t in rules_table() if f"| `{k}` | {t} |" not in docs]
    assert not missing, "regenerate with `python -m mqsa_core.config --rules`:\n" + "\n".join(
        missing
    )


def one_error_line(proc: subprocess.CompletedProcess, key: str) -> None:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and key in lines[0], proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr


def test_train_refuses_a_bad_setting_before_importing_torch():
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "trainer.train", "configs/demo.yaml", "train.epochs=0"],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert time.perf_counter() - start < 2.0
    one_error_line(proc, "'train.epochs'")
    code = (
        "import sys; from trainer.train import main; rc = main(['configs/demo.yaml',"
        " 'distributed.zero_stage=3']); heavy = ('torch', 'deepspeed', 'torchrec', 'pyspark');"
        " print(rc, [m for m in heavy if m in sys.modules])"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert proc.stdout.strip() == "2 []", proc.stdout + proc.stderr


def test_launch_refuses_a_bad_setting_before_torchrun():
    start = time.perf_counter()
    proc = subprocess.run(
        [str(ROOT / "launch.sh"), "configs/demo.yaml", "model.dropout=1.5"],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert time.perf_counter() - start < 2.0
    one_error_line(proc, "'model.dropout'")
    assert "ChildFailedError" not in proc.stdout + proc.stderr


def test_launch_usage_is_only_the_header():
    proc = subprocess.run([str(ROOT / "launch.sh")], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=30)  # fmt: skip
    assert proc.returncode == 2
    assert "./launch.sh CONFIG" in proc.stderr and "set -euo" not in proc.stderr


# Settings that cannot fit: (override, what the one-line error must say), against 16 GiB.
TOO_BIG = [
    ("train.batch_size=1000000000000", "of activations per training step"),
    ("data.max_len=100000", "of activations per training step"),
    ("model.dim=100000000", "of weights, gradients and Adam state per process"),
    ("train.eval_batch_size=100000000000", "per evaluation batch"),
]


@pytest.mark.parametrize(("override", "needle"), TOO_BIG, ids=[t[0] for t in TOO_BIG])
def test_settings_that_cannot_fit_are_refused_with_the_estimate(monkeypatch, override, needle):
    monkeypatch.setenv(MEMORY_ENV, "16")
    for name in ("NNODES", "SLURM_NNODES", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    message = str(err.value)
    assert override in message and needle in message and "this machine has 16.0 GiB" in message
    assert "\n" not in message
    cfg = Config()
    key, _, value = override.partition("=")
    section, _, name = key.partition(".")
    setattr(getattr(cfg, section), name, int(value))
    estimate = next(size for what, size in memory_estimates(cfg) if needle in what)
    assert estimate > 16 * 2**30 and f"~{human_bytes(estimate)} " in message
    load_config(None, [override], fit=False)  # a saved run's config, read to export it
    monkeypatch.setenv(MEMORY_ENV, "0")  # no check
    load_config(None, [override])


def test_the_estimate_of_a_step_is_split_over_the_machines(monkeypatch):
    # 2**18 users x 50 x 64: ~55 GiB of activations on one machine, under 16 GiB on four
    monkeypatch.setenv(MEMORY_ENV, "16")
    for name in ("NNODES", "SLURM_NNODES", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    big = [f"train.batch_size={2**18}"]
    with pytest.raises(ConfigError, match=r"needs ~54\.\d GiB of activations per training step "):
        load_config(None, big)
    monkeypatch.setenv("NNODES", "4")
    assert job_machines() == 4
    load_config(None, big)
    monkeypatch.delenv("NNODES")
    monkeypatch.setenv("WORLD_SIZE", "8")  # torchrun: 8 ranks, 2 per machine
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert job_machines() == 4
    monkeypatch.setenv(MEMORY_ENV, "lots")
    with pytest.raises(ConfigError, match=f"{MEMORY_ENV}='lots' must be a number of GiB"):
        load_config(None)


def test_machine_memory_is_this_machines():
    with open("/proc/meminfo") as f:
        total = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemTotal:"))
    assert os.environ.get(MEMORY_ENV) is None, "unset it to run this test"
    assert 0 < machine_memory() <= total


def test_integers_beyond_int64_and_non_integers_are_refused():
    with pytest.raises(ConfigError, match=r"'data.max_len' must be an integer within int64"):
        load_config(None, ["data.max_len=10000000000000000000000"])
    with pytest.raises(ConfigError, match=r"'data.max_len' must be int, got str '1e22'"):
        load_config(None, ["data.max_len=1e22"])
    with pytest.raises(ConfigError, match=r"'data.max_len' must be int, got float 1e\+22"):
        load_config(None, ["data.max_len=1.0e+22"])


def test_the_estimates_match_the_model():
    """The dense state is the encoder's parameters x 4 copies; the step's activations are at
    most what the real encoder saves for its backward (dropout 0: the fewest tensors)."""
    import torch

    from mqsa_core.config import ModelConfig, dense_state, step_activations
    from trainer.model.encoder import MQSAEncoder

    for batch, length, dim, blocks in [(16, 50, 32, 1), (8, 120, 16, 2), (12, 10, 96, 1)]:
        encoder = MQSAEncoder(ModelConfig(dim=dim, num_blocks=blocks, dropout=0.0), length)
        params = sum(p.numel() for p in encoder.parameters())
        assert dense_state(dim, blocks, length) == params * 4 * 4
        storages: dict[int, int] = {}

        def pack(t: torch.Tensor, seen: dict[int, int] = storages) -> torch.Tensor:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        emb = torch.randn(batch, length, dim, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            encoder(emb, torch.ones(batch, length, dtype=torch.bool))
        assert step_activations(batch, length, dim, blocks) <= sum(storages.values())


def test_the_config_command_refuses_what_cannot_fit_in_one_line():
    env = {**ENV, MEMORY_ENV: "16"}
    proc = subprocess.run(
        [sys.executable, "-m", "mqsa_core.config", "configs/demo.yaml", "--set",
         "train.batch_size=1000000000000"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    one_error_line(proc, "train.batch_size=1000000000000 x data.max_len=50 x model.dim=64")
    assert "PiB of activations per training step" in proc.stderr
