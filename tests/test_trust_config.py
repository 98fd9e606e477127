"""Every bad setting is refused up front: by the config layer, before any heavy import, as one
``error:`` line and exit status 2 (also under launch.sh, before torchrun starts)."""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from core.config import Config, ConfigError, check_prepare, check_section, load_config, rules_table

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
    assert not missing, "regenerate with `python -m core.config --rules`:\n" + "\n".join(missing)


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
