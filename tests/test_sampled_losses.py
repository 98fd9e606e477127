"""Catalogue-mode losses: paper mode with all items as candidates; log-Q; accidental hits."""

import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from embeddings.dense import DenseItemTable
from mqsa_core.config import load_config
from trainer.data.batches import BatchBuilder, accidental_hits
from trainer.data.samplers import Candidates, NegativeSampler, load_item_counts, occurrences
from trainer.data.teacher import SparseTeacher
from trainer.model.encoder import MQSAEncoder
from trainer.model.losses import (
    TeacherRows,
    full_softmax_rec_loss,
    sampled_rec_loss,
    sampled_ted_loss,
    ted_loss,
)
from trainer.model.objectives import CatalogObjective, PaperObjective

N, D, TAU = 30, 8, 0.1


def _teacher(num_items: int = N) -> SparseTeacher:
    rng = np.random.default_rng(0)
    src = rng.integers(num_items - 3, size=80)  # the last items have no successors
    dst = rng.integers(num_items, size=80)
    return SparseTeacher.from_edges(src, dst, np.ones(80), num_items, TAU)


def test_all_items_candidates_equal_paper_losses_value_and_gradients():
    torch.manual_seed(0)
    teacher = _teacher()
    items = (torch.randn(N, D) * 0.3).requires_grad_()
    queries = torch.randn(25, D).requires_grad_()
    targets = torch.randint(0, N, (25,))
    heads = torch.randint(0, N, (20,))
    student = items[heads] * math.sqrt(D)
    head_index, succ, excess = teacher.rows(heads)
    rows = TeacherRows(teacher.base[heads], head_index, excess, items, succ, heads)

    rec = full_softmax_rec_loss(queries, items[targets], items, 25.0, 7, False)
    kd = ted_loss(student, items, rows, TAU, 20.0, 7, False)
    want = rec + 0.1 * kd
    want_grads = torch.autograd.grad(want, [queries, items], retain_graph=True)

    cands = NegativeSampler("all", N, 0).sample(targets)
    cand_emb = items[cands.ids]
    hits = accidental_hits(head_index, succ, cands.ids)[:2]
    got_rec = sampled_rec_loss(queries, targets, items[targets], cands.ids, cands.log_q, cand_emb,
                               25.0)  # fmt: skip
    got_kd = sampled_ted_loss(
        student, rows, cands.log_q, cand_emb, hits, items.sum(0).detach(), TAU, 20.0
    )
    got_grads = torch.autograd.grad(got_rec + 0.1 * got_kd, [queries, items])
    torch.testing.assert_close(got_rec, rec, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_kd, kd, rtol=1e-5, atol=1e-5)
    for got, ref in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_catalog_step_with_all_items_equals_paper_step():
    """The whole step (one read of the table, encoder, both losses): CatalogObjective with every
    item as a candidate against PaperObjective, dense table."""
    cfg = load_config(None, ["model.dim=8", "model.dropout=0.0"])
    torch.manual_seed(0)
    encoder = MQSAEncoder(cfg.model, max_len=6)
    table = DenseItemTable(N, 8, init_std=0.3)
    teacher = _teacher()
    paper = PaperObjective(encoder, table, teacher, cfg.model, cfg.train).eval()
    catalog = CatalogObjective(encoder, table, teacher, cfg.model, cfg.train).eval()
    train = torch.randint(0, N, (5, 6))
    train[0, :3] = N  # a short user: left padding
    want = paper(BatchBuilder(N, teacher)(train))
    want_grads = torch.autograd.grad(want.total, list(paper.parameters()))
    got = catalog(BatchBuilder(N, teacher, NegativeSampler("all", N, 0))(train))
    got_grads = torch.autograd.grad(got.total, list(paper.parameters()))
    torch.testing.assert_close(got.total, want.total, rtol=1e-5, atol=1e-5)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_accidental_hits_are_masked():
    torch.manual_seed(0)
    items = torch.randn(N, D).requires_grad_()
    queries = torch.randn(3, D)
    targets = torch.tensor([4, 7, 9])
    ids = torch.tensor([4, 11, 7, 4])  # 4 and 7 are positives of rows 0 and 1
    cands = Candidates(ids, torch.full((4,), 0.5))
    got = sampled_rec_loss(queries, targets, items[targets], ids, cands.log_q, items[ids], 3.0)
    want = 0.0
    for p in range(3):
        keep = ids != targets[p]
        logits = torch.cat(
            [
                (queries[p] * items[targets[p]]).sum()[None],
                queries[p] @ items[ids[keep]].T - 0.5,
                torch.zeros(1),  # the padding row's logit
            ]
        )
        want = want + torch.logsumexp(logits, 0) - logits[0]
    torch.testing.assert_close(got, want / 3.0)
    (grad,) = torch.autograd.grad(got, items)
    # row 0's positive (item 4) appears twice as a negative: masked, so item 4 is only pulled up
    # by row 0 and pushed down by rows 1 and 2; check against the hand-written loss
    (want_grad,) = torch.autograd.grad(want / 3.0, items)
    torch.testing.assert_close(grad, want_grad)


