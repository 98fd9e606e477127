"""``mqsa-ted``: one command for every step, from an event log to recommendations.

    mqsa-ted prepare CONFIG [section.key=value ...]
    mqsa-ted train CONFIG [section.key=value ...] [--nproc N]
    mqsa-ted export RUN_DIR [--out URL]
    mqsa-ted recommend EXPORT_DIR --history id1,id2,... [--k 10]
    mqsa-ted report RUN_DIR
    mqsa-ted baselines CONFIG [section.key=value ...]
    mqsa-ted tune CONFIG [section.key=value ...] --trials N [--space FILE] [--jobs J]
    mqsa-ted config CONFIG [section.key]
    mqsa-ted synth --out URL --events N [--kind series] [--format csv] ...

Each subcommand runs the ``main(argv)`` of its module (``spark_jobs.prepare``,
``trainer.train``, ...), imported only once the subcommand is chosen and, for those that take a
CONFIG, the config has been read and checked (``recommend`` checks its arguments and inputs
the same way: :mod:`mqsa_ted.recommend_cli`): a typo costs no Spark or torch start-up. Every
command first installs the filters of the third-party warnings we understand
(:mod:`mqsa_core.quiet`). ``train`` with more than one process re-runs itself under torchrun on this
machine (``--nproc``, default ``distributed.nproc_per_node``): torchrun picks a free rendezvous
port, or uses the one ``MASTER_PORT`` / ``RDZV_ENDPOINT`` name once :mod:`mqsa_ted.rendezvous`
has found it free (before torch is imported); several machines: ``launch.sh``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import os
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from mqsa_core import openmp, quiet
from mqsa_core.config import Config, ConfigError, load_config
from mqsa_core.errors import UserError
from mqsa_core.prepared import require_complete
from mqsa_ted.rendezvous import RendezvousError, endpoint_of, host_conf


def read_config(path: str, overrides: Sequence[str] = ()) -> Config:
    """:func:`mqsa_core.config.load_config`, with a path that cannot be read as a file (a directory,
    no permission) refused as a :class:`ConfigError` too."""
    try:
        return load_config(path, list(overrides))
    except OSError as e:
        hint = " (give a YAML file, e.g. configs/demo.yaml)" if os.path.isdir(path) else ""
        raise ConfigError(f"cannot read the config {path}: {e.strerror or e}{hint}") from e


def positionals(argv: list[str]) -> list[str]:
    """The arguments before the first option (``--...``)."""
    found = []
    for arg in argv:
        if arg.startswith("-"):
            break
        found.append(arg)
    return found


def check_config(argv: list[str]) -> None:
    """Read the CONFIG and overrides at the start of ``argv`` (raises :class:`ConfigError`).

    Options (``--...``) and anything after them are left to the command.
    """
    given = positionals(argv)
    if given:
        read_config(given[0], given[1:])


def check_config_file(argv: list[str]) -> None:
    """Read the CONFIG that starts ``argv``, if any (``mqsa-ted config``: what follows it is a
    key, not an override)."""
    given = positionals(argv)
    if given:
        read_config(given[0])


@dataclass(frozen=True)
class Command:
    """A subcommand: the module whose ``main(argv)`` runs it, what it reads and writes, and the
    cheap checks of its arguments made before that module (torch, Spark) is imported."""

    module: str
    summary: str
    reads: str
    writes: str
    check: Callable[[list[str]], None] | None = None

    def about(self) -> str:
        """What ``--help`` prints between the usage line and the module's own description."""
        return f"{self.summary}\n\nreads:  {self.reads}\nwrites: {self.writes}\n"


