"""Paper-mode losses: full-softmax next-item loss and transition-aware distillation (TED).

Both are written as ``logsumexp over the catalogue`` (chunked, see ``logpartition``) minus a
cheap linear term, so neither ever holds a ``positions x N`` or ``heads x N`` matrix.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trainer.logpartition import weighted_log_partition
from trainer.teacher import SparseTeacher


@dataclass
class LossTerms:
    """Per-rank loss contributions, already divided by the global normalisers.

    ``rec`` and ``kd`` are the two losses' shares from this rank (sum over ranks = the loss of the
    global batch); ``total = rec + lambda_kd * kd`` is what this rank back-propagates.
    """

    total: torch.Tensor
    rec: torch.Tensor
    kd: torch.Tensor


def full_softmax_rec_loss(
    queries: torch.Tensor,
    targets: torch.Tensor,
    items: torch.Tensor,
    norm: float,
    chunk: int,
    bf16: bool,
) -> torch.Tensor:
    """Softmax cross-entropy over all N items, summed over positions and divided by ``norm``.

    As in the reference, the softmax also holds the zero padding row (one more class whose logit
    is always 0): its training scores are against the whole ``[N + 1, D]`` table; only evaluation
    drops the padding column.

    Args:
        queries: ``[P, D]`` mixed query vectors at the real positions.
        targets: ``[P]`` next-item ids.
        items: ``[N, D]`` the whole item table.
    """
    weights = torch.full((queries.shape[0],), 1.0 / norm)
    lse = weighted_log_partition(queries, items, weights, chunk, bf16, zero_column=True)
    target_logits = (queries * items[targets]).sum(-1)  # [P]
    return lse - target_logits.sum() / norm


def ted_loss(
    student: torch.Tensor,
    heads: torch.Tensor,
    items: torch.Tensor,
    teacher: SparseTeacher,
    tau: float,
    norm: float,
    chunk: int,
    bf16: bool,
) -> torch.Tensor:
    """Cross-entropy(teacher, student) summed over heads and divided by ``norm``.

    With student logits ``s_hj = student_h . E_j / tau`` and teacher ``p_ij = base_i + excess_ij``
    (``excess`` only on successors), ``CE_h = lse_h - base_i * (student_h . sum_j E_j) / tau
    - sum_succ excess_ij * s_hj``: exact, and the zero-count mass costs one ``[D]`` sum.

    Args:
        student: ``[H, D]`` student vectors (dropout(E[head] * sqrt(d))).
        heads: ``[H]`` head item ids.
        items: ``[N, D]`` the whole item table.
    """
    logits_scale = student / tau  # [H, D]
    weights = torch.full((student.shape[0],), 1.0 / norm)
    lse = weighted_log_partition(logits_scale, items, weights, chunk, bf16)
    head_index, succ, excess = teacher.rows(heads)
    cross = teacher_cross_term(
        logits_scale, teacher.base[heads], items.sum(0), head_index, excess, items[succ]
    )
    return lse - cross / norm


def teacher_cross_term(
    scaled: torch.Tensor,
    base: torch.Tensor,
    item_sum: torch.Tensor,
    head_index: torch.Tensor,
    excess: torch.Tensor,
    succ_emb: torch.Tensor,
) -> torch.Tensor:
    """``sum_h sum_j p_hj * (scaled_h . E_j)`` for the sparse teacher, without an ``[H, N]`` term.

    ``p_hj = base_h + excess_hj`` (``excess`` on successors only), so the sum is
    ``sum_h base_h * (scaled_h . sum_j E_j) + sum_edges excess_e * (scaled_h(e) . E_succ(e))``.

    Args:
        scaled: ``[H, D]`` student vectors divided by tau.
        base: ``[H]`` the teacher's non-successor probability of each head.
        item_sum: ``[D]`` ``sum_j E_j`` over all N items.
        head_index: ``[E_h]`` head of each successor edge (index into the H heads).
        excess: ``[E_h]`` the edge's teacher probability above ``base``.
        succ_emb: ``[E_h, D]`` the successor rows.
    Returns:
        A scalar.
    """
    uniform_part = base * (scaled @ item_sum)  # [H]
    succ_part = excess * (scaled[head_index] * succ_emb).sum(-1)  # [E_h]
    return uniform_part.sum() + succ_part.sum()


def paper_losses(
    queries: torch.Tensor,
    targets: torch.Tensor,
    student: torch.Tensor,
    heads: torch.Tensor,
    items: torch.Tensor,
    teacher: SparseTeacher | None,
    tau: float,
    lambda_kd: float,
    rec_norm: float,
    kd_norm: float,
    chunk: int = 4096,
    bf16: bool = False,
) -> LossTerms:
    """Recommendation loss plus ``lambda_kd`` times TED (skipped when ``lambda_kd == 0``)."""
    rec = full_softmax_rec_loss(queries, targets, items, rec_norm, chunk, bf16)
    if lambda_kd == 0.0 or teacher is None:
        kd = rec.new_zeros(())
        return LossTerms(total=rec, rec=rec.detach(), kd=kd)
    kd = ted_loss(student, heads, items, teacher, tau, kd_norm, chunk, bf16)
    return LossTerms(total=rec + lambda_kd * kd, rec=rec.detach(), kd=kd.detach())