def test_log_q_is_log_expected_multiplicity():
    k = 64
    counts = torch.arange(1, N + 1, dtype=torch.float64)
    uniform = NegativeSampler("uniform", N, k).sample(torch.tensor([1]))
    assert torch.allclose(uniform.log_q, torch.full((k,), math.log(k / N)))
    pop = NegativeSampler("popularity", N, k, counts=counts).sample(torch.tensor([1]))
    torch.testing.assert_close(pop.log_q, (k * counts[pop.ids] / counts.sum()).log().float())
    targets = torch.tensor([3, 3, 3, 5])
    batch = NegativeSampler("in_batch", N, k).sample(targets)
    torch.testing.assert_close(
        batch.log_q, (k * occurrences(targets, batch.ids) / 4.0).log().float()
    )
    mixed = NegativeSampler("mixed", N, k, counts=counts).sample(targets)
    half = k // 2
    want = half * counts[mixed.ids] / counts.sum() + half * occurrences(targets, mixed.ids) / 4
    torch.testing.assert_close(mixed.log_q, want.log().float())
    assert occurrences(targets, torch.tensor([3, 4, 5, 99])).tolist() == [3, 0, 1, 0]


@pytest.mark.parametrize("kind", ["uniform", "popularity", "mixed", "in_batch", "global_batch"])
def test_corrected_sum_is_unbiased(kind):
    """E[sum_k exp(s_k - logQ_k)] = sum over the reachable items of exp(s_j)."""
    torch.manual_seed(0)
    scores = torch.randn(N, dtype=torch.float64)
    counts = torch.rand(N, dtype=torch.float64) + 0.1
    targets = torch.tensor([2, 2, 8, 13, 13, 13])
    sampler = NegativeSampler(kind, N, 16, counts=counts, seed=1)
    trials = 4000
    total = 0.0
    for trial in range(trials):
        c = sampler.sample(targets, sampler.generator(trial))
        total += torch.exp(scores[c.ids] - c.log_q.double()).sum().item()
    reachable = targets.unique() if kind == "in_batch" else torch.arange(N)
    want = scores[reachable].exp().sum().item()
    assert abs(total / trials - want) / want < 0.03


def test_sampled_ted_partition_and_item_sum():
    """The partition holds each head's successors exactly plus the candidates that are not its
    successors (log-Q corrected); the item sum's value is exact, its gradient the estimate."""
    torch.manual_seed(0)
    teacher = _teacher()
    items = torch.randn(N, D).requires_grad_()
    heads = torch.tensor([0, 1, 2])
    student = torch.randn(3, D)
    head_index, succ_ids, excess = teacher.rows(heads)
    # candidate 0 is a successor of head 0 (an accidental hit), candidate 1 of nobody here
    others = [j for j in range(N) if j not in succ_ids.tolist()]
    cand_ids = torch.tensor([int(succ_ids[head_index == 0][0]), others[0]])
    cands = Candidates(cand_ids, torch.log(torch.tensor([0.5, 0.25])))
    rows = TeacherRows(teacher.base[heads], head_index, excess, items, succ_ids, heads)
    exact = items.sum(0).detach()
    hits = accidental_hits(head_index, succ_ids, cand_ids)[:2]
    assert len(hits[0]) >= 1
    loss = sampled_ted_loss(student, rows, cands.log_q, items[cand_ids], hits, exact, TAU, 1.0)

    scaled = student / TAU
    lse = 0.0
    for h in range(3):
        mine = succ_ids[head_index == h]
        terms = [scaled[h] @ items[j] for j in mine.tolist()] + [
            scaled[h] @ items[c] - q
            for c, q in zip(cand_ids.tolist(), cands.log_q, strict=True)
            if c not in mine.tolist()
        ]
        lse = lse + torch.logsumexp(torch.stack(terms), 0)
    base = teacher.base[heads]
    succ = (excess * (scaled[head_index] * items[succ_ids]).sum(-1)).sum()
    torch.testing.assert_close(loss, lse - (base * (scaled @ exact)).sum() - succ)
    # gradient: sum_j E_j replaced by its estimate 2 E_c0 + 4 E_c1 (weights 1 / expected count)
    estimate = 2.0 * items[cand_ids[0]] + 4.0 * items[cand_ids[1]]
    (grad,) = torch.autograd.grad(loss, items, retain_graph=True)
    (want,) = torch.autograd.grad(lse - (base * (scaled @ estimate)).sum() - succ, items)
    torch.testing.assert_close(grad, want, rtol=1e-4, atol=1e-4)


def test_popularity_sampler_from_config_reads_vocab_counts(tmp_path):
    (tmp_path / "vocab").mkdir()
    vocab = pa.table({"item_id": ["a", "b", "c"], "index": [0, 2, 1], "count": [5, 1, 3]})
    pq.write_table(vocab, tmp_path / "vocab" / "part-0.parquet")
    (tmp_path / "_COMPLETE").write_text("")  # a committed prepare output
    assert load_item_counts(str(tmp_path), 3).tolist() == [5.0, 3.0, 1.0]
    cfg = load_config(None, [f"data.dir={tmp_path}", "loss.sampler=popularity"])
    sampler = NegativeSampler.from_config(cfg.loss, cfg.data.dir, 3, cfg.train.seed)
    torch.testing.assert_close(
        sampler.probs, torch.tensor([5.0, 3.0, 1.0], dtype=torch.float64) / 9
    )
