"""Catalogue-mode losses: the positives plus shared sampled candidates, never ``[P, N]``.

Recommendation loss at position p with target t_p and candidates c_1..c_K (``trainer.samplers``):
``logits_p = [q_p . E_t, q_p . E_c1 - logQ_1, ..., q_p . E_cK - logQ_K, 0]``, a candidate equal
to t_p (an accidental hit) gets -inf, and the loss is the cross-entropy with class 0. The positive
is not corrected, the negatives estimate the rest of the partition function, and the last logit
is the zero padding row that paper mode's softmax holds (known exactly, so never sampled).

TED for head h (student vector ``s_h``, teacher ``p_hj = base_h + excess_hj``):
``CE_h = lse_h - sum_j p_hj s_h.E_j / tau``. The cross term is exact (``teacher_cross_term``:
``base_h`` times ``s_h . sum_j E_j`` plus the successor edges); ``lse_h`` is estimated by
``logsumexp_k(s_h . E_ck / tau - logQ_k)``. The value of ``sum_j E_j`` is exact (the table keeps
it); its gradient, a dense update of every row, is replaced by the estimate
``sum_k E_ck exp(-logQ_k)``, which only touches the candidate rows (unbiased for the uniform,
popularity and mixed samplers; in-batch candidates only reach the batch's targets).

With every item as a candidate once (``log_q = 0``) both losses equal paper mode's exactly.
Sizes: P positions, H heads, K candidates, E_h successor edges of the heads.
"""

from __future__ import annotations

import torch

from trainer.losses import teacher_cross_term
from trainer.samplers import Candidates
from trainer.teacher import SparseTeacher


def sampled_rec_loss(
    queries: torch.Tensor,
    targets: torch.Tensor,
    target_emb: torch.Tensor,
    cands: Candidates,
    cand_emb: torch.Tensor,
    norm: float,
) -> torch.Tensor:
    """Sampled-softmax next-item loss, summed over positions and divided by ``norm``.

    Args:
        queries: ``[P, D]`` query vectors at the real positions.
        targets: ``[P]`` target ids.
        target_emb: ``[P, D]`` target rows.
        cands: the shared candidates (``[K]`` ids and log-Q).
        cand_emb: ``[K, D]`` candidate rows.
    """
    pos = (queries * target_emb).sum(-1, keepdim=True)  # [P, 1]
    neg = queries @ cand_emb.T - cands.log_q  # [P, K]
    neg = neg.masked_fill(cands.ids.unsqueeze(0) == targets.unsqueeze(1), float("-inf"))
    logits = torch.cat([pos, neg, pos.new_zeros(pos.shape)], dim=1)  # [P, 1 + K + 1]
    return (torch.logsumexp(logits, dim=1) - pos.squeeze(1)).sum() / norm


def sampled_ted_loss(
    student: torch.Tensor,
    heads: torch.Tensor,
    teacher: SparseTeacher,
    edges: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    succ_emb: torch.Tensor,
    cands: Candidates,
    cand_emb: torch.Tensor,
    item_sum: torch.Tensor,
    tau: float,
    norm: float,
) -> torch.Tensor:
    """TED cross-entropy with an estimated student log-partition, summed over heads / ``norm``.

    Args:
        student: ``[H, D]`` student vectors (dropout(E[head] * sqrt(d))).
        heads: ``[H]`` head ids.
        edges: ``teacher.rows(heads)``: ``(head_index [E_h], successor [E_h], excess [E_h])``.
        succ_emb: ``[E_h, D]`` rows of the successors.
        cand_emb: ``[K, D]`` candidate rows.
        item_sum: ``[D]`` exact ``sum_j E_j`` (its own gradient, if any, is not used).
    """
    scaled = student / tau  # [H, D]
    lse = torch.logsumexp(scaled @ cand_emb.T - cands.log_q, dim=1)  # [H]
    estimate = torch.exp(-cands.log_q) @ cand_emb  # [D]
    item_sum = item_sum.detach() + (estimate - estimate.detach())  # exact value, sampled grad
    head_index, _, excess = edges
    cross = teacher_cross_term(scaled, teacher.base[heads], item_sum, head_index, excess, succ_emb)
    return (lse.sum() - cross) / norm
