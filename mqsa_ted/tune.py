"""Hyperparameter search on validation only: ``mqsa-ted tune CONFIG [key=value ...] --trials N``.

    mqsa-ted tune configs/toys.yaml train.patience=10 --trials 40 --timeout 43200
    mqsa-ted tune CONFIG --trials 20 --space my_space.yaml --jobs 2 --nproc 1
    mqsa-ted tune --show-space > my_space.yaml     (the default space, to edit)

An Optuna study: a TPE sampler proposes each trial's settings from the search space (the
default space, or ``--space FILE``); each trial is a normal training run in its own process
(``python -m trainer.train CONFIG overrides settings train.run_dir=DIR/trial-NNNN``, torchrun
with ``--nproc`` > 1). The study follows the trial's ``metrics.json`` and reports the valid
NDCG@20 of every evaluation; a trial whose best so far is below the median of the completed
trials at the same epoch is pruned: it is sent SIGTERM, checkpoints and stops.

DIR (``--dir``, default ``<train.run_dir>-tune``) holds ``study.journal`` (Optuna's journal
storage: the whole study), ``trial-NNNN/`` (run directories: config.yaml, metrics.json,
model.pt, checkpoints/, train.log), ``best.yaml`` (the chosen trial's config, ready for
``mqsa-ted train``) and ``best.json`` (the chosen trial, its validation metrics and, for it
alone, its test metrics).

Budget: ``--trials N`` is the study's total: trials that completed, were pruned or failed count;
a rerun of the same command adds only the missing ones. ``--timeout S``: no trial starts after
S seconds of this command (running ones finish). Resuming: rerun the same command. A trial that
was running when the study stopped (SIGKILL, a lost machine, Ctrl-C) is marked failed and run
again in its own run directory, where ``train.resume=auto`` continues from its last checkpoint;
it does not count towards N. Selection: the objective is the trial's best valid NDCG@20; test
metrics are never read while choosing, only the chosen trial's, once chosen (docs/tuning.md).

Every argument, the config, the space file and the prepared data are checked before Optuna or
torch is imported: a refusal is one ``error:`` line and exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
import typing
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import fsspec
import yaml

from mqsa_core import openmp, quiet
from mqsa_core.config import Config, ConfigError, load_config
from mqsa_core.errors import UserError, first_line
from mqsa_core.lease import Lease, lease_url, read_holder
from mqsa_core.prepared import require_complete
from mqsa_core.storage import (
    atomic_write_bytes,
    is_local,
    is_root,
    mark_owned,
    read_json,
    write_json,
)
from mqsa_ted.cli import read_config
from trainer.runtime.run_dir import RunDir

if TYPE_CHECKING:  # Optuna is imported only once every argument has been checked
    import optuna

Value = bool | int | float | str
OBJECTIVE = "NDCG@20"  # of the validation split: the trainer's own best-epoch criterion
POLL_S = 0.25  # seconds between two reads of a running trial's metrics.json
STOP_GRACE_S = 120.0  # a stopped trial's seconds to checkpoint and exit before SIGKILL
STUDY_NAME = "mqsa-ted"
JOURNAL = "study.journal"
TUNE_KIND = "tune"  # the ownership marker's kind of the tune directory
PR_SET_PDEATHSIG = 1  # Linux prctl option: a signal for this process when its parent dies


class TuneError(UserError):
    """A tune command that cannot run as asked: a bad argument, search space or tune directory."""


class TrialFailed(Exception):
    """A trial whose run was refused by the config or ended with an error (the study goes on)."""


class TrialStopped(Exception):
    """A trial stopped because the study was stopped (a signal): run again on resume."""


@dataclass(frozen=True)
class Param:
    """One searched setting: a range ``low .. high`` of an int or float key (on a log scale with
    ``log``, in steps of ``step``), or ``choices`` for a key of any type."""

    key: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Value, ...] = ()
    integer: bool = False  # a range of an int key

    def suggest(self, trial: optuna.Trial) -> Value:
        """This trial's value, from the study's sampler."""
        if self.choices:
            return trial.suggest_categorical(self.key, list(self.choices))
        assert self.low is not None and self.high is not None
        if self.integer:
            step = int(self.step or 1)
            return trial.suggest_int(
                self.key, int(self.low), int(self.high), step=step, log=self.log
            )
        return trial.suggest_float(self.key, self.low, self.high, step=self.step, log=self.log)

    def contains(self, value: Value) -> bool:
        """Whether ``value`` lies in this space (steps aside)."""
        if self.choices:
            return any(type(value) is type(c) and value == c for c in self.choices)
        assert self.low is not None and self.high is not None
        return not isinstance(value, bool | str) and self.low <= value <= self.high

    def describe(self) -> str:
        """The range in words, as docs/tuning.md's table writes it."""
        if self.choices:
            return "one of " + ", ".join(map(str, self.choices))
        kind = "int" if self.integer else "float"
        scale = ", log scale" if self.log else ""
        step = f", step {self.step:g}" if self.step else ""
        return f"{kind} {self.low:g} .. {self.high:g}{scale}{step}"

    def entry(self) -> dict[str, Any]:
        """This parameter as an entry of a ``--space`` file."""
        if self.choices:
            return {"choices": list(self.choices)}
        entry: dict[str, Any] = {"low": self.low, "high": self.high}  # ints for an int key
        if self.log:
            entry["log"] = True
        if self.step:
            entry["step"] = self.step
        return entry


