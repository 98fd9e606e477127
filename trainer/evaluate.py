"""Full-ranking evaluation (METHOD.md, "Evaluation"): every user's target ranked among all items.

The rank of the target is ``1 + #(unmasked items scoring strictly higher)``; counting it needs
no sort and works item chunk by item chunk, so no ``users x N`` matrix is held when the catalogue
is large. Users are split across ranks and the metric sums are all-reduced.
"""

from __future__ import annotations

import torch
from tqdm import tqdm

from embeddings.base import ItemTable
from trainer.data import Sequences, inputs_for_test_split, trim
from trainer.distributed import all_reduce_sum
from trainer.metrics import METRIC_NAMES, metric_sums, metrics_from_sums
from trainer.model import MQSAEncoder


def count_higher(
    queries: torch.Tensor,
    items: torch.Tensor,
    targets: torch.Tensor,
    excluded: torch.Tensor,
    item_chunk: int,
) -> torch.Tensor:
    """1-based rank of each target among the items not in ``excluded``.

    Args:
        queries: ``[B, D]`` user query vectors.
        items: ``[N, D]`` the item table.
        targets: ``[B]`` target ids.
        excluded: ``[B, H]`` ids never ranked (history; id N = padding, ignored).
        item_chunk: items scored per matrix product (``[B, item_chunk]`` at a time).
    Returns:
        ``[B]`` int64 ranks.
    """
    target_scores = (queries * items[targets]).sum(-1, keepdim=True)  # [B, 1]
    excluded = torch.cat([excluded, targets.unsqueeze(1)], dim=1)  # the target is not its own rival
    higher = torch.zeros(queries.shape[0], dtype=torch.int64)
    width = min(item_chunk, items.shape[0])
    buffer = queries.new_empty(queries.shape[0], width + 1)  # last column: sink for masked ids
    for start in range(0, items.shape[0], item_chunk):
        chunk = items[start : start + item_chunk]  # [C, D]
        scores = buffer[:, : chunk.shape[0] + 1]
        torch.mm(queries, chunk.T, out=scores[:, :-1])  # [B, C]
        local = excluded - start
        local = torch.where((local >= 0) & (local < chunk.shape[0]), local, chunk.shape[0])
        scores.scatter_(1, local, float("-inf"))
        higher += (scores[:, :-1] > target_scores).sum(1)
    return higher + 1


@torch.no_grad()
def evaluate(
    encoder: MQSAEncoder,
    table: ItemTable,
    seqs: Sequences,
    users: torch.Tensor,
    batch_size: int = 1024,
    item_chunk: int = 1 << 20,
    progress: bool = False,
) -> dict[str, dict[str, float]]:
    """Validation and test metrics over ``users`` (this rank's share), summed over all ranks.

    Validation: input = cut train sequence, masked = that history. Test: input = (train +
    validation item)[-M:], masked = the history plus the validation item.
    """
    was_training = encoder.training
    encoder.eval()
    pad = seqs.num_items
    items = table.all_items().detach()
    sums = {"valid": torch.zeros(len(METRIC_NAMES) + 1, dtype=torch.float64)}
    sums["test"] = sums["valid"].clone()
    batches = users.split(batch_size)
    for batch_users in tqdm(batches, desc="eval", disable=not progress, leave=False):
        history = seqs.train[batch_users]  # [B, M]
        valid_target = seqs.valid[batch_users]
        with_valid = torch.cat([history, valid_target[:, None]], dim=1)  # [B, M + 1]
        splits = (
            ("valid", history, history, valid_target),
            ("test", inputs_for_test_split(seqs, batch_users), with_valid, seqs.test[batch_users]),
        )
        for split, inputs, excluded, target in splits:
            inputs = trim(inputs, pad)
            mask = inputs != pad
            queries = encoder(table.lookup(inputs), mask)[:, -1]  # [B, D]: the newest slot
            ranks = count_higher(queries, items, target, excluded, item_chunk)
            sums[split] += metric_sums(ranks)
    encoder.train(was_training)
    return {split: metrics_from_sums(all_reduce_sum(s)) for split, s in sums.items()}
