"""The ``mqsa-ted`` command: the installed entry point, each subcommand's help, errors before
heavy imports, and the example config's prepare on the committed example log."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pandas as pd
import pytest

from core.prepared import read_stats
from mqsa_ted import cli

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "deepspeed", "pyspark", "torchrec")


def test_console_script_resolves_to_the_cli():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, attr = scripts["mqsa-ted"].partition(":")
    assert getattr(importlib.import_module(module), attr) is cli.main


@pytest.mark.parametrize("name", list(cli.COMMANDS))
def test_help_says_what_each_command_reads_and_writes(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([name, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert f"usage: mqsa-ted {name}" in out
    assert f"reads:  {cli.COMMANDS[name].reads}" in out
    assert f"writes: {cli.COMMANDS[name].writes}" in out
    assert "options:" in out  # the module's own options follow


def test_top_level_help_and_unknown_command(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(f"  {name} " in out for name in cli.COMMANDS)
    assert "docs/scaling.md" in out
    assert cli.main(["trian", "configs/demo.yaml"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: unknown command 'trian'; one of: {', '.join(cli.COMMANDS)}"
    )


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "configs/demo.yaml", "train.epoch=3"], "train.epoch"),
        (["prepare", "configs/demo.yaml", "data.kcor=5"], "data.kcor"),
        (["baselines", "configs/demo.yaml", "model.dim=big"], "model.dim"),
        (["train", "configs/demo.yaml", "data.dir=/nonexistent/prepared"], "/nonexistent/prepared"),
    ],
)
def test_a_bad_config_fails_in_one_line_before_any_heavy_import(argv, message):
    code = (
        "import sys; from mqsa_ted.cli import main; rc = main(sys.argv[1:]);"
        f"print(rc, sorted(m for m in {HEAVY!r} if m in sys.modules))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, *argv], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.stdout.strip() == "2 []", proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines


def test_example_config_prepares_the_example_log(spark, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the config's paths are relative to the repository root
    out = tmp_path / "prepared"
    assert cli.main(["prepare", "configs/example.yaml", f"data.dir={out}"]) == 0
    events = pd.read_csv(ROOT / "examples" / "events.csv")
    assert list(events.columns) == ["user_id", "item_id", "timestamp"]
    assert events["timestamp"].str.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$").all()
    stats = read_stats(str(out))
    assert (stats["users"], stats["items"], stats["events"]) == (
        events["user_id"].nunique(),
        events["item_id"].nunique(),
        len(events),
    )
    assert stats["train_events"] == len(events) - 2 * events["user_id"].nunique()


@pytest.mark.parametrize("preset,expected", [(None, "3000"), ("250000", "250000")])
def test_every_command_limits_openmp_spinning_before_torch_loads(preset, expected):
    """libgomp reads GOMP_SPINCOUNT when torch loads it: the CLI sets it first (core/openmp.py),
    and keeps a value the user set."""
    code = (
        "import os, sys; from mqsa_ted import cli;"
        "cli.main(['config', 'configs/demo.yaml', 'train.epochs']);"
        "import torch; print(os.environ['GOMP_SPINCOUNT'])"
    )
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    env["PYTHONPATH"] = str(ROOT)
    if preset is not None:
        env["GOMP_SPINCOUNT"] = preset
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["12", expected]
