"""Experiment configuration: typed dataclasses loaded from one YAML file plus dotted CLI overrides.

    cfg = load_config("configs/beauty.yaml", ["train.epochs=3", "model.lambda_kd=0"])

Every key is checked: an unknown key, a value of the wrong type, a NaN or infinite float, or a
value outside the key's rules (declared next to the field with :func:`setting`, plus
``CROSS_RULES`` over several keys) raises ``ConfigError`` naming the key, the value, the rule and
the file (or the override) it came from. YAML is read with ``yaml.safe_load`` only. This module
imports nothing heavy, so commands refuse a bad setting before they import torch or Spark.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import json
import math
import os
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import fsspec
import yaml

from mqsa_core.errors import ConfigError
from mqsa_core.storage import is_root

__all__ = ["Config", "ConfigError", "load_config"]


@dataclass(frozen=True)
class Rule:
    """What a setting's value must be: ``test(value)`` is True when it is allowed; ``text``
    completes "key 'x' must be ..." in the error message."""

    text: str
    test: Callable[[Any], bool]


def at_least(bound: float) -> Rule:
    return Rule(f">= {bound}", lambda v: v >= bound)


def above(bound: float) -> Rule:
    return Rule(f"> {bound}", lambda v: v > bound)


def within(low: float, high: float, *, open_high: bool = False) -> Rule:
    if open_high:
        return Rule(f">= {low} and < {high}", lambda v: low <= v < high)
    return Rule(f"between {low} and {high}", lambda v: low <= v <= high)


def one_of(choices: tuple) -> Rule:
    return Rule(f"one of {', '.join(map(str, choices))}", lambda v: v in choices)


NON_EMPTY = Rule("a non-empty string", bool)
# Where the project writes (and, for what it created there, deletes): never a filesystem or
# bucket root, so a mistyped `train.run_dir=` cannot turn into `/model.pt` or `s3://bucket/...`.
LOCATION = Rule(
    "a non-empty URL other than a filesystem or bucket root", lambda v: v and not is_root(v)
)
RESUME = Rule(
    "auto, fresh or a checkpoint URL (<checkpoint root>/step-NNNNNNNNN)",
    lambda v: v in ("auto", "fresh") or (bool(v) and not is_root(v) and "step-" in v),
)
LOCATION_OR_EMPTY = Rule(
    "empty (the default place) or a URL other than a filesystem or bucket root",
    lambda v: not v or not is_root(v),
)


def setting(default: Any, *rules: Rule) -> Any:
    """A config field: its default and the rules every value from a file or override must meet
    (``load_config`` checks them before anything heavy is imported)."""
    return field(default=default, metadata={"rules": rules})


# The one list of every enumerated setting; modules that switch on a value import it from here.
FORMATS = ("auto", "parquet", "csv", "json")
TIME_UNITS = ("auto", "s", "ms", "us", "ns", "order")
BACKENDS = ("dense", "torchrec")
SHARDINGS = ("row_wise", "table_wise", "column_wise")
TABLE_OPTIMIZERS = ("rowwise_adagrad", "adagrad", "sgd", "adam")
CANDIDATES = ("all", "sampled")
SAMPLERS = ("uniform", "popularity", "in_batch", "mixed", "global_batch")
DENSE_OPTIMIZERS = ("adam", "sgd")
FAISS_KINDS = ("auto", "flat", "ivf", "hnsw", "none")
EVAL_PROTOCOLS = ("paper", "repeat_aware")
LR_SCHEDULES = ("constant", "linear")
ZERO_STAGES = (0, 1, 2)  # ZeRO 3 partitions the weights, which the trainer's step does not support
TRACKERS = ("tensorboard", "mlflow")  # train.tracking: where the run's metrics are mirrored


def tracker_names(value: str) -> tuple[str, ...]:
    """The trackers a ``train.tracking`` value names (``none``: no tracker)."""
    return () if value.strip() == "none" else tuple(p.strip() for p in value.split(","))


TRACKING = Rule(
    f"none or a comma-separated list of {', '.join(TRACKERS)}",
    lambda v: v.strip() == "none" or all(name in TRACKERS for name in tracker_names(v)),
)
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1  # every integer setting ends up in Spark or torch


@dataclass
class DataConfig:
    events: str = ""  # input event log URL (Parquet, CSV or JSON lines; file or directory)
    format: str = setting("auto", one_of(FORMATS))  # auto: from the URL's extension
    user_col: str = setting("user_id", NON_EMPTY)
    item_col: str = setting("item_id", NON_EMPTY)
    time_col: str = setting("timestamp", NON_EMPTY)
    # unit of numeric timestamps: auto (refuse a log whose values look like different units)
    # | s | ms | us | ns (ISO/timestamp values converted to it) | order (sequence numbers, no check)
    time_unit: str = setting("auto", one_of(TIME_UNITS))
    # output URL of the prepared data (vocab/, sequences/, transitions/)
    dir: str = setting("data/demo", LOCATION)
    # incremental prepare: a previous prepare output to extend with data.events ("" = off)
    base_dir: str = setting("", LOCATION_OR_EMPTY)
    # previous transition counts are multiplied by this in an incremental prepare
    transition_decay: float = setting(1.0, within(0.0, 1.0))
    # incremental prepare: refuse a base holding less than this share of the new events'
    # distinct items, or of their distinct users (another log's base); 0 = no check
    base_min_overlap: float = setting(0.1, within(0.0, 1.0))
    max_len: int = setting(50, at_least(1))
    time_span: int = setting(1, at_least(1))
    paper_mode: bool = True  # transitions from the train sequence cut to max_len (METHOD.md)
    kcore: int = setting(0, at_least(0))  # iterated k-core filter on users and items; 0 = off
    dedup: bool = False  # drop exact duplicate (user, item, timestamp) events, counted
    # keep the K most frequent successors per item; 0 = keep all
    top_k_successors: int = setting(0, at_least(0))
    # drop transitions whose timestamp gap exceeds this; 0 = off
    max_time_gap: float = setting(0.0, at_least(0))
    num_files: int = setting(8, at_least(1))  # sequences/ is written as this many Parquet files
    # training: false = every rank holds all users (N ranks see the batches of 1 rank);
    # true = each rank streams only its own row groups of sequences/ (catalogue scale)
    stream: bool = False
    shuffle_buffer: int = setting(65536, at_least(1))  # users shuffled together when streaming
    spark_master: str = setting("local[*]", NON_EMPTY)


@dataclass
class ModelConfig:
    dim: int = setting(64, at_least(1))
    num_blocks: int = setting(1, at_least(1))
    L: int = setting(3, at_least(1))  # window of the long query
    alpha: float = setting(0.5, within(0, 1))  # weight of the short-query branch in the score mix
    lambda_kd: float = setting(0.1, at_least(0))  # weight of the TED distillation loss
    tau: float = setting(0.1, above(0))  # distillation temperature
    dropout: float = setting(0.5, within(0, 1, open_high=True))
    l2: float = setting(1e-4, at_least(0))  # l2 * sum(w^2) / 2 over all trainable tensors
    # add w * log(1 + max(G[last item, j] - 1, 0)) to every score (G: the train transition
    # graph, w learned): a directed memory of item-to-next patterns; off in paper mode
    # (METHOD.md has no such term)
    transition_term: bool = False


@dataclass
class EmbeddingsConfig:
    backend: str = setting("dense", one_of(BACKENDS))
    sharding: str = setting("row_wise", one_of(SHARDINGS))  # torchrec backend
    # fused optimizer of the torchrec backend (adam: GPU only, checked when the table is built)
    optimizer: str = setting("rowwise_adagrad", one_of(TABLE_OPTIMIZERS))
    lr: float = setting(0.05, above(0))  # learning rate of the fused torchrec optimizer


@dataclass
class LossConfig:
    candidates: str = setting("all", one_of(CANDIDATES))  # all: paper mode | sampled: catalogue
    num_negatives: int = setting(1024, at_least(1))  # shared negatives per step (sampled)
    sampler: str = setting("uniform", one_of(SAMPLERS))


@dataclass
class TrainConfig:
    epochs: int = setting(200, at_least(1))
    batch_size: int = setting(256, at_least(1))  # global batch (users per step, over all ranks)
    lr: float = setting(1e-3, above(0))
    # optimizer of the DeepSpeed-trained part: adam (paper) | sgd
    optimizer: str = setting("adam", one_of(DENSE_OPTIMIZERS))
    # clip the dense gradients' global norm to this; 0 = off (the paper)
    grad_clip: float = setting(0.0, at_least(0))
    seed: int = setting(2023, at_least(0))
    eval_every: int = setting(1, at_least(1))
    # stop after this many evaluations without a better valid NDCG@20; 0 = off
    patience: int = setting(0, at_least(0))
    # train at least this many optimizer steps: the epochs grow to ceil(min_steps / steps per
    # epoch) on small data (early stopping still applies); 0 = exactly train.epochs (the paper)
    min_steps: int = setting(0, at_least(0))
    # a step budget: stop after this many optimizer steps (the epoch it falls in ends there and
    # is evaluated: a rehearsal, a smoke test on a huge log); 0 = no budget
    max_steps: int = setting(0, at_least(0))
    # linear learning-rate warm-up over this many steps; 0 = off (the paper)
    warmup_steps: int = setting(0, at_least(0))
    # after the warm-up: constant (the paper) | linear (down to 0 at the last planned step: a
    # short warm-started run); applies to train.lr and a sharded table's embeddings.lr alike
    lr_schedule: str = setting("constant", one_of(LR_SCHEDULES))
    run_dir: str = setting("runs/default", LOCATION)
    bf16: bool = False  # bf16 autocast for the catalogue-wide score products
    # paper mode on CPU with bf16: the hand-written kernel of the catalogue-wide products and
    # softmax (trainer/model/cpu_kernels.py; built once with the machine's C++ compiler, AVX-512
    # BF16 CPUs); false, or where it cannot build: oneDNN's products and torch's softmax (slower)
    cpu_kernel: bool = True
    # torch intra-op threads per process; 0 = cores / local processes
    threads: int = setting(0, at_least(0))
    score_chunk: int = setting(4096, at_least(1))  # rows per chunk of the catalogue-wide products
    eval_batch_size: int = setting(1024, at_least(1))
    # evaluate a seeded sample of this many users, the same at every evaluation (a catalogue
    # where ranking every user against every item costs too much); 0 = every user
    eval_users: int = setting(0, at_least(0))
    # the encoder runs a batch's users in this many groups of similar length, each trimmed to
    # its longest user (same outputs, fewer padded slots); 1 = the whole batch at once
    length_groups: int = setting(8, at_least(1))
    # paper: the whole train history is masked and a target inside it is a miss (the reference);
    # repeat_aware: nothing is masked, repeated targets are ranked (data with repeat consumption)
    eval_protocol: str = setting("paper", one_of(EVAL_PROTOCOLS))
    progress: bool = True
    # steps between logged losses (the only host reads of a step); 0 = epochs
    log_every: int = setting(100, at_least(0))
    # where the epoch records of metrics.json (and the logged steps) are mirrored, on rank 0:
    # tensorboard (<run_dir>/tensorboard/), mlflow (MLFLOW_TRACKING_URI; the tracking extra),
    # a comma-separated list of them, or none (trainer/runtime/tracking.py)
    tracking: str = setting("tensorboard", TRACKING)
    mlflow_experiment: str = setting("mqsa-ted", NON_EMPTY)  # the MLflow experiment's name
    # auto = continue from the newest complete checkpoint of this run (of the same data and model
    # settings; none: start) | fresh = start over, deleting this run's checkpoints | a checkpoint
    resume: str = setting("auto", RESUME)
    # warm start (day two): a previous run whose data this run's data extends (data.base_dir);
    # its encoder and item rows seed this run (trainer/runtime/warm_start.py); "" = off
    init_from: str = setting("", LOCATION_OR_EMPTY)
    # warm start: the previous run's optimizer state for its parameters and item rows comes too
    # (new items' rows start fresh); false = all optimizer state starts fresh
    warm_optimizer: bool = True
    # day two: each target that is new since the base (data.base_dir: the base's valid and test
    # items, the new events) counts this many times in both losses; 1 = every target alike
    new_target_weight: float = setting(1.0, within(1, 100))


@dataclass
class DistributedConfig:
    nproc_per_node: int = setting(2, at_least(1))
    zero_stage: int = setting(0, one_of(ZERO_STAGES))


@dataclass
class CheckpointConfig:
    dir: str = setting("", LOCATION_OR_EMPTY)  # checkpoint root URL; empty = <run_dir>/checkpoints
    # also checkpoint every N optimiser steps; 0 = only at epoch ends
    every: int = setting(0, at_least(0))
    keep: int = setting(2, at_least(1))  # complete checkpoints kept (older ones are deleted)


@dataclass
class ExportConfig:
    out: str = setting("", LOCATION_OR_EMPTY)  # export URL; empty = <run_dir>/export
    faiss: str = setting("auto", one_of(FAISS_KINDS))


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    embeddings: EmbeddingsConfig = field(default_factory=EmbeddingsConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    export: ExportConfig = field(default_factory=ExportConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _inside(url: str, parent: str) -> bool:
    """Whether ``url`` is ``parent`` or lies under it (compared as written, local paths made
    absolute)."""

    def norm(u: str) -> str:
        return u.rstrip("/") if "://" in u else os.path.abspath(u)

    a, b = norm(url), norm(parent)
    return a == b or a.startswith(b + "/")


def _apart(value: str, other: str) -> bool:
    """``value`` is empty (the default place) or not ``other`` or inside it."""
    return not value or not _inside(value, other)


def _not_holding(value: str, other: str) -> bool:
    """``value`` is empty (the default place) or neither ``other`` nor a parent of it."""
    return not value or not _inside(other, value)


OUTSIDE_DATA = "outside data.dir (the prepare job replaces that directory)"
# Rules over several keys, cheap and decidable from the config alone:
# (key, other key, what the key's value must be, test(value, other value)).
CROSS_RULES: tuple[tuple[str, str, str, Callable[[Any, Any], bool]], ...] = (
    ("train.run_dir", "data.dir", OUTSIDE_DATA, _apart),
    ("checkpoint.dir", "data.dir", OUTSIDE_DATA, _apart),
    ("export.out", "data.dir", OUTSIDE_DATA, _apart),
    ("export.out", "train.run_dir", "neither train.run_dir nor a parent of it", _not_holding),
)


def rules_of(section: Any) -> dict[str, tuple[Rule, ...]]:
    """The rules of each field of a section dataclass (class or instance)."""
    return {f.name: f.metadata.get("rules", ()) for f in dataclasses.fields(section)}


def rules_table() -> list[tuple[str, str]]:
    """``(key, what its value must be)`` for every key with a rule, cross-key rules last."""
    defaults = Config()
    rows = [
        (f"{section.name}.{key}", rule.text)
        for section in dataclasses.fields(Config)
        for key, rules in rules_of(getattr(defaults, section.name)).items()
        for rule in rules
    ]
    return rows + [(key, text) for key, _, text, _ in CROSS_RULES]


def _check_value(key: str, value: Any, expected: Any, source: str) -> Any:
    """Return ``value`` converted to ``expected`` or raise ConfigError naming key and source."""
    origin = typing.get_origin(expected)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(expected)
        if value is None and type(None) in options:
            return None
        expected = next(t for t in options if t is not type(None))
    if expected is bool:
        if isinstance(value, bool):
            return value
    elif expected is int:
        if isinstance(value, int) and not isinstance(value, bool):
            if not INT64_MIN <= value <= INT64_MAX:
                raise ConfigError(
                    f"{source}: key '{key}' must be an integer within int64 "
                    f"(-2**63 .. 2**63-1), got {value!r}"
                )
            return value
    elif expected is float:
        if isinstance(value, str):  # YAML 1.1 reads `1e-4` (no dot) as a string
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, int | float) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"{source}: key '{key}' must be a finite number, got {value!r}")
            return float(value)
    elif expected is str:
        if isinstance(value, str):
            return value
    name = getattr(expected, "__name__", str(expected))
    raise ConfigError(f"{source}: key '{key}' must be {name}, got {type(value).__name__} {value!r}")


def _check_rules(key: str, value: Any, rules: tuple[Rule, ...], source: str) -> None:
    for rule in rules:
        if not rule.test(value):
            raise ConfigError(f"{source}: key '{key}' must be {rule.text}, got {value!r}")


def check_section(name: str, section: Any, source: str = "config") -> None:
    """Apply every field rule to a section built in code (``DataConfig(...)``): the checks
    ``load_config`` makes on each value it reads."""
    for key, rules in rules_of(section).items():
        _check_rules(f"{name}.{key}", getattr(section, key), rules, source)


def check_prepare(cfg: DataConfig, source: str = "config") -> None:
    """The data section as the prepare job needs it: every rule, and ``data.events`` set."""
    check_section("data", cfg, source)
    if not cfg.events:
        raise ConfigError(f"{source}: key 'data.events' is empty: set it to the event log's URL")


def _lookup(cfg: Config, dotted: str) -> Any:
    section, _, key = dotted.partition(".")
    return getattr(getattr(cfg, section), key)


def check_cross(cfg: Config, sources: dict[str, str] | None = None) -> None:
    """Apply the rules over several keys; the message names both keys and their sources."""
    sources = sources or {}
    for key, other, text, test in CROSS_RULES:
        value, other_value = _lookup(cfg, key), _lookup(cfg, other)
        if not test(value, other_value):
            raise ConfigError(
                f"{sources.get(key, 'default')}: key '{key}' must be {text}, got {value!r} "
                f"with {other}={other_value!r} (from {sources.get(other, 'the default')})"
            )


# The fit check (docs/configuration.md, "Settings that cannot fit"): light lower bounds, no torch.
FLOAT_BYTES = 4
# Per attention block of each of the encoder's two branches the backward keeps at least this many
# [slots, dim] float tensors (normalised query, q, k, v, attention output, the normalised output,
# FFN hidden and output) and one [users, T, T] (the softmax); tests/test_trust_config.py checks
# this against the tensors the real model saves.
SAVED_ROWS, SAVED_SCORES = 8, 1
PARAM_COPIES = 4  # weights, gradients and Adam's two moments
MEMORY_ENV = "MQSA_MEMORY_GIB"  # what the fit check compares with, instead of this machine's RAM


def step_activations(batch: int, max_len: int, dim: int, num_blocks: int) -> int:
    """Bytes the encoder keeps for the backward of one step of ``batch`` users at ``max_len``
    (a lower bound: dropout masks, the catalogue-wide products and the table come on top)."""
    per_user = SAVED_ROWS * max_len * dim + SAVED_SCORES * max_len * max_len
    return 2 * num_blocks * batch * per_user * FLOAT_BYTES


def dense_state(dim: int, num_blocks: int, max_len: int) -> int:
    """Bytes of the encoder's weights, gradients and Adam state in one process: per block and
    branch 5 linear layers and 2 norms, the position table, the branches' 2 output norms."""
    block = 5 * (dim * dim + dim) + 4 * dim
    params = 2 * num_blocks * block + max_len * dim + 4 * dim
    return params * FLOAT_BYTES * PARAM_COPIES


