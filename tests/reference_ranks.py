"""The ranks of the evaluation targets computed in one process, all at once: the oracle the tests
hold the distributed evaluation (``trainer.evaluation.evaluate``) and the export against."""

from __future__ import annotations

import torch

from mqsa_core.collectives import to_device
from trainer.evaluation.evaluate import EvalSplit, count_higher


def target_ranks(
    queries: torch.Tensor, items: torch.Tensor, split: EvalSplit, item_chunk: int = 1 << 16
) -> torch.Tensor:
    """1-based rank of each target among all ``items`` ``[N, D]`` (one process, all on the
    queries' device); a masked target's rank is ``N + 1`` (a miss)."""
    device = queries.device
    targets = to_device(split.targets, device)
    target_scores = (queries * items[targets]).sum(-1, keepdim=True)
    rows, excluded = (to_device(t, device) for t in split.excluded())
    counts = count_higher(queries, items, target_scores, rows, excluded, 0, item_chunk)
    return torch.where(to_device(split.target_masked, device), items.shape[0] + 1, counts + 1)
