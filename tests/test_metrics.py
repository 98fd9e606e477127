"""HR/NDCG against hand-computed ranks, and the chunked rank count against a full sort."""

import math

import torch

from tests.reference_ranks import target_ranks
from trainer.evaluation.evaluate import EvalSplit
from trainer.evaluation.metrics import metric_sums, metrics_from_sums


def test_metrics_from_hand_computed_ranks():
    ranks = torch.tensor([1, 3, 6, 11, 25])
    m = metrics_from_sums(metric_sums(ranks))
    assert m["HR@5"] == 2 / 5
    assert m["HR@10"] == 3 / 5
    assert m["HR@20"] == 4 / 5
    assert math.isclose(m["NDCG@5"], (1 / math.log2(2) + 1 / math.log2(4)) / 5)
    assert math.isclose(m["NDCG@10"], (1 + 1 / math.log2(4) + 1 / math.log2(7)) / 5)
    assert math.isclose(
        m["NDCG@20"], (1 + 1 / math.log2(4) + 1 / math.log2(7) + 1 / math.log2(12)) / 5
    )


def test_sums_add_exactly_across_parts():
    ranks = torch.randint(1, 40, (101,))
    whole = metric_sums(ranks)
    parts = metric_sums(ranks[:37]) + metric_sums(ranks[37:])
    assert torch.equal(whole[[0, 2, 4, 6]], parts[[0, 2, 4, 6]])  # hit and user counts: exact
    torch.testing.assert_close(whole, parts, rtol=1e-12, atol=0)


def test_rank_count_matches_sorting_with_history_masked():
    """Chunked counting = a full sort with the history removed; a target inside its user's
    history is a miss (rank N + 1), as in the reference."""
    torch.manual_seed(0)
    n = 40
    items = torch.randn(n, 6)
    queries = torch.randn(5, 6)
    targets = torch.tensor([0, 7, 13, 39, 21])
    history = [[1, 2], [], [12, 5, 6, 13], [38, 37, 36], [19, 0, 1]]  # user 2 repeats its target
    rows = torch.tensor([b for b, h in enumerate(history) for _ in h])
    masked_items = torch.tensor([i for h in history for i in h])
    target_masked = torch.tensor([int(t) in h for t, h in zip(targets, history, strict=True)])
    split = EvalSplit(torch.zeros(5, 1), targets, rows, masked_items, target_masked)
    for chunk in (7, 40, 1000):
        got = target_ranks(queries, items, split, chunk)
        for b in range(5):
            if targets[b].item() in history[b]:
                assert got[b].item() == n + 1  # a miss
                continue
            scores = queries[b] @ items.T
            order = [
                j for j in torch.argsort(scores, descending=True).tolist() if j not in history[b]
            ]
            assert got[b].item() == order.index(targets[b].item()) + 1