def _int_env(name: str) -> int:
    """A positive integer environment variable, or 0 when unset or not one."""
    text = os.environ.get(name, "")
    return int(text) if text.isdigit() and int(text) > 0 else 0


def job_machines() -> int:
    """The machines one job spreads over, as far as the environment says (``NNODES`` of
    launch.sh, Slurm's ``SLURM_NNODES``, torchrun's ``WORLD_SIZE / LOCAL_WORLD_SIZE``), else 1."""
    nodes = _int_env("NNODES") or _int_env("SLURM_NNODES")
    local = _int_env("LOCAL_WORLD_SIZE")
    if not nodes and local:
        nodes = _int_env("WORLD_SIZE") // local
    return max(nodes, 1)


def machine_memory() -> int:
    """Bytes the fit check compares with: ``MQSA_MEMORY_GIB`` if set (0 = no check), else this
    machine's memory (``os.sysconf``, else ``/proc/meminfo``) lowered to a cgroup limit; 0 when
    unknown."""
    text = os.environ.get(MEMORY_ENV, "").strip()
    if text:
        try:
            gib = float(text)
        except ValueError:
            gib = math.nan
        if not (math.isfinite(gib) and gib >= 0):
            raise ConfigError(f"{MEMORY_ENV}={text!r} must be a number of GiB >= 0 (0 = no check)")
        return int(gib * 2**30)
    total = 0
    with contextlib.suppress(ValueError, OSError, AttributeError):
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if total <= 0:
        with contextlib.suppress(OSError, ValueError, IndexError), open("/proc/meminfo") as f:
            total = next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("MemTotal:"))
    for limit in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        with contextlib.suppress(OSError, ValueError), open(limit) as f:
            cap = int(f.read().strip())  # "max" (no limit) is a ValueError
            total = min(total, cap) if total > 0 else cap
    return max(total, 0)


