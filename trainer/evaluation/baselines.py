"""Non-learned baselines under the same full-ranking protocol as the model.

- ``most_popular``: items ranked by their count in the (cut) train sequences.
- ``last_item``: items ranked by how often they followed the user's last item in the train
  transition graph, ties and unseen successors falling back to popularity.

    python -m trainer.evaluation.baselines CONFIG [overrides]
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch

from mqsa_core.config import DataConfig, TrainConfig, load_config
from trainer.data.sequences import Sequences, load_sequences, load_transitions
from trainer.data.teacher import csr_edges, csr_offsets
from trainer.evaluation.evaluate import SPLITS, EvalSplit, eval_split
from trainer.evaluation.metrics import METRIC_NAMES, metric_sums, metrics_from_sums


def rank_by_scores(scores: torch.Tensor, split: EvalSplit) -> torch.Tensor:
    """1-based rank of ``split.targets`` in ``scores`` ``[B, N]`` under the split's mask (a
    masked target is a miss: rank N + 1); ``scores`` is modified in place."""
    target_scores = scores.gather(1, split.targets.unsqueeze(1))  # [B, 1]
    scores.index_put_(split.excluded(), scores.new_tensor(float("-inf")))
    ranks = (scores > target_scores).sum(1) + 1
    return torch.where(split.target_masked, scores.shape[1] + 1, ranks)


def popularity(seqs: Sequences) -> torch.Tensor:
    """``[N]`` float64 train counts of each item."""
    real = seqs.train[seqs.train != seqs.num_items]
    return torch.bincount(real, minlength=seqs.num_items).to(torch.float64)


def evaluate_baseline(
    seqs: Sequences, scorer, protocol: str = "paper", batch_size: int = 2048
) -> dict[str, dict[str, float]]:
    """Valid/test metrics of ``scorer(inputs [B, M]) -> scores [B, N]`` (float64), under the
    same protocol as the model (``trainer.evaluation.evaluate``)."""
    sums = {s: torch.zeros(len(METRIC_NAMES) + 1, dtype=torch.float64) for s in SPLITS}
    for users in torch.arange(seqs.num_users).split(batch_size):
        batch = seqs.select(users)
        for name in SPLITS:
            split = eval_split(batch, name, protocol)
            sums[name] += metric_sums(rank_by_scores(scorer(split.inputs), split))
    return {split: metrics_from_sums(s) for split, s in sums.items()}


def baseline_metrics(
    data: DataConfig, train: TrainConfig
) -> dict[str, dict[str, dict[str, float]]]:
    """Both baselines on the prepared data ``data.dir``, under ``train.eval_protocol``."""
    protocol = train.eval_protocol
    seqs = load_sequences(data, train.new_target_weight)
    pop = popularity(seqs)
    tie_break = pop / (pop.max() + 1.0)  # in [0, 1): orders items with equal counts
    src, dst, count = load_transitions(data.dir)
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
        "most_popular": evaluate_baseline(seqs, most_popular, protocol),
        "last_item": evaluate_baseline(seqs, last_item, protocol),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    print(json.dumps(baseline_metrics(cfg.data, cfg.train), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
