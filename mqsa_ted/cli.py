"""``mqsa-ted``: one command for every step, from an event log to recommendations.

    mqsa-ted prepare CONFIG [section.key=value ...]
    mqsa-ted train CONFIG [section.key=value ...] [--nproc N]
    mqsa-ted export RUN_DIR [--out URL]
    mqsa-ted recommend EXPORT_DIR --history id1,id2,... [--k 10]
    mqsa-ted report RUN_DIR
    mqsa-ted baselines CONFIG [section.key=value ...]
    mqsa-ted config CONFIG [section.key]
    mqsa-ted synth --out URL --events N [--kind series] [--format csv] ...

Each subcommand runs the ``main(argv)`` of its module (``spark_jobs.prepare``,
``trainer.train``, ...), imported only once the subcommand is chosen and, for those that take a
CONFIG, the config has been read and checked: a typo costs no Spark or torch start-up. Every
command first installs the filters of the third-party warnings we understand
(:mod:`core.quiet`). ``train`` with more than one process re-runs itself under torchrun on this
machine (``--nproc``, default ``distributed.nproc_per_node``); several machines: ``launch.sh``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
from dataclasses import dataclass

from core import openmp, quiet
from core.config import ConfigError, load_config
from core.errors import UserError
from core.prepared import require_complete


@dataclass(frozen=True)
class Command:
    """A subcommand: the module whose ``main(argv)`` runs it, and what it reads and writes."""

    module: str
    usage: str
    summary: str
    reads: str
    writes: str
    takes_config: bool = False

    def describe(self, name: str) -> str:
        """The block ``--help`` prints before the module's own options."""
        return (
            f"usage: mqsa-ted {name} {self.usage}\n\n{self.summary}\n\n"
            f"reads:  {self.reads}\nwrites: {self.writes}\n"
        )


COMMANDS: dict[str, Command] = {
    "prepare": Command(
        "spark_jobs.prepare",
        "CONFIG [section.key=value ...]",
        "Turn an event log into user sequences, a leave-one-out split and the item-transition "
        "graph (Spark).",
        "data.events: the event log (Parquet, CSV or JSON lines; columns data.user_col, "
        "data.item_col, data.time_col)",
        "data.dir: vocab/, sequences/, transitions/, stats.json",
        takes_config=True,
    ),
    "train": Command(
        "trainer.train",
        "CONFIG [section.key=value ...] [--nproc N]",
        "Train MQSA-TED on the prepared data; valid + test full-ranking evaluation every "
        "train.eval_every epochs; the best valid NDCG@20 epoch is kept.",
        "data.dir (written by prepare); train.resume: a checkpoint to continue from",
        "train.run_dir: config.yaml, metrics.json, model.pt (best epoch), checkpoints/",
        takes_config=True,
    ),
    "export": Command(
        "mqsa_ted.export",
        "RUN_DIR [--out URL] [--faiss auto|flat|ivf|hnsw|none]",
        "Export a trained run for retrieval.",
        "RUN_DIR/config.yaml, RUN_DIR/model.pt (+ TorchRec checkpoint), data.dir/vocab/",
        "--out (default export.out, else RUN_DIR/export): items/*.parquet, user_encoder.pt2, "
        "faiss.index, manifest.json",
    ),
    "recommend": Command(
        "mqsa_ted.recommend",
        "EXPORT_DIR (--history id1,id2,... | --batch FILE.parquet [--out FILE.parquet]) [--k K]",
        "Top-K items for a history of raw item ids (oldest first).",
        "EXPORT_DIR (written by export); --batch: Parquet with user_id, history",
        "the top-K list on standard output, or --out (Parquet: user_id, items, scores)",
    ),
    "report": Command(
        "mqsa_ted.report",
        "RUN_DIR [--export EXPORT_DIR] [--users N]",
        "The run against the baselines (lift, curves) and sample recommendations.",
        "RUN_DIR/metrics.json, RUN_DIR/config.yaml, data.dir (for the baselines), the export",
        "RUN_DIR/report.md, RUN_DIR/curves.png (and the report on standard output)",
    ),
    "baselines": Command(
        "trainer.baselines",
        "CONFIG [section.key=value ...]",
        "Most popular and last item -> most frequent next, under the model's protocol.",
        "data.dir (written by prepare)",
        "valid and test metrics as JSON on standard output",
        takes_config=True,
    ),
    "config": Command(
        "core.config",
        "CONFIG [section.key] [--set section.key=value ...]",
        "Print the resolved config, or one value of it.",
        "CONFIG (YAML)",
        "standard output",
    ),
    "synth": Command(
        "spark_jobs.synth",
        "--out URL --events N [--users U] [--items I] [--seed S] [--kind KIND] "
        "[--format parquet|csv|json] [--time seconds|iso]",
        "Write a seeded synthetic event log with planted structure.",
        "nothing",
        "--out: part-NNNNN.<format> files and _COMPLETE",
    ),
}