# The default space: the paper's hyperparameters (METHOD.md; its ablations: L 2..4 best, alpha
# about 0.5, lambda_kd about 0.1 with 0 clearly worse, tau 0.05..0.1) around its settings, and
# the optimizer's. docs/tuning.md's table is Param.describe() of each (tests/test_tune.py).
DEFAULT_SPACE: tuple[Param, ...] = (
    Param("model.L", 1, 6, integer=True),
    Param("model.num_blocks", 1, 3, integer=True),
    Param("model.alpha", 0.1, 0.9),
    Param("model.lambda_kd", 0.01, 1.0, log=True),
    Param("model.tau", 0.05, 0.5, log=True),
    Param("model.dropout", 0.0, 0.7),
    Param("model.l2", 1e-6, 1e-3, log=True),
    Param("train.lr", 1e-4, 1e-2, log=True),
    Param("train.batch_size", choices=(64, 128, 256, 512)),
)

# Keys a space may not search, and why: they decide where a trial runs or how it is measured,
# which must be the same for every trial of a study.
NOT_TUNABLE = {
    "data": "the prepared data is the study's (prepare another data.dir to tune on other data)",
    "distributed": "it decides how a trial runs, not what it learns (--nproc)",
    "checkpoint": "it decides where a trial saves, not what it learns",
    "export": "training does not read it",
    "train.run_dir": "each trial's run directory is <tune dir>/trial-NNNN",
    "train.resume": "a trial always resumes its own run directory (auto)",
    "train.init_from": "give a warm start to every trial as an override",
    "train.seed": "a seed picked on validation is noise fitted to it",
    "train.eval_protocol": "every trial is measured under the same protocol",
    "train.eval_every": "the pruner compares trials at the same epochs",
}
ENTRY_KEYS = ("low", "high", "log", "step", "choices")
SPACE_HELP = (
    "a YAML mapping of dotted config keys to a range {low: A, high: B} (int and float keys; "
    "optional log: true or step: S) or a list of choices {choices: [...]} (any key)"
)


def format_value(value: Value) -> str:
    """``value`` as the right side of a ``section.key=value`` override (JSON is YAML)."""
    return json.dumps(value)


def param_overrides(params: dict[str, Value]) -> list[str]:
    return [f"{key}={format_value(value)}" for key, value in params.items()]


def key_type(key: str) -> Any:
    """The declared type of ``section.key``; None for a key the config does not have."""
    section, _, name = key.partition(".")
    return typing.get_type_hints(type(getattr(Config(), section, None))).get(name)


def not_tunable(key: str) -> str | None:
    """Why ``key`` may not be searched, or None."""
    return NOT_TUNABLE.get(key) or NOT_TUNABLE.get(key.partition(".")[0])


def parse_space(raw: Any, source: str, checked: Callable[[str, Any], Value]) -> tuple[Param, ...]:
    """The parameters of a space read from YAML (``raw``), each value checked and converted by
    ``checked(key, value)`` (the config's own type and rules: an unknown key is refused with
    the config's message); raises :class:`TuneError` naming ``source`` and the key."""
    if not isinstance(raw, dict) or not raw:
        raise TuneError(f"{source}: a search space must be {SPACE_HELP}")
    params = []
    for key, body in raw.items():
        where = f"{source}: key '{key}'"
        if not isinstance(key, str) or "." not in key:
            raise TuneError(f"{where}: give dotted config keys (section.key, e.g. model.L)")
        if isinstance(body, list):
            body = {"choices": body}
        if not isinstance(body, dict):
            raise TuneError(f"{where}: must be {SPACE_HELP}")
        unknown = sorted(set(map(str, body)) - set(ENTRY_KEYS))
        if unknown:
            raise TuneError(
                f"{where}: unknown field(s) {', '.join(unknown)} (known: {', '.join(ENTRY_KEYS)})"
            )
        params.append(parse_entry(key, body, where, checked))
    return tuple(params)


