"""``train.new_target_weight``: the batch weights exactly the targets that are new since the base,
a position of weight k counts in every loss as k copies of it, and the reader refuses a count
that does not fit its user."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest
import torch

from mqsa_core.prepared import DataError
from trainer.data.batches import BatchBuilder, accidental_hits
from trainer.data.sequences import TrainRows, sequences_from_table
from trainer.data.teacher import SparseTeacher
from trainer.model.losses import (
    TeacherRows,
    full_softmax_rec_loss,
    sampled_rec_loss,
    sampled_ted_loss,
    ted_loss,
)

N, D, TAU = 30, 8, 0.1


def test_batch_weights_the_last_new_targets_of_each_user():
    pad = 6
    train = torch.tensor([[0, 1, 2, 3], [pad, pad, 4, 5]])  # right-aligned, padding id 6
    users = TrainRows(train, new_targets=torch.tensor([2, 1]))
    batch = BatchBuilder(pad, new_target_weight=3.0)(users)
    # user 0: targets 1, 2, 3 (the last 2 new); user 1: target 5 (new)
    assert batch.targets.tolist() == [1, 2, 3, 5]
    assert batch.weights.tolist() == [1.0, 3.0, 3.0, 3.0]
    assert batch.counts.tolist() == [10.0]
    plain = BatchBuilder(pad)(users)  # weight 1: every target alike
    assert plain.weights.tolist() == [1.0] * 4 and plain.counts.tolist() == [4.0]
    assert BatchBuilder(pad, new_target_weight=3.0)(train).counts.tolist() == [4.0]


def test_a_position_of_weight_k_counts_as_k_copies_in_every_loss():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    src, dst = rng.integers(N - 3, size=80), rng.integers(N, size=80)
    teacher = SparseTeacher.from_edges(src, dst, np.ones(80), N, TAU)
    items = (torch.randn(N, D) * 0.3).requires_grad_()
    queries = torch.randn(12, D).requires_grad_()
    targets, heads = torch.randint(0, N, (12,)), torch.randint(0, N, (12,))
    weights = torch.tensor([1.0, 3.0, 2.0] * 4)
    cand_ids = torch.randperm(N)[:10]
    cand_log_q = torch.linspace(-1.0, -2.0, 10)
    norm = float(weights.sum())

    def losses(q, t, h, w):
        student = items[h] * math.sqrt(D)
        head_index, succ, excess = teacher.rows(h)
        rows = TeacherRows(teacher.base[h], head_index, excess, items, succ, h)
        hits = accidental_hits(head_index, succ, cand_ids)[:2]
        cand_emb = items[cand_ids]
        return [
            full_softmax_rec_loss(q, items[t], items, norm, 5, False, weights=w),
            ted_loss(student, items, rows, TAU, norm, 5, False, weights=w),
            sampled_rec_loss(q, t, items[t], cand_ids, cand_log_q, cand_emb, norm, weights=w),
            sampled_ted_loss(
                student, rows, cand_log_q, cand_emb, hits, items.sum(0).detach(), TAU, norm,
                weights=w,
            ),
        ]  # fmt: skip

    copies = weights.long()
    weighted = losses(queries, targets, heads, weights)
    repeated = losses(
        queries.repeat_interleave(copies, 0),
        targets.repeat_interleave(copies),
        heads.repeat_interleave(copies),
        None,
    )
    for got, want in zip(weighted, repeated, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        inputs = [queries, items]  # TED does not read the queries: no gradient either way
        got_grads = torch.autograd.grad(got, inputs, retain_graph=True, allow_unused=True)
        want_grads = torch.autograd.grad(want, inputs, retain_graph=True, allow_unused=True)
        for g, w in zip(got_grads, want_grads, strict=True):
            assert (g is None) == (w is None)
            if g is not None:
                torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_reader_refuses_a_new_target_count_outside_the_train_items():
    def table(new_targets: int) -> pa.Table:
        return pa.table({
            "train_items": [[0, 1]], "valid_item": [2], "test_item": [3],
            "new_targets": pa.array([new_targets], pa.int64()),
        })  # fmt: skip

    assert sequences_from_table(table(2), 4, 5, "here").new_targets.tolist() == [2]
    for bad in (3, -1):
        with pytest.raises(DataError, match="here: a new_targets count outside"):
            sequences_from_table(table(bad), 4, 5, "here")
