"""Warm start from a previous run (``train.init_from``): day-two training on data prepared
against the data that run trained on (``data.base_dir``: old items keep their rows, new items are
appended).

- The encoder comes from the previous run's best weights (``model.pt``).
- Item rows ``0..N_old-1`` come from the previous run's table (dense: ``model.pt``; TorchRec: its
  ``best_table`` snapshot, loaded straight into this run's shards at the current world size: DCP
  reads the chunks that overlap each rank's rows).
- A new item's row is the count-weighted mean of the rows of its old neighbours in the current
  transition graph (successors and predecessors); without old neighbours it keeps the seeded
  initial value.
- Optimizer state (``train.warm_optimizer``, on by default) comes with the weights it belongs
  to: the dense part's from ``optimizer.pt`` (any ZeRO stage and world size on either side;
  :mod:`trainer.runtime.optimizer_state`), a sharded table's fused state from its snapshot, row by
  row. New items' rows start fresh. Where the previous run kept none (another optimizer, an older
  version), that part starts fresh and the log says why. Carrying the moments is what lets a
  few epochs on the new data get close to a retrain (docs/results.md, "Day two").

Everything is checked before anything is written: a previous run with another model shape
(``model.dim``, ``model.num_blocks``, ``model.transition_term``, ``data.max_len``) or data that
does not extend the previous run's data is refused with a :class:`WarmStartError`.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException

from embeddings.base import ItemTable
from mqsa_core.collectives import all_reduce_sum, to_device
from mqsa_core.config import Config, load_config
from mqsa_core.errors import UserError
from mqsa_core.prepared import read_stats
from mqsa_core.storage import load_state, read_json, url_to_fs
from trainer.data.sequences import load_transitions
from trainer.model.encoder import MQSAEncoder
from trainer.runtime.checkpoint import READ_ERRORS, first_line, load_best_rows
from trainer.runtime.optimizer_state import (
    OPTIMIZER_FILE,
    TABLE_WEIGHT,
    carry_optimizer_state,
    holds_model_parameters,
    partitioned,
)
from trainer.runtime.run_dir import RunDir

SHAPE_KEYS = (
    ("model", "dim"), ("model", "num_blocks"), ("model", "transition_term"), ("data", "max_len")
)  # fmt: skip


class WarmStartError(UserError):
    """The previous run cannot seed this one (missing, another model shape, unrelated data)."""


def previous_items(cfg: Config, previous: str) -> int:
    """``N_old``: the items the previous run trained on, after checking that this run's model
    has the same shape and that its data extends the previous run's data."""
    run = RunDir(previous)
    try:
        old_cfg = load_config(run.path("config.yaml"), fit=False)
        data = read_json(run.path("metrics.json")).get("data", {})
    except (FileNotFoundError, UserError) as e:
        raise WarmStartError(f"train.init_from={previous}: not a finished run ({e})") from e
    for section, key in SHAPE_KEYS:
        old, new = getattr(getattr(old_cfg, section), key), getattr(getattr(cfg, section), key)
        if old != new:
            raise WarmStartError(
                f"train.init_from={previous}: {section}.{key} was {old} there and is {new} here; "
                "a warm start needs the same model shape (train from scratch instead)"
            )
    stats = read_stats(cfg.data.dir)
    old_items, old_version = data.get("items"), data.get("version")
    base = stats.get("base") or {"version": stats.get("version"), "items": stats.get("items")}
    if old_items is None or old_version is None or base.get("version") != old_version:
        raise WarmStartError(
            f"train.init_from={previous}: {cfg.data.dir} was not prepared against the data that "
            f"run trained on (its data version {old_version}, this data's base "
            f"{base.get('version')}); prepare with data.base_dir=<that run's data.dir>"
        )
    if int(base["items"]) != int(old_items) or int(stats["items"]) < int(old_items):
        raise WarmStartError(
            f"train.init_from={previous}: {old_items} items there, the base of "
            f"{cfg.data.dir} has {base['items']}: the item rows would not line up"
        )
    return int(old_items)