def parse_entry(
    key: str, body: dict[str, Any], where: str, checked: Callable[[str, Any], Value]
) -> Param:
    """One parameter of a space (:func:`parse_space`)."""
    if "choices" in body:
        extra = sorted(set(body) - {"choices"})
        if extra:
            raise TuneError(f"{where}: choices cannot be combined with {', '.join(extra)}")
        raw = body["choices"]
        if not isinstance(raw, list) or not raw:
            raise TuneError(f"{where}: choices must be a non-empty list")
    else:
        if "low" not in body or "high" not in body:
            raise TuneError(f"{where}: give a range (low and high) or choices")
        expected = key_type(key)
        if expected is not None and expected not in (int, float):
            name = getattr(expected, "__name__", str(expected))
            raise TuneError(
                f"{where} is {name}: give its choices ({{choices: [...]}}), not a range"
            )
    first = checked(key, raw[0] if "choices" in body else body["low"])  # now a known key
    why = not_tunable(key)
    if why:
        raise TuneError(f"{where} cannot be searched: {why}")
    if "choices" in body:
        choices = (first, *(checked(key, value) for value in raw[1:]))
        if len(set(map(repr, choices))) < len(choices):
            raise TuneError(f"{where}: choices {list(choices)} repeat a value")
        return Param(key, choices=choices)
    expected = key_type(key)
    low, high = first, checked(key, body["high"])
    log, step = body.get("log", False), body.get("step")
    if not isinstance(log, bool):
        raise TuneError(f"{where}: log must be true or false, got {log!r}")
    if not low < high:
        raise TuneError(f"{where}: low must be below high, got {low!r} .. {high!r}")
    if log and low <= 0:
        raise TuneError(f"{where}: a log scale needs low > 0, got {low!r}")
    if step is not None:
        if isinstance(step, bool) or not isinstance(step, expected | int) or step <= 0:
            raise TuneError(f"{where}: step must be a positive {expected.__name__}, got {step!r}")
        if log:
            raise TuneError(f"{where}: a range takes log or step, not both")
    return Param(key, low, high, log=log, step=step, integer=expected is int)


def space_yaml(space: Sequence[Param]) -> str:
    """``space`` as a ``--space`` file, one key a line."""
    lines = [
        f"{p.key}: {yaml.safe_dump(p.entry(), default_flow_style=True, sort_keys=False).strip()}"
        for p in space
    ]
    return f"# mqsa-ted tune --space FILE:\n# {SPACE_HELP}\n" + "\n".join(lines) + "\n"


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one :class:`TuneError` line (``error: ...``, exit 2)."""

    def error(self, message: str) -> typing.NoReturn:
        raise TuneError(f"{message} (mqsa-ted tune --help)")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = OneLineParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("config", nargs="?", help="YAML config file (configs/*.yaml)")
    parser.add_argument(
        "overrides", nargs="*", help="section.key=value for every trial, e.g. train.patience=10"
    )
    parser.add_argument(
        "--trials",
        metavar="N",
        type=int,
        help="the study's total number of trials (a rerun adds the missing ones)",
    )
    parser.add_argument(
        "--space",
        metavar="FILE",
        help="search space YAML file (default: the paper's "
        "hyperparameters; --show-space prints them)",
    )
    parser.add_argument(
        "--dir", metavar="DIR", help="the study's directory (default <train.run_dir>-tune)"
    )
    parser.add_argument(
        "--jobs", metavar="J", type=int, default=1, help="trials run at once (default 1)"
    )
    parser.add_argument(
        "--timeout",
        metavar="SECONDS",
        type=float,
        help="start no trial after this many seconds (running ones finish)",
    )
    parser.add_argument(
        "--nproc",
        metavar="N",
        type=int,
        default=0,
        help="processes per trial (default distributed.nproc_per_node)",
    )
    parser.add_argument(
        "--seed", metavar="S", type=int, help="the sampler's seed (default train.seed)"
    )
    parser.add_argument(
        "--startup-trials",
        metavar="K",
        type=int,
        default=10,
        help="trials drawn at random before TPE models the space (default 10)",
    )
    parser.add_argument(
        "--prune-min-trials",
        metavar="K",
        type=int,
        default=5,
        help="no trial is pruned before this many trials have completed (default 5)",
    )
    parser.add_argument(
        "--prune-warmup",
        metavar="EPOCH",
        type=int,
        default=5,
        help="no trial is pruned before this epoch (default 5)",
    )
    parser.add_argument("--no-prune", action="store_true", help="run every trial to its end")
    parser.add_argument(
        "--show-space",
        action="store_true",
        help="print the default space as a --space file and exit",
    )
    return parser.parse_intermixed_args(argv)  # overrides may follow the options


def check_numbers(args: argparse.Namespace) -> None:
    """Refuse option values out of range (:class:`TuneError`)."""
    if args.trials is None:
        raise TuneError("--trials N is required: the study's total number of trials")
    for name, minimum in (
        ("trials", 1),
        ("jobs", 1),
        ("nproc", 0),
        ("startup_trials", 0),
        ("prune_min_trials", 1),
        ("prune_warmup", 0),
    ):
        value = getattr(args, name)
        if value < minimum:
            flag = "--" + name.replace("_", "-")
            raise TuneError(f"{flag} must be at least {minimum}, got {value}")
    if args.timeout is not None and not args.timeout > 0:
        raise TuneError(f"--timeout must be a number of seconds > 0, got {args.timeout}")


@dataclass
class Setup:
    """A checked tune command: everything :class:`Tuner` needs, nothing imported yet."""

    config: str
    overrides: list[str]
    cfg: Config
    space: tuple[Param, ...]
    tune_dir: str
    trials: int
    jobs: int
    nproc: int
    timeout: float | None
    seed: int
    startup_trials: int
    prune_min_trials: int
    prune_warmup: int
    prune: bool

    def trial_dir(self, number: int) -> str:
        return f"{self.tune_dir}/trial-{number:04d}"

    def identity(self) -> dict[str, Any]:
        """What a resumed study must share with the study in the directory: the base config
        (file and overrides, resolved) and the space."""
        return {"config": self.cfg.to_dict(), "space": [dataclasses.asdict(p) for p in self.space]}


def checker(config: str, overrides: Sequence[str]) -> Callable[[str, Any], Value]:
    """``checked(key, value)``: ``value`` as the config reads ``key=value`` over ``config`` and
    ``overrides`` (its type, rules, the rules over several keys and the fit check), else the
    config's :class:`ConfigError`."""

    def checked(key: str, value: Any) -> Value:
        section, _, name = key.partition(".")
        item = f"{key}={format_value(value)}"
        try:
            cfg = load_config(config, [*overrides, item])
        except ConfigError as e:  # its source is the value of the space, not an override
            raise ConfigError(str(e).removeprefix(f"override '{item}': ")) from e
        return getattr(getattr(cfg, section), name)

    return checked


