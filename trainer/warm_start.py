"""Warm start from a previous run (``train.init_from``): day-two training on data prepared
against the data that run trained on (``data.base_dir``: old items keep their rows, new items are
appended).

- The encoder comes from the previous run's best weights (``model.pt``).
- Item rows ``0..N_old-1`` come from the previous run's table (dense: ``model.pt``; TorchRec: its
  ``best_table`` snapshot, loaded at the current world size: DCP reshards, then each rank copies
  the rows of its own shards through lookups).
- A new item's row is the count-weighted mean of the rows of its old neighbours in the current
  transition graph (successors and predecessors); without old neighbours it keeps the seeded
  initial value.
- Optimizer state starts fresh (for every row: Adam and Adagrad re-learn their moments quickly;
  ``train.warmup_steps`` softens the first steps).

Everything is checked before anything is written: a previous run with another model shape
(``model.dim``, ``model.num_blocks``, ``model.transition_term``, ``data.max_len``) or data that
does not extend the previous run's data is refused with a :class:`WarmStartError`.
"""

from __future__ import annotations

import numpy as np
import torch

from core.collectives import to_device
from core.config import Config, load_config
from core.errors import UserError
from core.prepared import read_stats
from core.storage import load_state, read_json
from embeddings.base import ItemTable
from embeddings.factory import build_item_table
from trainer.checkpoint import load_best_table
from trainer.data import load_transitions
from trainer.model import MQSAEncoder
from trainer.run_dir import RunDir

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
        old_cfg = load_config(run.path("config.yaml"))
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
    """Seed ``encoder`` and ``table`` from ``train.init_from`` (collective for a sharded
    table); returns a log line."""
    previous = cfg.train.init_from
    num_old = previous_items(cfg, previous)
    state = load_state(RunDir(previous).path("model.pt"))
    encoder.load_state_dict({k.removeprefix("encoder."): v for k, v in state.items()
                             if k.startswith("encoder.")})  # fmt: skip
    old_cfg = load_config(RunDir(previous).path("config.yaml"))
    if table.has_fused_optimizer:
        old_table = build_item_table(old_cfg, num_old, table.device)
        load_best_table(previous, old_table)
    else:
        old_table = build_item_table(old_cfg, num_old, "cpu")
        old_table.weight.copy_(state["table.weight"])
    seeded = copy_rows(table, old_table, num_old, cfg.data.dir)
    new = table.num_items - num_old
    return (f"warm start from {previous}: encoder and {num_old} item rows; {new} new items, "
            f"{seeded} of them from their neighbours (on this rank)")  # fmt: skip


def copy_rows(table: ItemTable, old: ItemTable, num_old: int, data_dir: str) -> int:
    """Rows ``0..num_old-1`` of ``old`` into ``table``; new rows from their neighbours (see the
    module docstring). Each rank fills the rows it holds (collective lookups for a sharded
    ``old``); returns how many new rows were seeded from neighbours."""
    ids = table.held_ids()
    old_ids = ids[ids < num_old]
    table.assign_rows(old_ids, old.rows(to_device(old_ids, old.device), old_ids))
    new_ids = ids[ids >= num_old]
    target, neighbour, weight = neighbour_means(data_dir, num_old, new_ids)
    distinct, inverse = neighbour.unique(return_inverse=True)
    source = old.rows(to_device(distinct, old.device), distinct).cpu()  # [S, D]
    means = torch.zeros(new_ids.numel(), table.dim)
    means.index_add_(0, target, source[inverse] * weight[:, None])
    seeded = torch.zeros(new_ids.numel(), dtype=torch.bool)
    seeded[target] = True
    table.assign_rows(new_ids[seeded], means[seeded])
    return int(seeded.sum())