def top_level_help() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {cmd.summary.split('.')[0]}" for name, cmd in COMMANDS.items()]
    return (
        "usage: mqsa-ted COMMAND [ARGS ...]\n\n"
        "MQSA-TED sequential recommendation: prepare -> train -> export -> recommend.\n\n"
        "commands:\n" + "\n".join(lines) + "\n\n"
        "mqsa-ted COMMAND --help lists what a command reads and writes, and its options.\n"
        "Process count: mqsa-ted train --nproc N (docs/scaling.md says how to choose it).\n"
    )


def check_config(argv: list[str]) -> None:
    """Read the CONFIG and overrides at the start of ``argv`` (raises :class:`ConfigError`).

    Options (``--...``) and anything after them are left to the command.
    """
    positional = []
    for arg in argv:
        if arg.startswith("-"):
            break
        positional.append(arg)
    if positional:
        load_config(positional[0], positional[1:])


def train(argv: list[str]) -> int:
    """``mqsa-ted train``: in this process, or under torchrun when more processes are asked."""
    parser = argparse.ArgumentParser(
        prog="mqsa-ted train",
        description=COMMANDS["train"].describe("train"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("config", help="YAML config file (configs/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.epochs=3")
    parser.add_argument("--nproc", type=int, default=0,
                        help="processes on this machine (default distributed.nproc_per_node); "
                        "several machines: ./launch.sh")  # fmt: skip
    args = parser.parse_args(argv)
    worker_argv = [args.config, *args.overrides]
    cfg = load_config(args.config, args.overrides)
    require_complete(cfg.data.dir)  # before starting processes that would each fail on it
    nproc = args.nproc or cfg.distributed.nproc_per_node
    if nproc > 1 and "LOCAL_RANK" not in os.environ:
        command = [
            sys.executable, "-m", "mqsa_ted.torchrun", "--standalone",
            f"--nproc_per_node={nproc}", "-m", "mqsa_ted.cli", "train", *worker_argv,
        ]  # fmt: skip
        # one thread per rank unless asked otherwise (train.threads divides the cores)
        env = {"OMP_NUM_THREADS": "1", **os.environ}
        return subprocess.call(command, env=env)
    from trainer.train import main as train_main

    return train_main(worker_argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(top_level_help(), end="")
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command '{name}'; one of: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    quiet.install()  # the accelerator is chosen by trainer.distributed.accelerator (torch)
    openmp.limit_spinning()  # before torch loads libgomp (core/openmp.py)
    command = COMMANDS[name]
    try:
        if name == "train":
            return train(rest)
        if "-h" in rest or "--help" in rest:
            print(command.describe(name))
        elif command.takes_config:
            check_config(rest)
    except (ConfigError, UserError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    module = importlib.import_module(command.module)
    return module.main(rest)


if __name__ == "__main__":
    sys.exit(main())
