"""Each rank streams only its own row groups of ``sequences/`` (``data.stream: true``).

The row groups of every Parquet file are listed from the file footers (metadata only, no data
read) and dealt to the ranks by row count, largest first to the least-loaded rank: the ranks
read disjoint parts that differ by at most one row group. An epoch visits a rank's row groups in
a seeded order and shuffles users inside a buffer of ``data.shuffle_buffer`` users, so memory is
one buffer whatever the size of the dataset.

Every rank runs the same number of steps, ``max_r ceil(rows_r / b_r)`` (``b_r`` = the rank's
share of the global batch), so the epoch ends on all ranks together. A rank whose part is
smaller fills its last batches from a fresh shuffled pass over its own users; how many users
repeat is counted and logged (``describe``). Nothing is dropped: every user is trained on once
per epoch and evaluated exactly once (``train.eval_users``: the users of a seeded
sample, each once).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import count, islice

import fsspec
import numpy as np
import pyarrow.parquet as pq
import torch

from mqsa_core.config import DataConfig, TrainConfig
from mqsa_core.prepared import SEQUENCES, DataError, dataset_files
from trainer.data.sequences import (
    Sequences,
    TrainRows,
    batch_share,
    eval_sample,
    prepared_stats,
    sequence_columns,
    sequences_from_table,
)


@dataclass(frozen=True, order=True)
class RowGroup:
    """One row group of one Parquet file of ``sequences/``."""

    path: str  # the file's URL
    index: int  # row group number within the file
    num_rows: int


def list_row_groups(data_dir: str) -> list[RowGroup]:
    """Every non-empty row group of ``<data_dir>/sequences``, from the Parquet footers only."""
    groups = []
    for file in dataset_files(data_dir, SEQUENCES):
        fs, path = fsspec.core.url_to_fs(file)
        with fs.open(path, "rb") as f:
            meta = pq.ParquetFile(f).metadata
        for i in range(meta.num_row_groups):
            if meta.row_group(i).num_rows:
                groups.append(RowGroup(file, i, meta.row_group(i).num_rows))
    return groups


def assign_row_groups(groups: list[RowGroup], world: int) -> list[list[RowGroup]]:
    """Deal row groups to ``world`` ranks, largest first to the least-loaded rank
    (deterministic: every rank computes the same assignment)."""
    shares: list[list[RowGroup]] = [[] for _ in range(world)]
    loads = [0] * world
    for group in sorted(groups, key=lambda g: (-g.num_rows, g.path, g.index)):
        rank = min(range(world), key=lambda r: (loads[r], r))
        shares[rank].append(group)
        loads[rank] += group.num_rows
    return shares


def rebatch(chunks: Iterable[Sequences], size: int) -> Iterator[Sequences]:
    """Regroup a stream of user chunks into batches of exactly ``size`` users (the last one
    may be short)."""
    pending: list[Sequences] = []
    have = 0
    for chunk in chunks:
        start = 0
        while start < chunk.num_users:
            take = min(size - have, chunk.num_users - start)
            pending.append(chunk.select(slice(start, start + take)))
            have, start = have + take, start + take
            if have == size:
                yield Sequences.cat(pending)
                pending, have = [], 0
    if pending:
        yield Sequences.cat(pending)


def sampled_rows(groups: list[RowGroup], sample: torch.Tensor) -> dict[RowGroup, torch.Tensor]:
    """``{group: [R] its rows in the sample}``: ``sample`` holds sorted positions in the users
    of ``groups`` laid end to end in their listed order."""
    rows, start = {}, 0
    for group in groups:
        end = start + group.num_rows
        inside = sample[torch.searchsorted(sample, start) : torch.searchsorted(sample, end)]
        rows[group] = inside - start
        start = end
    return rows


class StreamingUsers:
    """This rank's row groups of ``sequences/``, read one at a time."""

    def __init__(self, data: DataConfig, train: TrainConfig, rank: int, world: int) -> None:
        stats = prepared_stats(data, train.new_target_weight)
        self.num_items = int(stats["items"])
        self.columns = sequence_columns(stats)
        self.max_len, self.seed, self.rank = data.max_len, train.seed, rank
        self.shuffle_buffer = data.shuffle_buffer
        url = data.dir.rstrip("/") + "/sequences"
        groups = list_row_groups(data.dir)
        self.num_users = sum(g.num_rows for g in groups)
        if self.num_users == 0:
            raise DataError(f"{url} is empty: no user survived prepare")
        expected = stats.get("users")
        if expected is not None and int(expected) != self.num_users:
            raise DataError(
                f"{url} holds {self.num_users} users but stats.json says {expected}: "
                "a damaged or mixed prepare output"
            )
        shares = assign_row_groups(groups, world)
        rows = [sum(g.num_rows for g in share) for share in shares]
        if min(rows) == 0:
            raise DataError(
                f"{url} has {len(groups)} row groups for {world} ranks: every rank needs one; "
                "prepare with a larger data.num_files"
            )
        batch = train.batch_size
        if batch < world:
            raise DataError(f"train.batch_size={batch} is smaller than the {world} ranks")
        sample = eval_sample(self.num_users, train.eval_users, train.seed)
        self.eval_rows = None if sample is None else sampled_rows(groups, sample)
        # every rank's users to evaluate (each rank computes all, so the batch counts agree)
        self.share_eval = [sum(self._eval_count(g) for g in share) for share in shares]
        self.num_eval_users = sum(self.share_eval)
        self.groups, self.share_rows = shares[rank], rows
        self.batch = batch_share(batch, rank, world)
        self.steps = max(math.ceil(n / batch_share(batch, r, world)) for r, n in enumerate(rows))

    @property
    def rows(self) -> int:
        """Users in this rank's row groups."""
        return self.share_rows[self.rank]

    def describe(self) -> str:
        return (
            f"streaming: rank {self.rank} reads {len(self.groups)} row groups ({self.rows} of "
            f"{self.num_users} users); {self.steps} steps of {self.batch}, "
            f"{self.steps * self.batch - self.rows} users repeated per epoch to even out steps"
        )

    def steps_per_epoch(self) -> int:
        return self.steps

    def _read(self, group: RowGroup) -> Sequences:
        fs, path = fsspec.core.url_to_fs(group.path)
        with fs.open(path, "rb") as f:
            table = pq.ParquetFile(f).read_row_group(group.index, columns=self.columns)
        where = f"{group.path} (row group {group.index})"
        return sequences_from_table(table, self.max_len, self.num_items, where)

    def _eval_count(self, group: RowGroup) -> int:
        """Users of ``group`` to evaluate."""
        return group.num_rows if self.eval_rows is None else self.eval_rows[group].numel()

    def _read_eval(self, group: RowGroup) -> Sequences:
        users = self._read(group)
        return users if self.eval_rows is None else users.select(self.eval_rows[group])

    def _shuffled_pass(self, epoch: int, pass_index: int) -> Iterator[Sequences]:
        """All of this rank's users once: row groups in a seeded order, users shuffled within
        buffers of ``shuffle_buffer``."""
        rng = np.random.default_rng([self.seed, epoch, pass_index, self.rank])
        buffer: list[Sequences] = []
        for i in rng.permutation(len(self.groups)):
            buffer.append(self._read(self.groups[i]))
            if sum(c.num_users for c in buffer) >= self.shuffle_buffer:
                yield self._shuffle(Sequences.cat(buffer), rng)
                buffer = []
        if buffer:
            yield self._shuffle(Sequences.cat(buffer), rng)

    @staticmethod
    def _shuffle(users: Sequences, rng: np.random.Generator) -> Sequences:
        return users.select(torch.from_numpy(rng.permutation(users.num_users)))

    def train_batches(self, epoch: int, start_step: int = 0) -> Iterator[TrainRows]:
        passes = (chunk for p in count() for chunk in self._shuffled_pass(epoch, p))
        batches = islice(rebatch(passes, self.batch), start_step, self.steps)
        return (TrainRows(b.train, b.new_targets) for b in batches)

    def eval_batches(self, batch_size: int) -> tuple[int, Iterator[Sequences]]:
        num = math.ceil(max(self.share_eval) / batch_size)
        chunks = (self._read_eval(g) for g in self.groups if self._eval_count(g))
        none = torch.empty(0, dtype=torch.int64)
        empty = Sequences(
            torch.empty(0, self.max_len, dtype=torch.int64), none, none, self.num_items,
            torch.zeros(1, dtype=torch.int64), none, none,
        )  # fmt: skip
        batches = rebatch(chunks, batch_size)
        return num, (next(batches, empty) for _ in range(num))