COMMANDS: dict[str, Command] = {
    "prepare": Command(
        "spark_jobs.prepare",
        "Turn an event log into user sequences, a leave-one-out split and the item-transition "
        "graph (Spark).",
        "data.events: the event log (Parquet, CSV or JSON lines; columns data.user_col, "
        "data.item_col, data.time_col)",
        "data.dir: vocab/, sequences/, transitions/, stats.json",
        check_config,
    ),
    "train": Command(
        "trainer.train",
        "Train MQSA-TED on the prepared data; valid + test full-ranking evaluation every "
        "train.eval_every epochs; the best valid NDCG@20 epoch is kept.",
        "data.dir (written by prepare); train.resume: a checkpoint to continue from",
        "train.run_dir: config.yaml, metrics.json, model.pt (best epoch), checkpoints/",
        check_config,
    ),
    "export": Command(
        "mqsa_ted.export",
        "Export a trained run for retrieval.",
        "RUN_DIR/config.yaml, RUN_DIR/model.pt (+ TorchRec checkpoint), data.dir/vocab/",
        "--out (default export.out, else RUN_DIR/export): a new version with items/*.parquet, "
        "user_encoder.pt, faiss.index, manifest.json, then CURRENT",
    ),
    "recommend": Command(
        "mqsa_ted.recommend_cli",
        "Top-K items for a history of raw item ids (oldest first).",
        "EXPORT_DIR (written by export); --batch: Parquet with user_id, history",
        "the top-K list on standard output, or --out (Parquet: user_id, items, scores)",
    ),
    "report": Command(
        "mqsa_ted.report",
        "The run against the baselines (lift, curves) and sample recommendations.",
        "RUN_DIR/metrics.json, RUN_DIR/config.yaml, data.dir (for the baselines), the export",
        "RUN_DIR/report.md, RUN_DIR/curves.png (and the report on standard output)",
    ),
    "baselines": Command(
        "trainer.evaluation.baselines",
        "Most popular and last item -> most frequent next, under the model's protocol.",
        "data.dir (written by prepare)",
        "valid and test metrics as JSON on standard output",
        check_config,
    ),
    "tune": Command(
        "mqsa_ted.tune",
        "Search hyperparameters on validation only. An Optuna study (TPE, median pruning) of "
        "training runs; the best config as YAML.",
        "CONFIG and data.dir (written by prepare); --space: a search space YAML file",
        "--dir (default <train.run_dir>-tune): study.journal, trial-NNNN/ run directories, "
        "best.yaml, best.json",
        check_config,
    ),
    "config": Command(
        "mqsa_core.config",
        "Print the resolved config, or one value of it.",
        "CONFIG (YAML)",
        "standard output",
        check_config_file,
    ),
    "synth": Command(
        "spark_jobs.synth",
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


def rendezvous_args(env: Mapping[str, str]) -> list[str]:
    """torchrun's rendezvous arguments for ``train --nproc`` on this machine: ``--standalone``
    (torchrun picks a free port) unless ``MASTER_PORT`` or ``RDZV_ENDPOINT`` name one, which
    must then be free here (:func:`mqsa_ted.rendezvous.host_conf`, no torch import)."""
    endpoint = endpoint_of(env)
    if endpoint is None:
        return ["--standalone"]
    conf = host_conf(endpoint, node_rank=0)
    if not conf:
        raise RendezvousError(
            f"rendezvous endpoint {endpoint} is not an address of this machine: "
            "mqsa-ted train --nproc runs on this machine only (several machines: ./launch.sh)"
        )
    return ["--nnodes=1", "--rdzv_backend=c10d", f"--rdzv_endpoint={endpoint}",
            f"--rdzv_id=mqsa-ted-{os.getpid()}", f"--rdzv_conf={conf}join_timeout=60"]  # fmt: skip


def train(argv: list[str]) -> int:
    """``mqsa-ted train``: in this process, or under torchrun when more processes are asked."""
    parser = argparse.ArgumentParser()
    parser.add_argument("config", help="YAML config file (configs/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.epochs=3")
    parser.add_argument("--nproc", type=int, default=0,
                        help="processes on this machine (default distributed.nproc_per_node); "
                        "several machines: ./launch.sh")  # fmt: skip
    args = parser.parse_args(argv)
    worker_argv = [args.config, *args.overrides]
    cfg = read_config(args.config, args.overrides)
    nproc = args.nproc or cfg.distributed.nproc_per_node
    spawn = nproc > 1 and "LOCAL_RANK" not in os.environ
    rendezvous = rendezvous_args(os.environ) if spawn else []  # before torch is imported
    require_complete(cfg.data.dir)  # before starting processes that would each fail on it
    if spawn:
        command = [
            sys.executable, "-m", "mqsa_ted.torchrun", *rendezvous,
            f"--nproc_per_node={nproc}", "-m", "mqsa_ted.cli", "train", *worker_argv,
        ]  # fmt: skip
        # one thread per rank unless asked otherwise (train.threads divides the cores)
        env = {"OMP_NUM_THREADS": "1", **os.environ}
        return subprocess.call(command, env=env)
    from trainer.train import main as train_main

    return train_main(worker_argv)


@contextlib.contextmanager
def program(name: str) -> Iterator[None]:
    """Run the block with ``sys.argv[0]`` = ``mqsa-ted NAME``: argparse's usage and error lines
    of the command's module then name the command the user typed."""
    before = sys.argv[0] if sys.argv else ""
    if not sys.argv:
        sys.argv.append("")
    sys.argv[0] = f"mqsa-ted {name}"
    try:
        yield
    finally:
        sys.argv[0] = before


def run_command(name: str, argv: list[str]) -> int:
    """Run subcommand ``name`` with ``argv`` (its module imported only now)."""
    with program(name):
        if name == "train":
            return train(argv)
        return importlib.import_module(COMMANDS[name].module).main(argv)


def command_help(name: str, argv: list[str]) -> str:
    """``mqsa-ted NAME --help``: the usage line of the command's own parser, what it reads and
    writes, then the parser's description and options (one usage line in all)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        run_command(name, argv)
    usage, _, rest = out.getvalue().partition("\n\n")
    return f"{usage}\n\n{COMMANDS[name].about()}\n{rest}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(top_level_help(), end="")
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command '{name}'; one of: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    quiet.install()  # the accelerator is chosen by trainer.runtime.distributed.accelerator (torch)
    openmp.limit_spinning()  # before torch loads libgomp (mqsa_core/openmp.py)
    if "-h" in rest or "--help" in rest:
        print(command_help(name, rest), end="")
        return 0
    try:
        check = COMMANDS[name].check
        if check is not None:
            check(rest)
        return run_command(name, rest)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