def read_space(path: str, checked: Callable[[str, Any], Value]) -> tuple[Param, ...]:
    """The space in the YAML file ``path`` (``yaml.safe_load``), checked."""
    try:
        with fsspec.open(path, "r") as f:  # a local file or any URL, as a config
            raw = yaml.safe_load(f)
    except OSError as e:
        raise TuneError(f"--space {path}: cannot read it: {e.strerror or e}") from e
    except yaml.YAMLError as e:
        raise TuneError(f"--space {path}: not valid YAML: {first_line(e)}") from e
    try:
        return parse_space(raw, f"--space {path}", checked)
    except ConfigError as e:
        raise TuneError(f"--space {path}: {e}") from e


def check(args: argparse.Namespace) -> Setup:
    """Every check of a tune command, before anything heavy is imported."""
    if not args.config:
        raise TuneError("CONFIG is required (mqsa-ted tune CONFIG --trials N)")
    check_numbers(args)
    cfg = read_config(args.config, args.overrides)
    checked = checker(args.config, args.overrides)
    if args.space:
        space = read_space(args.space, checked)
    else:
        space = parse_space({p.key: p.entry() for p in DEFAULT_SPACE}, "the default space", checked)
    given = args.dir if args.dir is not None else f"{cfg.train.run_dir.rstrip('/')}-tune"
    tune_dir = given.rstrip("/")
    if not tune_dir or is_root(given) or not is_local(tune_dir):
        raise TuneError(
            f"--dir {given!r}: the study needs a local directory other than a "
            "filesystem root (its journal is locked with local file locks)"
        )
    setup = Setup(
        config=args.config,
        overrides=list(args.overrides),
        cfg=cfg,
        space=space,
        tune_dir=tune_dir,
        trials=args.trials,
        jobs=args.jobs,
        nproc=args.nproc or cfg.distributed.nproc_per_node,
        timeout=args.timeout,
        seed=cfg.train.seed if args.seed is None else args.seed,
        startup_trials=args.startup_trials,
        prune_min_trials=args.prune_min_trials,
        prune_warmup=args.prune_warmup,
        prune=not args.no_prune,
    )
    load_config(args.config, [*args.overrides, f"train.run_dir={setup.trial_dir(0)}"])
    require_complete(cfg.data.dir)  # before a study whose every trial would fail on it
    return setup


def exit_status(returncode: int) -> int:
    """A child's exit status as a shell reports it (128 + N when killed by signal N)."""
    return 128 - returncode if returncode < 0 else returncode


