"""The ``mqsa-ted`` command: the installed entry point, each subcommand's help (one usage line),
errors before heavy imports (configs, recommend's arguments and inputs, a busy rendezvous port),
and the example config's prepare on the committed example log."""

from __future__ import annotations

import importlib
import os
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mqsa_core.prepared import read_stats
from mqsa_ted import cli
from mqsa_ted.rendezvous import RendezvousError, host_conf
from tests.test_serving_queries import synthetic_export

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "deepspeed", "pyspark", "torchrec")


def test_console_script_resolves_to_the_cli():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, attr = scripts["mqsa-ted"].partition(":")
    assert getattr(importlib.import_module(module), attr) is cli.main


@pytest.mark.parametrize("name", list(cli.COMMANDS))
def test_help_says_what_each_command_reads_and_writes(name, capsys):
    assert cli.main([name, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: mqsa-ted {name} [-h]")  # the command's own parser's usage
    assert [line for line in out.splitlines() if "usage:" in line] == out.splitlines()[:1]
    assert f"reads:  {cli.COMMANDS[name].reads}" in out
    assert f"writes: {cli.COMMANDS[name].writes}" in out
    assert "options:" in out  # the module's own options follow
    assert "python -m mqsa_ted" not in out  # the command a user types is mqsa-ted


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
        (["train", "configs"], "cannot read the config configs: Is a directory (give a YAML"),
        (["prepare", "configs"], "cannot read the config configs: Is a directory"),
        (["config", "configs", "train.epochs"], "cannot read the config configs: Is a directory"),
    ],
)
def test_a_bad_config_fails_in_one_line_before_any_heavy_import(argv, message):
    proc, _ = light_run(argv)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines


def light_run(argv: list[str], **env: str) -> tuple[subprocess.CompletedProcess, float]:
    """``mqsa-ted ARGV`` in a fresh process (``env`` added to this one's); asserts that it
    exits 2 without importing any heavy module; returns the process and its wall seconds."""
    code = (
        "import sys; from mqsa_ted.cli import main; rc = main(sys.argv[1:]);"
        f"print(rc, sorted(m for m in {HEAVY!r} if m in sys.modules))"
    )
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, *argv], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={**os.environ, **env})  # fmt: skip
    seconds = time.perf_counter() - start
    assert proc.stdout.strip() == "2 []", proc.stdout + proc.stderr
    return proc, seconds


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    """A synthetic export (300 items) and, next to it, inputs for ``--batch``."""
    root = tmp_path_factory.mktemp("recommend")
    synthetic_export(root)
    (root / "not-parquet.parquet").write_text("user_id,history\nu1,i1\n")
    pq.write_table(pa.table({"user_id": ["u1"], "items": [["i1"]]}), root / "no-history.parquet")
    pq.write_table(pa.table({"user_id": ["u1"], "history": ["i1"]}), root / "flat.parquet")
    pq.write_table(pa.table({"user_id": ["u1"], "history": [["i1"]]}), root / "good.parquet")
    return root


@pytest.mark.parametrize(
    "args, message",
    [
        (["--history", "i1", "--k", "0"], "--k must be at least 1, got 0"),
        (["--history", "i1", "--k", "301"], "--k 301 is more than the 300 items of the export"),
        (["--history", "i1", "--out", "recs.parquet"], "--out is only for --batch (the answer "
         "to --history is printed)"),
        (["--batch", "{root}/missing.parquet"], "--batch {root}/missing.parquet not found"),
        (["--batch", "{root}"], "--batch {root} is a directory: give one Parquet file"),
        (["--batch", "{root}/not-parquet.parquet"], "--batch {root}/not-parquet.parquet is not a "
         "Parquet file (Parquet magic bytes not found in footer. Either the file is corrupted "
         "or this is not a parquet file.)"),
        (["--batch", "{root}/no-history.parquet"], "--batch {root}/no-history.parquet lacks the "
         "column(s) history (it has: user_id, items)"),
        (["--batch", "{root}/flat.parquet"], "--batch {root}/flat.parquet: history is string, "
         "not a list of raw item ids"),
        (["--batch", "{root}/good.parquet", "--out", "{root}/none/recs.parquet"], "--out "
         "{root}/none/recs.parquet: the directory {root}/none does not exist"),
        (["--batch", "{root}/good.parquet", "--out", "{root}"], "--out {root} is a directory: "
         "give a file name (recs.parquet)"),
    ],
)  # fmt: skip
def test_recommend_refuses_bad_arguments_before_loading_the_export(export, args, message):
    argv = ["recommend", str(export / "export"), *(a.format(root=export) for a in args)]
    proc, seconds = light_run(argv)
    assert proc.stderr.splitlines() == ["error: " + message.format(root=export)]
    assert seconds < 3, f"refused after {seconds:.1f} s"


def test_recommend_without_an_export_is_refused_at_once(tmp_path):
    proc, seconds = light_run(["recommend", str(tmp_path), "--history", "i1"])
    assert proc.stderr.splitlines() == [
        f"error: {tmp_path} holds no committed export (no CURRENT): run `mqsa-ted export "
        f"RUN_DIR --out {tmp_path}` first"
    ]
    assert seconds < 3, f"refused after {seconds:.1f} s"


def test_train_refuses_a_busy_rendezvous_port_before_torch_loads():
    """``MASTER_PORT`` names the port torchrun would host its store on: one held by another
    job is refused in one line, before torch is imported (launch.sh shares the check)."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc, seconds = light_run(["train", "configs/demo.yaml", "--nproc", "2"],
                                  MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                                  RDZV_ENDPOINT="")  # fmt: skip
    assert proc.stderr.splitlines() == [
        f"error: rendezvous port {port} on 127.0.0.1 is already in use (another job?): set "
        "MASTER_PORT (or RDZV_ENDPOINT) to a free port"
    ]
    assert seconds < 3, f"refused after {seconds:.1f} s"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_rendezvous_arguments_of_train_nproc():
    assert cli.rendezvous_args({}) == ["--standalone"]  # torchrun picks a free port
    port = free_port()
    args = cli.rendezvous_args({"MASTER_PORT": str(port)})
    assert f"--rdzv_endpoint=127.0.0.1:{port}" in args
    assert "--rdzv_conf=is_host=true,join_timeout=60" in args
    with pytest.raises(RendezvousError, match="192.0.2.1:29500 is not an address of this mach"):
        cli.rendezvous_args({"RDZV_ENDPOINT": "192.0.2.1:29500"})  # TEST-NET-1: nobody's
    with pytest.raises(RendezvousError, match="'localhost:http' is not HOST:PORT"):
        cli.rendezvous_args({"RDZV_ENDPOINT": "localhost:http"})


def test_rendezvous_check_as_launch_sh_runs_it():
    port = free_port()
    for node_rank, conf in [("0", "is_host=true,"), ("1", "is_host=false,")]:
        proc = subprocess.run(
            [sys.executable, "-m", "mqsa_ted.rendezvous", f"127.0.0.1:{port}", node_rank],
            cwd=ROOT, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert (proc.returncode, proc.stdout.strip()) == (0, conf), proc.stderr
    assert host_conf("192.0.2.1:29500", 0) == ""  # not this machine: left to torchrun


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
    """libgomp reads GOMP_SPINCOUNT when torch loads it: the CLI sets it first
    (mqsa_core/openmp.py), and keeps a value the user set."""
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
