"""Non-learned baselines under the same full-ranking protocol as the model.

- ``most_popular``: items ranked by their count in the (cut) train sequences.
- ``last_item``: items ranked by how often they followed the user's last item in the train
  transition graph, ties and unseen successors falling back to popularity.

    python -m trainer.baselines CONFIG [overrides]
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch

from trainer.config import load_config
from trainer.data import Sequences, load_sequences, load_transitions
from trainer.metrics import METRIC_NAMES, metric_sums, metrics_from_sums
from trainer.teacher import csr_edges, csr_offsets


def rank_by_scores(
    scores: torch.Tensor, targets: torch.Tensor, excluded: torch.Tensor
) -> torch.Tensor:
    """1-based rank of ``targets`` in ``scores`` ``[B, N]`` with ``excluded`` ``[B, H]`` ids
    (id N = padding) removed; ``scores`` is modified in place."""
    target_scores = scores.gather(1, targets.unsqueeze(1))  # [B, 1]
    padded = torch.cat([scores, scores.new_zeros(scores.shape[0], 1)], dim=1)
    padded.scatter_(1, torch.cat([excluded, targets.unsqueeze(1)], dim=1), float("-inf"))
    return (padded[:, :-1] > target_scores).sum(1) + 1


def popularity(seqs: Sequences) -> torch.Tensor:
    """``[N]`` float64 train counts of each item."""
    real = seqs.train[seqs.train != seqs.num_items]
    return torch.bincount(real, minlength=seqs.num_items).to(torch.float64)


def evaluate_baseline(
    seqs: Sequences, scorer, batch_size: int = 2048
) -> dict[str, dict[str, float]]:
    """Valid/test metrics of ``scorer(history [B, M]) -> scores [B, N]`` (float64)."""
    sums = {s: torch.zeros(len(METRIC_NAMES) + 1, dtype=torch.float64) for s in ("valid", "test")}
    for users in torch.arange(seqs.num_users).split(batch_size):
        batch = seqs.select(users)
        history, valid = batch.train, batch.valid
        sums["valid"] += metric_sums(rank_by_scores(scorer(history), valid, history))
        excluded = torch.cat([history, valid[:, None]], dim=1)
        test_ranks = rank_by_scores(scorer(batch.test_inputs()), batch.test, excluded)
        sums["test"] += metric_sums(test_ranks)
    return {split: metrics_from_sums(s) for split, s in sums.items()}


def baseline_metrics(cfg) -> dict[str, dict[str, dict[str, float]]]:
    """Both baselines on the prepared data of ``cfg``."""
    seqs = load_sequences(cfg)
    pop = popularity(seqs)
    tie_break = pop / (pop.max() + 1.0)  # in [0, 1): orders items with equal counts
    src, dst, count = load_transitions(cfg.data.dir)
    order = np.lexsort((dst, src))
    indptr = torch.from_numpy(csr_offsets(src[order], seqs.num_items))
    succ = torch.from_numpy(dst[order])
    succ_count = torch.from_numpy(count[order]).to(torch.float64)

    def most_popular(history: torch.Tensor) -> torch.Tensor:
        return pop.expand(history.shape[0], -1).clone()

    def last_item(history: torch.Tensor) -> torch.Tensor:
        row_index, edge = csr_edges(indptr, history[:, -1])
        scores = tie_break.expand(history.shape[0], -1).clone()
        scores[row_index, succ[edge]] += succ_count[edge]
        return scores

    return {
        "most_popular": evaluate_baseline(seqs, most_popular),
        "last_item": evaluate_baseline(seqs, last_item),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    print(json.dumps(baseline_metrics(load_config(args.config, args.overrides)), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
