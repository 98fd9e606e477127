"""Ranking metrics with one relevant item: HR@K and NDCG@K from the target's rank.

Kept as sums so ranks can add them exactly (never an average of averages).
"""

from __future__ import annotations

import torch

CUTOFFS = (5, 10, 20)
METRIC_NAMES = tuple(f"{m}@{k}" for k in CUTOFFS for m in ("HR", "NDCG"))


def metric_sums(ranks: torch.Tensor) -> torch.Tensor:
    """``[len(METRIC_NAMES) + 1]`` float64 sums (the last entry is the user count).

    Args:
        ranks: ``[B]`` 1-based rank of each user's target among the unmasked items.
    """
    ranks = ranks.to(torch.float64)
    gain = 1.0 / torch.log2(ranks + 1.0)
    sums = []
    for k in CUTOFFS:
        hit = ranks <= k
        sums += [hit.sum(), (gain * hit).sum()]
    sums.append(torch.full((), ranks.numel(), dtype=torch.float64, device=ranks.device))
    return torch.stack(sums)


def metrics_from_sums(sums: torch.Tensor) -> dict[str, float]:
    """Turn summed ``metric_sums`` into means keyed ``HR@5``, ``NDCG@5``, ..."""
    count = float(sums[-1])
    return {name: float(sums[i]) / max(count, 1.0) for i, name in enumerate(METRIC_NAMES)}