def last_line(path: str) -> str:
    """The last non-empty line of the text file ``path`` ("" when none)."""
    with contextlib.suppress(OSError), open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(f.tell() - 8192, 0))
        lines = [ln.strip() for ln in f.read().decode(errors="replace").splitlines()]
        return next((ln for ln in reversed(lines) if ln), "")
    return ""


def evaluations(run_dir: str) -> list[tuple[int, float]]:
    """(epoch, valid NDCG@20) of every evaluation in the run's ``metrics.json`` so far (the
    trainer writes it atomically after each epoch); only validation is read."""
    try:
        metrics = read_json(f"{run_dir}/metrics.json")
    except (OSError, ValueError):
        return []
    return [
        (int(r["epoch"]), float(r["valid"][OBJECTIVE]))
        for r in metrics.get("epochs", [])
        if "valid" in r
    ]


def wait_for_run_dir(run_dir: str, timeout: float = STOP_GRACE_S) -> None:
    """Wait until no live trainer holds ``run_dir`` (a trial's process that outlived a killed
    study is checkpointing on its SIGTERM), at most ``timeout`` seconds; a holder still there
    then is named by the trainer, which refuses to start."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        holder = read_holder(lease_url(run_dir))
        if holder is None or holder.gone(time.time()) is not None:
            return
        time.sleep(POLL_S)


def parent_death_signal(signum: int) -> None:
    """Linux: ask for ``signum`` when this process's parent thread ends (elsewhere: nothing)."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0)


def supervise(argv: list[str]) -> int:
    """``python -c ... PARENT_PID PROGRAM ARG...``: run a trial's ``PROGRAM`` so that it never
    trains on after the tune process is gone, even killed with SIGKILL.

    This process asks Linux for SIGTERM when the tune process dies; its child, the trial, gets
    exactly one SIGTERM from it, however many arrive (the kernel sends one per exiting thread
    of the tune process, and a trainer's second signal stops it without a checkpoint): the
    trial checkpoints and stops, and the study's rerun resumes it. The tune process's own
    SIGTERM (pruning, a stop) is passed on the same way. Killed itself, this process takes the
    trial with it (SIGKILL at its death). Returns the trial's exit status."""
    parent, program = int(argv[0]), argv[1:]
    asked: list[int] = []
    child: subprocess.Popen | None = None

    def forward(signum: int, frame: Any) -> None:
        if not asked and child is not None:
            child.send_signal(signal.SIGTERM)
        asked.append(signum)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, forward)
    parent_death_signal(signal.SIGTERM)
    if os.getppid() != parent or asked:  # the tune process ended before the request was made
        return 128 + signal.SIGTERM
    child = subprocess.Popen(program, preexec_fn=lambda: parent_death_signal(signal.SIGKILL))
    if asked:  # a signal between the check and the start
        child.send_signal(signal.SIGTERM)
    return exit_status(child.wait())


SUPERVISE = "import sys; from mqsa_ted.tune import supervise; sys.exit(supervise(sys.argv[1:]))"


def trial_counts(trials: Sequence[optuna.trial.FrozenTrial]) -> dict[str, int]:
    """Trials by outcome. ``cut off``: stopped by a signal or by the study's end, and run again
    (not in the budget); ``failed``: the config refused it or its training failed (counted)."""
    from optuna.trial import TrialState

    retried = {t.user_attrs.get("retry_of") for t in trials}
    counts = {"complete": 0, "pruned": 0, "failed": 0, "cut off": 0}
    for t in trials:
        if t.state == TrialState.COMPLETE:
            counts["complete"] += 1
        elif t.state == TrialState.PRUNED:
            counts["pruned"] += 1
        elif t.state == TrialState.FAIL:
            cut_off = t.number in retried or t.user_attrs.get("interrupted", False)
            counts["cut off" if cut_off else "failed"] += 1
    return counts


