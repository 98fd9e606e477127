"""Experiment configuration: typed dataclasses loaded from one YAML file plus dotted CLI overrides.

    cfg = load_config("configs/beauty.yaml", ["train.epochs=3", "model.lambda_kd=0"])

Every key is checked: an unknown key or a value of the wrong type raises ``ConfigError`` naming
the key and the file (or the override) it came from. YAML is read with ``yaml.safe_load`` only.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import fsspec
import yaml


class ConfigError(ValueError):
    """A configuration file or override is wrong; the message names the key and its source."""


@dataclass
class DataConfig:
    events: str = ""  # input event log URL (Parquet, CSV or JSON lines; file or directory)
    format: str = "auto"  # auto | parquet | csv | json  (auto: from the URL's extension)
    user_col: str = "user_id"
    item_col: str = "item_id"
    time_col: str = "timestamp"
    # unit of numeric timestamps: auto (refuse a log whose values look like different units)
    # | s | ms | us | ns (ISO/timestamp values converted to it) | order (sequence numbers, no check)
    time_unit: str = "auto"
    dir: str = "data/demo"  # output URL of the prepared data (vocab/, sequences/, transitions/)
    # incremental prepare: a previous prepare output to extend with data.events ("" = off)
    base_dir: str = ""
    transition_decay: float = 1.0  # previous transition counts are multiplied by this (0..1)
    max_len: int = 50
    time_span: int = 1
    paper_mode: bool = True  # transitions from the train sequence cut to max_len (METHOD.md)
    kcore: int = 0  # iterated k-core filter on users and items; 0 = off
    dedup: bool = False  # drop exact duplicate (user, item, timestamp) events, counted
    top_k_successors: int = 0  # keep the K most frequent successors per item; 0 = keep all
    max_time_gap: float = 0.0  # drop transitions whose timestamp gap exceeds this; 0 = off
    num_files: int = 8  # sequences/ is written as this many Parquet files
    # training: false = every rank holds all users (N ranks see the batches of 1 rank);
    # true = each rank streams only its own row groups of sequences/ (catalogue scale)
    stream: bool = False
    shuffle_buffer: int = 65536  # users shuffled together when streaming
    spark_master: str = "local[*]"


@dataclass
class ModelConfig:
    dim: int = 64
    num_blocks: int = 1
    L: int = 3  # window of the long query
    alpha: float = 0.5  # weight of the short-query branch in the score mix
    lambda_kd: float = 0.1  # weight of the TED distillation loss
    tau: float = 0.1  # distillation temperature
    dropout: float = 0.5
    l2: float = 1e-4  # l2 * sum(w^2) / 2 over all trainable tensors


@dataclass
class EmbeddingsConfig:
    backend: str = "dense"  # dense | torchrec
    sharding: str = "row_wise"  # row_wise | table_wise | column_wise (torchrec backend)
    # fused optimizer of the torchrec backend: rowwise_adagrad | adagrad | sgd | adam (GPU only)
    optimizer: str = "rowwise_adagrad"
    lr: float = 0.05  # learning rate of the fused torchrec optimizer


@dataclass
class LossConfig:
    candidates: str = "all"  # all (paper mode, full softmax) | sampled (catalogue mode)
    num_negatives: int = 1024
    sampler: str = "uniform"  # uniform | popularity | in_batch | mixed


@dataclass
class TrainConfig:
    epochs: int = 200
    batch_size: int = 256  # global batch (users per step, over all ranks)
    lr: float = 1e-3
    optimizer: str = "adam"  # optimizer of the DeepSpeed-trained part: adam (paper) | sgd
    grad_clip: float = 0.0  # clip the dense gradients' global norm to this; 0 = off (the paper)
    seed: int = 2023
    eval_every: int = 1
    patience: int = 0  # stop after this many evaluations without a better valid NDCG@20; 0 = off
    # train at least this many optimizer steps: the epochs grow to ceil(min_steps / steps per
    # epoch) on small data (early stopping still applies); 0 = exactly train.epochs (the paper)
    min_steps: int = 0
    warmup_steps: int = 0  # linear learning-rate warm-up over this many steps; 0 = off (paper)
    run_dir: str = "runs/default"
    bf16: bool = False  # bf16 autocast for the catalogue-wide score products
    threads: int = 0  # torch intra-op threads per process; 0 = cores / local processes
    score_chunk: int = 4096  # rows per chunk of the catalogue-wide score products
    eval_batch_size: int = 1024
    # paper: the whole train history is masked and a target inside it is a miss (the reference);
    # repeat_aware: nothing is masked, repeated targets are ranked (data with repeat consumption)
    eval_protocol: str = "paper"
    progress: bool = True
    log_every: int = 100  # steps between logged losses (the only host reads of a step); 0 = epochs
    resume: str = ""  # "" = start fresh | auto = newest complete checkpoint | a checkpoint URL
    # warm start (day two): a previous run whose data this run's data extends (data.base_dir);
    # its encoder and item rows seed this run (trainer/warm_start.py); "" = off
    init_from: str = ""


@dataclass
class DistributedConfig:
    nproc_per_node: int = 2
    zero_stage: int = 0


@dataclass
class CheckpointConfig:
    dir: str = ""  # checkpoint root URL; empty = <run_dir>/checkpoints
    every: int = 0  # also checkpoint every N optimiser steps; 0 = only at epoch ends
    keep: int = 2  # complete checkpoints kept (older ones are deleted)


@dataclass
class ExportConfig:
    out: str = ""  # export URL; empty = <run_dir>/export
    faiss: str = "auto"  # auto | flat | ivf | hnsw | none


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


# The one list of every enumerated setting; modules that switch on a value import it from here.
FORMATS = ("auto", "parquet", "csv", "json")
TIME_UNITS = ("auto", "s", "ms", "us", "ns", "order")
BACKENDS = ("dense", "torchrec")
SHARDINGS = ("row_wise", "table_wise", "column_wise")
TABLE_OPTIMIZERS = ("rowwise_adagrad", "adagrad", "sgd", "adam")
CANDIDATES = ("all", "sampled")
SAMPLERS = ("uniform", "popularity", "in_batch", "mixed")
DENSE_OPTIMIZERS = ("adam", "sgd")
FAISS_KINDS = ("auto", "flat", "ivf", "hnsw", "none")
EVAL_PROTOCOLS = ("paper", "repeat_aware")
CHOICES: dict[str, tuple[str, ...]] = {
    "data.format": FORMATS,
    "data.time_unit": TIME_UNITS,
    "embeddings.backend": BACKENDS,
    "embeddings.sharding": SHARDINGS,
    "embeddings.optimizer": TABLE_OPTIMIZERS,
    "loss.candidates": CANDIDATES,
    "train.optimizer": DENSE_OPTIMIZERS,
    "loss.sampler": SAMPLERS,
    "export.faiss": FAISS_KINDS,
    "train.eval_protocol": EVAL_PROTOCOLS,
}


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
            return value
    elif expected is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif expected is str:
        if isinstance(value, str):
            return value
    name = getattr(expected, "__name__", str(expected))
    raise ConfigError(f"{source}: key '{key}' must be {name}, got {type(value).__name__} {value!r}")


def _apply(cfg: Config, section: str, key: str, value: Any, source: str) -> None:
    dotted = f"{section}.{key}"
    sections = {f.name: f for f in dataclasses.fields(Config)}
    if section not in sections:
        raise ConfigError(f"{source}: unknown section '{section}' (known: {', '.join(sections)})")
    target = getattr(cfg, section)
    hints = typing.get_type_hints(type(target))
    if key not in hints:
        raise ConfigError(
            f"{source}: unknown key '{dotted}' (known in '{section}': {', '.join(hints)})"
        )
    value = _check_value(dotted, value, hints[key], source)
    if dotted in CHOICES and value not in CHOICES[dotted]:
        raise ConfigError(
            f"{source}: key '{dotted}' must be one of {', '.join(CHOICES[dotted])}, got {value!r}"
        )
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


def load_config(path: str | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load ``path`` (a YAML file or fsspec URL; None = defaults) and apply ``a.b=value`` overrides.

    Override values are parsed with ``yaml.safe_load`` (``3`` is an int, ``true`` a bool,
    ``0.1`` a float, anything else a string).
    """
    cfg = Config()
    if path is not None:
        for section, body in _read_yaml(path).items():
            if not isinstance(body, dict):
                raise ConfigError(f"{path}: section '{section}' must be a mapping")
            for key, value in body.items():
                _apply(cfg, str(section), str(key), value, path)
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
    return cfg


def config_hash(cfg: Config, sections: tuple[str, ...] = ("data", "model")) -> str:
    """A short stable hash of the sections that define the data and the model's shape."""
    import hashlib

    payload = json.dumps({s: dataclasses.asdict(getattr(cfg, s)) for s in sections}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def main(argv: list[str] | None = None) -> int:
    """``python -m core.config CONFIG [section.key] [-- overrides]``: print the resolved config
    (or one value), so shell scripts read settings without parsing YAML themselves."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("config")
    parser.add_argument("key", nargs="?", help="section.key to print (default: everything)")
    parser.add_argument("--set", nargs="*", default=[], help="overrides, section.key=value")
    args = parser.parse_args(argv)
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
