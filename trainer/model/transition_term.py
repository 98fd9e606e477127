"""The transition term (``model.transition_term``): a directed memory of item-to-next patterns.

The score of item ``j`` for a sequence whose last item is ``i`` gets ``w * f(G[i, j])`` on top
of ``query . E_j``, ``f(c) = log(1 + max(c - 1, 0))`` (``trainer.data.teacher.transition_feature``:
a transition seen once counts 0): ``G`` is the train transition graph (``transitions/``, the TED
teacher's counts, zero for non-successors) and ``w`` is a learned scalar
(``MQSAEncoder.transition_weight``). An embedding model smooths rare transitions away and a
dot product is symmetric in spirit; the counts remember every directed ``i -> j`` seen, which is
what a last-item counter gets right on strongly sequential logs (docs/results.md, issue 14).

Only the successors of the last item change, so the term is a list of
``scores[rows[e], items[e]] += values[e]`` additions (:class:`ScoreBonus`), never a dense
``[rows, N]`` matrix: the full softmax adds them inside its chunks
(``trainer.model.logpartition``), the sampled softmax at the candidates that are successors,
evaluation inside its count blocks, ``recommend`` to the searched items.

Training fits ``w`` for likelihood, while the metrics (and users) rank: evaluation also ranks
at 2, 4 and 8 times ``w`` and keeps the multiple with the best valid NDCG@20
(``trainer.evaluation.evaluate.TRANSITION_SCALES``; ``MQSAEncoder.transition_scale``, which
``recommend`` applies too). On a log that mixes item-to-next steps with taste steps the likelihood
keeps ``w`` low to leave probability to the taste items, where the ranking is better served by
putting the known successors first.

No target leakage: at a training position ``p`` (input item ``i``, target ``t``) the transition
``i -> t`` is itself one of the counts of ``G[i, t]``, so that edge's feature is
``f(G[i, t] - 1)`` (``SparseTeacher.log_count_others``): the weight learns how well the
OTHER transitions predict, as at evaluation, where the target's transition is never in ``G``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mqsa_core.collectives import to_device
from trainer.data.teacher import SparseTeacher, csr_edges


@dataclass
class ScoreBonus:
    """Sparse additions to a ``[R, N]`` score matrix: ``scores[rows[e], items[e]] +=
    values[e]`` (pairs distinct).

    Attributes:
        rows: ``[E]`` int64 row of each addition.
        items: ``[E]`` int64 item (column) of each addition.
        values: ``[E]`` float32 (differentiable in training: ``w * feature``).
    """

    rows: torch.Tensor
    items: torch.Tensor
    values: torch.Tensor


def training_bonus(
    weight: torch.Tensor,
    teacher: SparseTeacher,
    edge_head: torch.Tensor,
    edge: torch.Tensor,
    edge_succ: torch.Tensor,
    edge_is_target: torch.Tensor,
    num_positions: int,
) -> tuple[ScoreBonus, torch.Tensor]:
    """The term at a batch's positions, on the device.

    Args:
        weight: ``[1]`` the learned ``w``.
        teacher: the graph's features on the device.
        edge_head, edge, edge_succ, edge_is_target: ``[E]`` per successor edge of a position's
            input item: its position, its index in the graph, its successor id, whether that
            successor is the position's target (``trainer.data.batches.StepBatch``).
        num_positions: ``P``.
    Returns:
        ``(bonus, target_bonus [P])``: the additions to the positions' scores and each
        target's own addition (0 when the target is not a successor).
    """
    feature = torch.where(
        edge_is_target,
        teacher.log_count_others.index_select(0, edge),
        teacher.log_count.index_select(0, edge),
    )  # [E]
    values = weight * feature
    bonus = ScoreBonus(edge_head, edge_succ, values)
    return bonus, target_bonus(values, edge_head, edge_is_target, num_positions)


def target_bonus(
    values: torch.Tensor, edge_head: torch.Tensor, is_target: torch.Tensor, num_rows: int
) -> torch.Tensor:
    """``[num_rows]`` each row's addition at its own target: the sum of ``values [E]`` over the
    edges whose successor is the row's target (at most one per row), 0 elsewhere."""
    return values.new_zeros(num_rows).index_add(0, edge_head, values * is_target.to(values.dtype))


def last_item_bonus(
    weight: torch.Tensor, graph: SparseTeacher, last: torch.Tensor, targets: torch.Tensor
) -> tuple[ScoreBonus, torch.Tensor]:
    """The term for evaluation: ``(bonus, target_bonus [B])`` for host ``last [B]`` (each
    user's newest input item) and ``targets [B]``, on ``weight``'s device (the graph is host
    side; nothing here reads the device)."""
    device = weight.device
    real = last < graph.num_items  # a user without input items has only padding
    row, edge = csr_edges(graph.indptr, torch.where(real, last, 0))  # host
    keep = real[row]
    row, edge = row[keep], edge[keep]
    items = graph.dst[edge]
    is_target = items == targets[row]
    values = weight * to_device(graph.log_count[edge], device)  # [E]
    rows = to_device(row, device)
    bonus = ScoreBonus(rows, to_device(items, device), values)
    return bonus, target_bonus(values, rows, to_device(is_target, device), last.shape[0])
