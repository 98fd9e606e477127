"""Reads the prepared data (``sequences/``, ``transitions/``, ``stats.json``) and builds batches.

Users' cut train sequences are right-aligned ``[U, M]`` int64 matrices (``M = max_len``; padding
id = N). Paper mode holds all users in one (small even for millions of users at M = 50); with
``data.stream`` each rank reads only its own row groups (``trainer.data.user_stream``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mqsa_core.config import DataConfig
from mqsa_core.prepared import (
    NEW_TARGETS,
    SEQUENCES,
    TRANSITIONS,
    DataError,
    read_dataset,
    read_stats,
)

EVAL_SAMPLE_STREAM = 7  # the evaluation sample's random stream, apart from the epochs' orders


@dataclass
class Sequences:
    """Users' data (host tensors): all of them (paper mode) or one chunk of a streamed part.

    Attributes:
        train: ``[U, M]`` int64 cut train sequences (the last ``max_len`` train items),
            right-aligned, padding id N.
        valid: ``[U]`` validation targets.
        test: ``[U]`` test targets.
        num_items: N.
        history_offsets: ``[U + 1]`` int64 CSR offsets of each user's WHOLE train history in
            ``history_items`` (evaluation masks all of it, not only the cut ``train``).
        history_items: ``[S]`` int64 every user's train items, oldest first.
        new_targets: ``[U]`` int64 how many of the last train items the base of an incremental
            prepare did not train on (0 for data prepared without a base).
    """

    train: torch.Tensor
    valid: torch.Tensor
    test: torch.Tensor
    num_items: int
    history_offsets: torch.Tensor
    history_items: torch.Tensor
    new_targets: torch.Tensor

    @property
    def num_users(self) -> int:
        return self.train.shape[0]

    @property
    def max_len(self) -> int:
        return self.train.shape[1]

    def select(self, rows: torch.Tensor | slice) -> Sequences:
        """The users ``rows`` (an index tensor or a slice), in that order."""
        if isinstance(rows, slice):
            rows = torch.arange(self.num_users)[rows]
        starts = self.history_offsets[rows]
        lengths = self.history_offsets[rows + 1] - starts
        offsets = torch.zeros(rows.numel() + 1, dtype=torch.int64)
        torch.cumsum(lengths, 0, out=offsets[1:])
        source = torch.repeat_interleave(starts - offsets[:-1], lengths) + torch.arange(
            int(offsets[-1])
        )
        return Sequences(
            self.train[rows], self.valid[rows], self.test[rows], self.num_items,
            offsets, self.history_items[source], self.new_targets[rows],
        )  # fmt: skip

    @staticmethod
    def cat(chunks: list[Sequences]) -> Sequences:
        """The users of ``chunks`` one after the other (at least one chunk)."""
        shifts = torch.tensor([0] + [int(c.history_offsets[-1]) for c in chunks[:-1]]).cumsum(0)
        offsets = [chunks[0].history_offsets[:1]] + [
            c.history_offsets[1:] + shift for c, shift in zip(chunks, shifts, strict=True)
        ]
        return Sequences(
            torch.cat([c.train for c in chunks]),
            torch.cat([c.valid for c in chunks]),
            torch.cat([c.test for c in chunks]),
            chunks[0].num_items,
            torch.cat(offsets),
            torch.cat([c.history_items for c in chunks]),
            torch.cat([c.new_targets for c in chunks]),
        )

    def test_inputs(self) -> torch.Tensor:
        """Test input: (cut train + validation item)[-M:] ``[U, M]``."""
        shifted = torch.empty_like(self.train)
        shifted[:, :-1] = self.train[:, 1:]
        shifted[:, -1] = self.valid
        return shifted


@dataclass
class TrainRows:
    """One step's users on one rank, as the batch builder reads them (host tensors).

    Attributes:
        items: ``[b, M]`` int64 cut train sequences, right-aligned, padding id N.
        new_targets: ``[b]`` int64 how many of each user's last targets are new since the base
            (``Sequences.new_targets``).
    """

    items: torch.Tensor
    new_targets: torch.Tensor


def right_align(lists, max_len: int, pad: int) -> np.ndarray:
    """Pack the last ``max_len`` items of each list into a right-aligned ``[U, M]`` matrix."""
    offsets = lists.offsets.to_numpy()
    values = lists.values.to_numpy(zero_copy_only=False).astype(np.int64)
    lengths = np.diff(offsets)
    keep = np.minimum(lengths, max_len)
    out = np.full((len(lengths), max_len), pad, dtype=np.int64)
    rows = np.repeat(np.arange(len(lengths)), keep)
    within = np.arange(keep.sum()) - np.repeat(np.cumsum(keep) - keep, keep)
    src = np.repeat(offsets[1:] - keep, keep) + within
    out[rows, max_len - np.repeat(keep, keep) + within] = values[src]
    return out


SEQUENCE_COLUMNS = ["train_items", "valid_item", "test_item"]


def sequence_columns(stats: dict) -> list[str]:
    """The columns of ``sequences/`` to read: the split, and ``new_targets`` where
    ``stats.json`` lists it (an incremental prepare)."""
    optional = [NEW_TARGETS] if NEW_TARGETS in stats.get("sequence_columns", []) else []
    return SEQUENCE_COLUMNS + optional


def prepared_stats(data: DataConfig, new_target_weight: float = 1.0) -> dict:
    """The committed ``stats.json`` of ``data.dir``, after checking that ``data.max_len``
    matches it and that data for a ``new_target_weight`` (``train.new_target_weight``) other
    than 1 says which targets are new."""
    stats = read_stats(data.dir)
    if "max_len" in stats and int(stats["max_len"]) != data.max_len:
        raise DataError(
            f"data.max_len={data.max_len} but {data.dir} was prepared with "
            f"max_len={stats['max_len']}: re-run prepare or fix the config"
        )
    weight = new_target_weight
    if weight != 1.0 and NEW_TARGETS not in sequence_columns(stats):
        raise DataError(
            f"train.new_target_weight={weight} weights the targets that are new since the base "
            f"of an incremental prepare, but {data.dir} was not prepared against a base "
            "(data.base_dir) by this version: set it to 1 or re-run prepare with a base"
        )
    return stats


def sequences_from_table(table, max_len: int, num_items: int, where: str) -> Sequences:
    """Right-align and check one Arrow table of ``sequences/`` rows (``where`` names it in
    errors): every item index must lie in ``0..N-1``."""
    train_col = table.column("train_items").combine_chunks()
    values = train_col.values.to_numpy(zero_copy_only=False)
    valid = table.column("valid_item").to_numpy().astype(np.int64)
    test = table.column("test_item").to_numpy().astype(np.int64)
    if len(valid):
        top = max(values.max(initial=-1), valid.max(), test.max())
        if top >= num_items or min(values.min(initial=0), valid.min(), test.min()) < 0:
            raise DataError(f"{where} holds item index {top} but stats.json says {num_items} items")
    offsets = train_col.offsets.to_numpy().astype(np.int64)
    if NEW_TARGETS in table.column_names:
        new_targets = table.column(NEW_TARGETS).to_numpy().astype(np.int64)
        if ((new_targets < 0) | (new_targets > np.diff(offsets))).any():
            raise DataError(f"{where}: a {NEW_TARGETS} count outside 0..its train items")
    else:
        new_targets = np.zeros(len(valid), dtype=np.int64)
    return Sequences(
        train=torch.from_numpy(right_align(train_col, max_len, num_items)),
        valid=torch.from_numpy(valid),
        test=torch.from_numpy(test),
        num_items=num_items,
        history_offsets=torch.from_numpy(offsets - offsets[0]),
        history_items=torch.from_numpy(values[offsets[0] : offsets[-1]].astype(np.int64)),
        new_targets=torch.from_numpy(new_targets),
    )


def load_sequences(data: DataConfig, new_target_weight: float = 1.0) -> Sequences:
    """Read all of ``<data.dir>/sequences/`` and check it against ``data`` and ``stats.json``
    (:func:`prepared_stats`)."""
    stats = prepared_stats(data, new_target_weight)
    num_items = int(stats["items"])
    url = data.dir.rstrip("/") + "/sequences"
    table = read_dataset(data.dir, SEQUENCES, sequence_columns(stats))
    if table.num_rows == 0:
        raise DataError(f"{data.dir}/sequences is empty: no user survived prepare")
    return sequences_from_table(table, data.max_len, num_items, url)


def load_transitions(data_dir: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(src, dst, count)`` int64 arrays of ``transitions/``."""
    table = read_dataset(data_dir, TRANSITIONS, ["src", "dst", "count"])
    return tuple(table.column(c).to_numpy().astype(np.int64) for c in ("src", "dst", "count"))


def epoch_order(num_users: int, seed: int, epoch: int) -> torch.Tensor:
    """The deterministic user permutation of an epoch ``[U]`` (same on every rank)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_users, generator=g)


def rank_slice(global_batch: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This rank's contiguous share of a global batch of user ids (shares differ by <= 1)."""
    return global_batch.tensor_split(world)[rank]


def eval_sample(num_users: int, size: int, seed: int) -> torch.Tensor | None:
    """``[size]`` sorted positions of the users evaluated (``train.eval_users``), drawn once
    from ``seed``: the same sample whatever the world size or user source; ``None`` when
    ``size`` is 0 or covers every user."""
    if size == 0 or size >= num_users:
        return None
    rng = np.random.default_rng([seed, EVAL_SAMPLE_STREAM])
    return torch.from_numpy(np.sort(rng.choice(num_users, size, replace=False)))


def batch_share(batch_size: int, rank: int, world: int) -> int:
    """How many of a global batch's ``batch_size`` users ``rank`` takes (as ``rank_slice``)."""
    return batch_size // world + (1 if rank < batch_size % world else 0)
