"""Full-ranking evaluation (METHOD.md, "Evaluation"): every user's target ranked among all items.

The rank of the target is ``1 + #(unmasked items scoring strictly higher)``. Counting needs no
sort and adds up over item chunks, so the work is split both ways across ranks: each rank
encodes its share of the users, the queries of a batch are all-gathered, each rank counts
against the item rows it holds (its shard of a TorchRec table, or an even slice of a dense
one), and the counts are all-reduced. No ``users x N`` matrix exists; the metrics are exact
sums, identical to a single process on the same weights.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from tqdm import tqdm

from embeddings.base import ItemTable
from trainer.data import trim
from trainer.distributed import all_reduce_sum
from trainer.metrics import METRIC_NAMES, metric_sums, metrics_from_sums
from trainer.model import MQSAEncoder
from trainer.user_source import UserSource


def count_higher(
    queries: torch.Tensor,
    items: torch.Tensor,
    target_scores: torch.Tensor,
    excluded: torch.Tensor,
    first_id: int = 0,
    item_chunk: int = 1 << 16,
) -> torch.Tensor:
    """How many of the rows ``items`` (global ids ``first_id..``) score above each target.

    Args:
        queries: ``[B, D]`` user query vectors.
        items: ``[C, D]`` item rows with global ids ``first_id .. first_id + C - 1``.
        target_scores: ``[B, 1]`` each user's target score.
        excluded: ``[B, H]`` global ids never counted (history, the target; padding ignored).
        item_chunk: rows scored per matrix product (``[B, item_chunk]`` at a time).
    Returns:
        ``[B]`` int64 counts.
    """
    higher = torch.zeros(queries.shape[0], dtype=torch.int64)
    width = max(1, min(item_chunk, items.shape[0]))
    buffer = queries.new_empty(queries.shape[0] * width)
    rows = torch.arange(queries.shape[0]).unsqueeze(1).expand_as(excluded)  # [B, H]
    for start in range(0, items.shape[0], width):
        chunk = items[start : start + width]  # [C, D]
        scores = buffer[: queries.shape[0] * chunk.shape[0]].view(queries.shape[0], -1)
        torch.mm(queries, chunk.T, out=scores)  # [B, C]
        local = excluded - (first_id + start)
        inside = (local >= 0) & (local < chunk.shape[0])
        scores[rows[inside], local[inside]] = float("-inf")
        higher += (scores > target_scores).sum(1)
    return higher


def target_ranks(
    queries: torch.Tensor,
    items: torch.Tensor,
    targets: torch.Tensor,
    excluded: torch.Tensor,
    item_chunk: int = 1 << 16,
) -> torch.Tensor:
    """1-based rank of each target among all ``items`` ``[N, D]`` not in ``excluded``."""
    target_scores = (queries * items[targets]).sum(-1, keepdim=True)
    excluded = torch.cat([excluded, targets.unsqueeze(1)], dim=1)
    return count_higher(queries, items, target_scores, excluded, 0, item_chunk) + 1


def _all_gather_rows(local: torch.Tensor, size: int) -> torch.Tensor:
    """Concatenate every rank's ``[b_r, ...]`` rows (``b_r <= size``) in rank order."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return local
    padded = local.new_zeros(size, *local.shape[1:])
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, padded)
    counts = [torch.zeros(1, dtype=torch.int64) for _ in parts]
    dist.all_gather(counts, torch.tensor([local.shape[0]]))
    return torch.cat([p[: int(c)] for p, c in zip(parts, counts, strict=True)])


@torch.no_grad()
def evaluate(
    encoder: MQSAEncoder,
    table: ItemTable,
    users: UserSource,
    batch_size: int = 1024,
    progress: bool = False,
) -> dict[str, dict[str, float]]:
    """Validation and test metrics of all users; every rank calls with its ``users``.

    Validation: input = cut train sequence, masked = that history. Test: input = (train +
    validation item)[-M:], masked = the history plus the validation item.
    """
    was_training = encoder.training
    encoder.eval()
    pad = users.num_items
    first_id, items = table.local_rows()  # [C, D], ids first_id..first_id + C - 1
    num_batches, batches = users.eval_batches(batch_size)  # num_batches: the same on every rank
    sums = {s: torch.zeros(len(METRIC_NAMES) + 1, dtype=torch.float64) for s in ("valid", "test")}
    for batch in tqdm(batches, total=num_batches, desc="eval", disable=not progress, leave=False):
        history = batch.train  # [B, M]
        splits = (
            ("valid", history, history, batch.valid),
            ("test", batch.test_inputs(), torch.cat([history, batch.valid[:, None]], dim=1),
             batch.test),
        )  # fmt: skip
        for split, inputs, excluded, targets in splits:
            inputs = trim(inputs, pad) if inputs.shape[0] else inputs
            emb = table.lookup_many({"inputs": inputs, "targets": targets})  # collective
            queries = encoder(emb["inputs"], inputs != pad, last_only=True)[:, -1]  # [B, D]
            target_scores = (queries * emb["targets"]).sum(-1, keepdim=True)  # [B, 1]
            excluded = torch.cat([excluded, targets.unsqueeze(1)], dim=1)  # [B, M + 1(+1)]
            all_queries, all_scores, all_excluded = (
                _all_gather_rows(t, batch_size) for t in (queries, target_scores, excluded)
            )
            counts = count_higher(all_queries, items, all_scores, all_excluded, first_id)
            counts = all_reduce_sum(counts).to(torch.int64)
            mine = slice(*_my_rows(queries.shape[0], batch_size))
            sums[split] += metric_sums(counts[mine] + 1)
    encoder.train(was_training)
    return {split: metrics_from_sums(all_reduce_sum(s)) for split, s in sums.items()}


def _my_rows(local_count: int, size: int) -> tuple[int, int]:
    """Where this rank's rows sit in the gathered batch: ``(start, stop)``."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return 0, local_count
    counts = [torch.zeros(1, dtype=torch.int64) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, torch.tensor([local_count]))
    start = int(sum(int(c) for c in counts[: dist.get_rank()]))
    return start, start + local_count