def human_bytes(n: float) -> str:
    """``n`` bytes in binary units (``23.5 GiB``, ``8.7 EiB``, ``1.2e+06 YiB``)."""
    units = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB", "ZiB")
    for unit in units:
        if n < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.3g} YiB"


def memory_estimates(cfg: Config, machines: int = 1) -> list[tuple[str, int]]:
    """(what, bytes) of the light estimates the fit check compares with one machine's memory:
    one process's dense weights and optimizer state, a training step of the global batch
    spread over ``machines`` (every user at ``data.max_len``) and an evaluation batch."""
    data, model, train = cfg.data, cfg.model, cfg.train
    dim, blocks, length = model.dim, model.num_blocks, data.max_len
    step = step_activations(-(-train.batch_size // machines), length, dim, blocks)
    # evaluation keeps nothing for a backward and runs the last block for the newest slot only:
    # at least 4 [slots, dim] tensors (the rows, the input, k, v), and with more than one block
    # an earlier block's scores and softmax
    eval_users = -(-train.eval_batch_size // machines)
    scores = 2 * length * length if blocks > 1 else 0
    evaluation = eval_users * (4 * length * dim + scores) * FLOAT_BYTES
    over = f" over {machines} machines" if machines > 1 else ""
    shape = f"data.max_len={length} x model.dim={dim}"
    state = dense_state(dim, blocks, length)
    return [
        (
            f"model.dim={dim} x model.num_blocks={blocks} (and data.max_len={length} positions) "
            f"needs ~{human_bytes(state)} of weights, gradients and Adam state per process",
            state,
        ),
        (
            f"train.batch_size={train.batch_size} x {shape} x model.num_blocks={blocks} needs "
            f"~{human_bytes(step)} of activations per training step{over} (users at "
            "data.max_len, a lower bound)",
            step,
        ),
        (
            f"train.eval_batch_size={train.eval_batch_size} x {shape} needs "
            f"~{human_bytes(evaluation)} per evaluation batch{over} (a lower bound)",
            evaluation,
        ),
    ]


def check_fit(cfg: Config) -> None:
    """Refuse settings whose light estimate (:func:`memory_estimates`) exceeds the memory of
    the machine (:func:`machine_memory`), in one line with the estimate."""
    memory = machine_memory()
    if memory <= 0:
        return
    for what, needed in memory_estimates(cfg, job_machines()):
        if needed > memory:
            raise ConfigError(
                f"{what}; this machine has {human_bytes(memory)} ({MEMORY_ENV}=N: check "
                "against N GiB instead, e.g. a GPU job's device memory)"
            )


def _did_you_mean(name: str, known: Iterable[str], prefix: str = "") -> str:
    """``: did you mean 'x'?`` for the nearest known name, or "" when none is near."""
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f": did you mean '{prefix}{close[0]}'?" if close else ""


def _apply(cfg: Config, section: str, key: str, value: Any, source: str) -> None:
    dotted = f"{section}.{key}"
    sections = {f.name: f for f in dataclasses.fields(Config)}
    if section not in sections:
        raise ConfigError(
            f"{source}: unknown section '{section}'{_did_you_mean(section, sections)} "
            f"(known: {', '.join(sections)})"
        )
    target = getattr(cfg, section)
    hints = typing.get_type_hints(type(target))
    if key not in hints:
        raise ConfigError(
            f"{source}: unknown key '{dotted}'{_did_you_mean(key, hints, f'{section}.')} "
            f"(known in '{section}': {', '.join(hints)})"
        )
    value = _check_value(dotted, value, hints[key], source)
    _check_rules(dotted, value, rules_of(target)[key], source)
    setattr(target, key, value)


def _read_yaml(path: str) -> dict[str, Any]:
    try:
        with fsspec.open(path, "r") as f:
            raw = yaml.safe_load(f)
    except FileNotFoundError as e:
        raise ConfigError(f"config file not found: {path}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return raw


def load_config(
    path: str | None, overrides: list[str] | tuple[str, ...] = (), *, fit: bool = True
) -> Config:
    """Load ``path`` (a YAML file or fsspec URL; None = defaults) and apply ``a.b=value`` overrides.

    Override values are parsed with ``yaml.safe_load`` (``3`` is an int, ``true`` a bool,
    ``0.1`` a float, anything else a string). Every value is checked against its key's type and
    rules as it is read, then the rules over several keys (``CROSS_RULES``), then (``fit``)
    whether training with them can fit this machine (:func:`check_fit`; a saved run's config read
    to export or report it elsewhere may skip it); the first failure raises
    :class:`ConfigError` naming the key, the value, the rule and the file or override.
    """
    cfg = Config()
    sources: dict[str, str] = {}
    if path is not None:
        for section, body in _read_yaml(path).items():
            if not isinstance(body, dict):
                raise ConfigError(f"{path}: section '{section}' must be a mapping")
            for key, value in body.items():
                _apply(cfg, str(section), str(key), value, path)
                sources[f"{section}.{key}"] = path
    for item in overrides:
        source = f"override '{item}'"
        dotted, sep, text = item.partition("=")
        section, dot, key = dotted.strip().partition(".")
        if not sep or not dot or not key:
            raise ConfigError(f"{source}: expected SECTION.KEY=VALUE")
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"{source}: value is not valid YAML: {e}") from e
        _apply(cfg, section, key, value, source)
        sources[f"{section}.{key}"] = source
    check_cross(cfg, sources)
    if fit:
        check_fit(cfg)
    return cfg


HASHED_SECTIONS = ("data", "model")  # what a checkpoint must share with the run resuming it


def config_hash(cfg: Config, sections: tuple[str, ...] = HASHED_SECTIONS) -> str:
    """A short stable hash of the sections that define the data and the model's shape."""
    import hashlib

    payload = json.dumps({s: dataclasses.asdict(getattr(cfg, s)) for s in sections}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def main(argv: list[str] | None = None) -> int:
    """``python -m mqsa_core.config CONFIG [section.key] [--set overrides]``: check the config and
    print it resolved (or one value), so shell scripts read settings without parsing YAML;
    ``--rules`` prints what every key's value must be (the table in docs/configuration.md)."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("config", nargs="?")
    parser.add_argument("key", nargs="?", help="section.key to print (default: everything)")
    parser.add_argument("--set", nargs="*", default=[], help="overrides, section.key=value")
    parser.add_argument("--rules", action="store_true", help="print the rules of every key")
    args = parser.parse_args(argv)
    if args.rules:
        print("| key | must be |\n|---|---|")
        print("\n".join(f"| `{key}` | {text} |" for key, text in rules_table()))
        return 0
    if args.config is None:
        parser.error("CONFIG is required")
    try:
        cfg = load_config(args.config, args.set)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not args.key:
        print(cfg.to_yaml(), end="")
        return 0
    section, _, key = args.key.partition(".")
    try:
        print(getattr(getattr(cfg, section), key))
    except AttributeError:
        print(f"error: unknown key '{args.key}'", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