class Tuner:
    """Runs the study of a checked :class:`Setup` (imports Optuna)."""

    def __init__(self, setup: Setup) -> None:
        self.setup = setup
        self.stopping = threading.Event()
        self.signum = 0
        self.lock = threading.RLock()  # also taken by the signal handler, in the main thread
        self.children: set[subprocess.Popen] = set()
        self.best_number: int | None = None

    @staticmethod
    def say(message: str) -> None:
        print(message, flush=True)

    # -- one trial -------------------------------------------------------------------------

    def overrides(self, params: dict[str, Value], run_dir: str) -> list[str]:
        """A trial's overrides: the command's, the trial's settings, its run directory."""
        setup, extra = self.setup, []
        if setup.jobs > 1 and setup.cfg.train.threads == 0:  # the jobs share the cores
            cores = openmp.usable_cores()
            extra.append(f"train.threads={max(1, cores // (setup.jobs * setup.nproc))}")
        return [
            *setup.overrides,
            *param_overrides(params),
            *extra,
            f"train.run_dir={run_dir}",
            "train.resume=auto",
            "train.progress=false",
        ]

    def command(self, overrides: list[str]) -> list[str]:
        """The trial's training command, bound to this process (:func:`supervise`);
        torchrun picks its own free port (``--standalone``), so parallel trials never share
        one."""
        train = ["-m", "trainer.train", self.setup.config, *overrides]
        if self.setup.nproc > 1:
            train = [
                "-m",
                "mqsa_ted.torchrun",
                "--standalone",
                f"--nproc_per_node={self.setup.nproc}",
                *train,
            ]
        return [sys.executable, "-c", SUPERVISE, str(os.getpid()), sys.executable, *train]

    def start(self, overrides: list[str], log_path: str) -> subprocess.Popen:
        env = dict(os.environ)
        if self.setup.nproc > 1:
            env.setdefault("OMP_NUM_THREADS", "1")  # as mqsa-ted train --nproc
        with open(log_path, "ab") as log:
            # a session of its own: Ctrl-C reaches this process only, which stops each trial
            # once (a second signal would stop a trainer without its checkpoint)
            proc = subprocess.Popen(
                self.command(overrides),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )
        with self.lock:
            self.children.add(proc)
            if self.stopping.is_set():
                proc.send_signal(signal.SIGTERM)
        return proc

    def stop(self, proc: subprocess.Popen) -> None:
        """SIGTERM (the trainer checkpoints and exits), SIGKILL after ``STOP_GRACE_S``."""
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def objective(self, trial: optuna.Trial) -> float:
        """Run one trial; its best valid NDCG@20 (raises ``TrialPruned``, :class:`TrialFailed`,
        :class:`TrialStopped`)."""
        params = {p.key: p.suggest(trial) for p in self.setup.space}
        run_dir = trial.user_attrs.get("run_dir") or self.setup.trial_dir(trial.number)
        trial.set_user_attr("run_dir", run_dir)
        name = os.path.basename(run_dir)
        retry_of = trial.user_attrs.get("retry_of")
        again = "" if retry_of is None else f", again: trial {retry_of} was cut off"
        self.say(
            f"trial {trial.number} ({name}{again}): "
            + " ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items()
            )
        )
        if self.stopping.is_set():
            trial.set_user_attr("interrupted", True)
            raise TrialStopped("the study was stopped before this trial started")
        overrides = self.overrides(params, run_dir)
        try:
            load_config(self.setup.config, overrides)
        except ConfigError as e:
            raise self.failed(trial, f"refused by the config: {e}") from e
        wait_for_run_dir(run_dir)
        RunDir(run_dir).own()
        log_path = f"{run_dir}/train.log"
        proc = self.start(overrides, log_path)
        try:
            return self.follow(trial, proc, run_dir, log_path)
        finally:
            with self.lock:
                self.children.discard(proc)

    def follow(
        self, trial: optuna.Trial, proc: subprocess.Popen, run_dir: str, log_path: str
    ) -> float:
        """Report each evaluation of the running trial; prune it when the pruner says so (in
        the order of its evaluations, whether or not the run has ended meanwhile)."""
        import optuna

        reported: set[int] = set()
        while True:
            returncode = proc.poll()
            for epoch, value in evaluations(run_dir):
                if epoch in reported:
                    continue
                trial.report(value, epoch)
                reported.add(epoch)
                if trial.should_prune():
                    self.stop(proc)
                    self.say(
                        f"trial {trial.number}: pruned at epoch {epoch} (valid {OBJECTIVE} "
                        f"{value:.4f}, below the median of the completed trials)"
                    )
                    raise optuna.TrialPruned(f"epoch {epoch}: valid {OBJECTIVE} {value:.4f}")
            if returncode is not None:
                break
            time.sleep(POLL_S)
        status = exit_status(returncode)
        if status == 0:
            metrics = read_json(f"{run_dir}/metrics.json")
            value = float(metrics["valid"][OBJECTIVE])
            trial.set_user_attr("best_epoch", metrics["best_epoch"])
            self.say(
                f"trial {trial.number}: complete, valid {OBJECTIVE} {value:.4f} (epoch "
                f"{metrics['best_epoch']})"
            )
            return value
        if self.stopping.is_set() or status in (128 + signal.SIGINT, 128 + signal.SIGTERM):
            trial.set_user_attr("interrupted", True)
            self.say(
                f"trial {trial.number}: stopped (exit {status}); a rerun of the study "
                f"resumes it in {run_dir}"
            )
            raise TrialStopped(f"stopped with exit status {status}")
        raise self.failed(
            trial, f"training exited with status {status}: {last_line(log_path)} (log: {log_path})"
        )

    def failed(self, trial: optuna.Trial, reason: str) -> TrialFailed:
        trial.set_user_attr("error", reason)
        self.say(f"trial {trial.number}: failed: {reason}")
        return TrialFailed(reason)

    # -- the study -------------------------------------------------------------------------

    def open_study(self) -> optuna.Study:
        """The study in the tune directory (created, or loaded and checked to be this
        command's), with a sampler seeded by its trial count (a resumed study does not repeat
        its first draws) and the pruner."""
        import optuna
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        setup = self.setup
        storage = JournalStorage(JournalFileBackend(f"{setup.tune_dir}/{JOURNAL}"))
        pruner: optuna.pruners.BasePruner = optuna.pruners.NopPruner()
        if setup.prune:
            pruner = optuna.pruners.MedianPruner(
                n_startup_trials=setup.prune_min_trials, n_warmup_steps=setup.prune_warmup
            )
        study = optuna.create_study(
            study_name=STUDY_NAME,
            storage=storage,
            direction="maximize",
            pruner=pruner,
            load_if_exists=True,
        )
        study.sampler = optuna.samplers.TPESampler(
            seed=setup.seed + len(study.trials), n_startup_trials=setup.startup_trials
        )
        identity = json.loads(json.dumps(setup.identity()))  # as the journal stores it
        stored = study.user_attrs.get("setup")
        if stored is None:
            study.set_user_attr("setup", identity)
        elif stored != identity:
            differs = first_difference(stored, identity)
            raise TuneError(
                f"{setup.tune_dir} holds a study of another config or space ({differs}): rerun "
                "it with the same CONFIG, overrides and --space, or give another --dir"
            )
        return study

    def recover(self, study: optuna.Study) -> None:
        """Trials left running by a study that stopped (this process holds the directory's
        lease: nobody runs them) are marked failed; those and the trials stopped by a signal
        are queued again, with their settings, in their own run directories."""
        from optuna.trial import TrialState

        trials = study.get_trials(deepcopy=False)
        retried = {t.user_attrs.get("retry_of") for t in trials}
        for t in trials:
            if t.state == TrialState.RUNNING:
                study.tell(t.number, state=TrialState.FAIL)
            elif not (t.state == TrialState.FAIL and t.user_attrs.get("interrupted")):
                continue
            if t.number not in retried:
                run_dir = t.user_attrs.get("run_dir", self.setup.trial_dir(t.number))
                study.enqueue_trial(t.params, user_attrs={"retry_of": t.number, "run_dir": run_dir})
                self.say(f"trial {t.number} was cut off: queued again, to resume in {run_dir}")

    def enqueue_baseline(self, study: optuna.Study) -> None:
        """A new study's first trial: the config's own values, where the space holds them (the
        study is then never worse on validation than the untuned config)."""
        base = {}
        for p in self.setup.space:
            section, _, name = p.key.partition(".")
            value = getattr(getattr(self.setup.cfg, section), name)
            if p.contains(value):
                base[p.key] = value
        if base:
            study.enqueue_trial(base, user_attrs={"baseline": True})

    def after_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        """Callback: rewrite best.yaml and best.json when the best trial changed."""
        with self.lock:
            self.write_best(study)

    def write_best(self, study: optuna.Study) -> dict[str, Any] | None:
        """best.yaml (the chosen trial's config; its run directory ``<dir>/best-run``) and
        best.json; the chosen trial's test metrics are read here, after it was chosen on
        validation, and nowhere else. None when no trial has completed."""
        from optuna.trial import TrialState

        trials = study.get_trials(deepcopy=False)
        if not any(t.state == TrialState.COMPLETE for t in trials):
            return None
        best = study.best_trial
        setup = self.setup
        run_dir = best.user_attrs["run_dir"]
        metrics = read_json(f"{run_dir}/metrics.json")
        summary = {
            "chosen_on": f"valid {OBJECTIVE}",
            "trial": best.number,
            "run_dir": run_dir,
            "params": best.params,
            "best_epoch": metrics["best_epoch"],
            "valid": metrics["valid"],
            "test": metrics["test"],  # the chosen trial's only
            "trials": trial_counts(trials),
        }
        if best.number != self.best_number:
            cfg = load_config(
                setup.config,
                [
                    *setup.overrides,
                    *param_overrides(best.params),
                    f"train.run_dir={setup.tune_dir}/best-run",
                ],
            )
            header = (
                f"# mqsa-ted tune: trial {best.number} of {setup.tune_dir}, chosen on valid "
                f"{OBJECTIVE} {best.value:.4f}\n# mqsa-ted train {setup.tune_dir}/best.yaml\n"
            )
            atomic_write_bytes(f"{setup.tune_dir}/best.yaml", (header + cfg.to_yaml()).encode())
            self.best_number = best.number
        write_json(f"{setup.tune_dir}/best.json", summary)
        return summary

    def on_signal(self, study: optuna.Study) -> Callable[[int, Any], None]:
        def handle(signum: int, frame: Any) -> None:
            if self.stopping.is_set():
                raise KeyboardInterrupt  # the second signal: stop now
            self.stopping.set()  # no print here: the main thread may be printing
            self.signum = signum
            with self.lock:
                for proc in self.children:
                    if proc.poll() is None:
                        proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(RuntimeError):  # outside the optimize loop
                study.stop()

        return handle

    @contextlib.contextmanager
    def signals(self, study: optuna.Study) -> Iterator[None]:
        """SIGINT and SIGTERM stop the study (:meth:`on_signal`) while it runs."""
        handler = self.on_signal(study)
        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    def run(self) -> int:
        """Run the missing trials; the exit status (0, 1 when no trial completed, 128 + N on
        signal N)."""
        import optuna

        optuna.logging.set_verbosity(optuna.logging.ERROR)  # our own line per trial instead
        setup = self.setup
        lease = Lease(setup.tune_dir, TUNE_KIND, "--dir").acquire()
        try:
            if lease.note:
                self.say(lease.note)
            if not mark_owned(setup.tune_dir, TUNE_KIND):
                raise TuneError(
                    f"--dir {setup.tune_dir} holds files this project did not write: "
                    "give a new or empty directory for the study"
                )
            study = self.open_study()
            if not study.trials:
                self.enqueue_baseline(study)
            self.recover(study)
            done = trial_counts(study.get_trials(deepcopy=False))
            remaining = setup.trials - done["complete"] - done["pruned"] - done["failed"]
            if setup.cfg.train.patience == 0:
                self.say(
                    "note: train.patience=0: every trial that is not pruned trains all its "
                    "epochs (train.patience=N stops a trial after N evaluations without a "
                    "better valid NDCG@20)"
                )
            self.say(
                f"study {setup.tune_dir}: {setup.trials - remaining} of {setup.trials} "
                f"trials done, {max(remaining, 0)} to run, {setup.jobs} at a time"
            )
            if remaining > 0:
                with self.signals(study):
                    study.optimize(
                        self.objective,
                        n_trials=remaining,
                        timeout=setup.timeout,
                        n_jobs=setup.jobs,
                        catch=(TrialFailed, TrialStopped),
                        callbacks=[self.after_trial],
                    )
            return self.report(study)
        except KeyboardInterrupt:
            self.say(
                "interrupted again: trials stopped without a checkpoint; a rerun resumes "
                "each from its last one"
            )
            return 130
        finally:
            lease.release()

    def report(self, study: optuna.Study) -> int:
        """The study's outcome in a few lines; the exit status."""
        summary = self.write_best(study)
        counts = trial_counts(study.get_trials(deepcopy=False))
        tally = ", ".join(f"{n} {what}" for what, n in counts.items() if n)
        self.say(f"study {self.setup.tune_dir}: {tally or 'no trials'}")
        if self.signum:
            self.say(
                f"stopped by {signal.Signals(self.signum).name}: each running trial "
                "checkpointed; rerun the same command to resume the study"
            )
        if summary is None and self.signum:
            return 128 + self.signum
        if summary is None:
            print(
                "error: no trial completed: nothing to choose (each trial's train.log says why)",
                file=sys.stderr,
            )
            return 128 + self.signum if self.signum else 1
        test = " ".join(f"{k} {v:.4f}" for k, v in summary["test"].items())
        self.say(
            f"chosen on validation: trial {summary['trial']}, valid {OBJECTIVE} "
            f"{summary['valid'][OBJECTIVE]:.4f} (epoch {summary['best_epoch']}); its test: "
            f"{test}\nbest config: {self.setup.tune_dir}/best.yaml (mqsa-ted train "
            f"{self.setup.tune_dir}/best.yaml)"
        )
        return 128 + self.signum if self.signum else 0


def first_difference(stored: Any, given: Any, path: str = "") -> str:
    """The first dotted key where ``stored`` and ``given`` differ, as ``key: a (study) vs b``."""
    if isinstance(stored, dict) and isinstance(given, dict):
        for key in sorted(set(stored) | set(given)):
            if stored.get(key) != given.get(key):
                return first_difference(stored.get(key), given.get(key), f"{path}{key}.")
    return f"{path.rstrip('.')}: {stored!r} in the study, {given!r} now"


def main(argv: list[str] | None = None) -> int:
    """``mqsa-ted tune``: check everything, then run the study."""
    quiet.install()
    openmp.limit_spinning()
    try:
        args = parse_args(argv)
        if args.show_space:
            print(space_yaml(DEFAULT_SPACE), end="")
            return 0
        setup = check(args)
        return Tuner(setup).run()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
