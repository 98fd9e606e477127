"""Where a rank's users come from: training batches and evaluation batches.

Two sources with one interface (``UserSource``):

- ``InMemoryUsers`` (default, paper mode): every rank holds all users; an epoch is one seeded
  permutation of them cut into global batches, and each rank takes its share of each batch, so
  N ranks see exactly the batches of 1 rank.
- ``StreamingUsers`` (``data.stream: true``, catalogue scale): each rank reads only its own row
  groups of ``sequences/`` (``trainer.data.user_stream``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Protocol

import torch

from mqsa_core.config import DataConfig, TrainConfig
from trainer.data.sequences import (
    Sequences,
    TrainRows,
    epoch_order,
    eval_sample,
    load_sequences,
    rank_slice,
)
from trainer.data.user_stream import StreamingUsers


class UserSource(Protocol):
    """The users one rank trains and evaluates on."""

    num_items: int
    num_users: int  # over all ranks
    num_eval_users: int  # users evaluated, over all ranks (train.eval_users; else num_users)

    def describe(self) -> str:
        """One log line: where this rank's users come from."""
        ...

    def steps_per_epoch(self) -> int:
        """Optimiser steps of one epoch: the same on every rank."""
        ...

    def train_batches(self, epoch: int, start_step: int = 0) -> Iterator[TrainRows]:
        """This rank's users of each step of ``epoch`` from ``start_step`` on (deterministic: a
        resumed epoch continues with the same batches)."""
        ...

    def eval_batches(self, batch_size: int) -> tuple[int, Iterator[Sequences]]:
        """``(count, batches)``: this rank's users in batches of at most ``batch_size``; every
        user of every rank is in exactly one batch and ``count`` is the same on every rank
        (a rank with fewer users yields empty batches at the end)."""
        ...


class InMemoryUsers:
    """All users on every rank; each rank takes its share of each global batch."""

    def __init__(self, data: DataConfig, train: TrainConfig, rank: int, world: int) -> None:
        self.seqs = load_sequences(data, train.new_target_weight)
        self.num_items, self.num_users = self.seqs.num_items, self.seqs.num_users
        self.batch_size, self.seed = train.batch_size, train.seed
        self.rank, self.world = rank, world
        sample = eval_sample(self.num_users, train.eval_users, train.seed)
        self.eval_users = torch.arange(self.num_users) if sample is None else sample  # [E]
        self.num_eval_users = self.eval_users.numel()

    def describe(self) -> str:
        return f"all {self.num_users} users in memory on every rank"

    def steps_per_epoch(self) -> int:
        return math.ceil(self.num_users / self.batch_size)

    def train_batches(self, epoch: int, start_step: int = 0) -> Iterator[TrainRows]:
        order = epoch_order(self.num_users, self.seed, epoch)
        for global_users in order.split(self.batch_size)[start_step:]:
            users = rank_slice(global_users, self.rank, self.world)
            yield TrainRows(self.seqs.train[users], self.seqs.new_targets[users])

    def eval_batches(self, batch_size: int) -> tuple[int, Iterator[Sequences]]:
        users = rank_slice(self.eval_users, self.rank, self.world)
        count = math.ceil((self.num_eval_users // self.world + 1) / batch_size)
        return count, (self.seqs.select(b) for b in _pad_split(users, batch_size, count))


def _pad_split(users: torch.Tensor, size: int, count: int) -> list[torch.Tensor]:
    """``users`` in ``count`` pieces of ``size`` (the last ones possibly short or empty)."""
    return [users[b * size : (b + 1) * size] for b in range(count)]


def build_user_source(data: DataConfig, train: TrainConfig, rank: int, world: int) -> UserSource:
    """The source ``data.stream`` asks for (``train``: batch size, seed, new-target weight)."""
    if data.stream:
        return StreamingUsers(data, train, rank, world)
    return InMemoryUsers(data, train, rank, world)