def neighbour_means(
    data_dir: str, num_old: int, new_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Host-side, for the new items ``new_ids [M]``: ``(row [A], old neighbour [A], weight [A])``
    such that a new item's row is ``sum_a weight_a * E[neighbour_a]`` over its pairs (weights
    of one item sum to 1; items without old neighbours have no pair)."""
    src, dst, count = load_transitions(data_dir)
    a = np.concatenate([src, dst])  # each edge both ways: successors and predecessors
    b = np.concatenate([dst, src])
    w = np.concatenate([count, count]).astype(np.float64)
    top = max(int(a.max(initial=0)), int(new_ids.max()) if new_ids.numel() else 0)
    wanted = np.zeros(top + 1, dtype=bool)
    wanted[new_ids.numpy()] = True
    keep = wanted[a] & (b < num_old)
    a, b, w = a[keep], b[keep], w[keep]
    position = np.full(wanted.shape[0], -1)
    position[new_ids.numpy()] = np.arange(new_ids.numel())
    totals = np.bincount(position[a], weights=w, minlength=new_ids.numel())
    return (
        torch.from_numpy(position[a]),
        torch.from_numpy(b),
        torch.from_numpy((w / totals[position[a]]).astype(np.float32)),
    )


@torch.no_grad()
def warm_start(cfg: Config, encoder: MQSAEncoder, table: ItemTable) -> str:
    """Seed ``encoder`` and ``table`` (and a sharded table's fused optimizer state) from
    ``train.init_from`` (collective for a sharded table); returns a log line."""
    previous = cfg.train.init_from
    num_old = previous_items(cfg, previous)
    state = load_state(RunDir(previous).path("model.pt"))
    encoder.load_state_dict({k.removeprefix("encoder."): v for k, v in state.items()
                             if k.startswith("encoder.")})  # fmt: skip
    if table.has_fused_optimizer:
        old_config = load_config(RunDir(previous).path("config.yaml"), fit=False)
        old_optimizer = old_config.embeddings.optimizer
        carry = cfg.train.warm_optimizer and old_optimizer == cfg.embeddings.optimizer
        try:
            _, carried = load_best_rows(previous, table, num_old, carry)
        except (*READ_ERRORS, CheckpointException) as e:
            cause = e
            if isinstance(e, CheckpointException):  # {rank: (exception, stack)}
                cause = next(iter(e.failures.values()))[0]
            raise WarmStartError(
                f"train.init_from={previous}: its best table snapshot cannot be read "
                f"({first_line(cause)}); warm-start from another run or train from scratch"
            ) from e
        reason = "carried" if carried else "fresh: " + fresh_reason(cfg, old_optimizer)
        note = f" (their fused {cfg.embeddings.optimizer} state {reason})"

        def old_rows(ids: torch.Tensor) -> torch.Tensor:
            return table.rows(to_device(ids, table.device), ids).cpu()  # now the old rows
    else:
        weight = state["table.weight"]
        table.assign_rows(torch.arange(num_old), weight[:num_old])
        note = ""

        def old_rows(ids: torch.Tensor) -> torch.Tensor:
            return weight[ids]

    seeded = seed_new_rows(table, old_rows, num_old, cfg.data.dir)
    if table.has_fused_optimizer:  # each rank seeded the rows it holds
        seeded = int(all_reduce_sum(torch.tensor([seeded], device=table.device))[0])
    new = table.num_items - num_old
    return (f"warm start from {previous}: encoder and {num_old} item rows{note}; {new} new "
            f"items, {seeded} of them from their neighbours")  # fmt: skip


def fresh_reason(cfg: Config, old_optimizer: str) -> str:
    """Why a sharded table's optimizer state was not carried."""
    if not cfg.train.warm_optimizer:
        return "train.warm_optimizer=false"
    if old_optimizer != cfg.embeddings.optimizer:
        return f"embeddings.optimizer was {old_optimizer} there"
    return "the previous run's snapshot holds none (an older version)"


def seed_new_rows(
    table: ItemTable, old_rows: Callable[[torch.Tensor], torch.Tensor], num_old: int,
    data_dir: str,
) -> int:  # fmt: skip
    """Each new row this rank holds becomes the mean of its old neighbours' rows (module
    docstring); ``old_rows(ids [S]) -> [S, D]`` reads the previous run's rows (collective for a
    sharded table: every rank calls it once). Returns how many rows were seeded."""
    ids = table.held_ids()
    new_ids = ids[ids >= num_old]
    target, neighbour, weight = neighbour_means(data_dir, num_old, new_ids)
    distinct, inverse = neighbour.unique(return_inverse=True)
    source = old_rows(distinct)  # [S, D]
    means = torch.zeros(new_ids.numel(), table.dim)
    means.index_add_(0, target, source[inverse] * weight[:, None])
    seeded = torch.zeros(new_ids.numel(), dtype=torch.bool)
    seeded[target] = True
    table.assign_rows(new_ids[seeded], means[seeded])
    return int(seeded.sum())


def warm_optimizer(cfg: Config, model: nn.Module, optimizer: torch.optim.Optimizer) -> str:
    """Give the dense part's ``optimizer`` the previous run's state from its ``optimizer.pt``
    (:mod:`trainer.runtime.optimizer_state`) where that is possible; returns a log line saying what
    was carried or why the state starts fresh."""
    previous = cfg.train.init_from
    run = RunDir(previous)
    fresh = "optimizer state of the dense part starts fresh: "
    if not cfg.train.warm_optimizer:
        return fresh + "train.warm_optimizer=false"
    if not (holds_model_parameters(model, optimizer) or partitioned(model)):
        return fresh + "the optimizer holds neither the parameters nor ZeRO's partitions of them"
    fs, path = url_to_fs(run.path(OPTIMIZER_FILE))
    if not fs.exists(path):
        return fresh + f"{previous} kept no {OPTIMIZER_FILE} (an older version)"
    try:
        saved = load_state(run.path(OPTIMIZER_FILE))  # weights-only: tensors and containers
    except (*READ_ERRORS, pickle.UnpicklingError) as e:
        raise WarmStartError(
            f"train.init_from={previous}: {run.path(OPTIMIZER_FILE)} cannot be read "
            f"({first_line(e)}); delete it to start the optimizer state fresh, or set "
            "train.warm_optimizer=false"
        ) from e
    metrics = read_json(run.path("metrics.json"))  # checked by warm_start (previous_items)
    best, num_old = metrics.get("best_epoch"), int(metrics["data"]["items"])
    if saved.get("epoch") != best:
        when = f"epoch {saved.get('epoch')}, the best weights from epoch {best}"
        return fresh + f"{previous}/{OPTIMIZER_FILE} is from {when} (stopped while saving?)"
    if saved.get("optimizer") != type(optimizer).__name__:
        return fresh + f"it was {saved.get('optimizer')} there, {type(optimizer).__name__} here"
    try:
        count = carry_optimizer_state(model, optimizer, saved, num_old)
    except ValueError as e:
        raise WarmStartError(f"train.init_from={previous}: {e}") from e
    rows = "; new items' rows start fresh" if TABLE_WEIGHT in saved["state"] else ""
    return (f"optimizer state of the dense part: {count} parameters carried from {previous} "
            f"(epoch {best}){rows}")  # fmt: skip
