"""The losses of MQSA-TED: next-item softmax and transition-aware distillation (TED), each in
its paper form (the whole catalogue) and its catalogue form (shared sampled candidates).

Paper form: both losses are ``logsumexp over the catalogue`` (chunked,
``trainer.model.logpartition``) minus a cheap linear term, so neither ever holds a ``positions x N``
or ``heads x N`` matrix.

Catalogue form, recommendation loss at position p with target t_p and candidates c_1..c_K:
``logits_p = [q_p . E_t, q_p . E_c1 - logQ_1, ..., q_p . E_cK - logQ_K, 0]``, a candidate equal
to t_p (an accidental hit) gets -inf, and the loss is the cross-entropy with class 0. The last
logit is the zero padding row that the paper's softmax holds (known exactly, never sampled).

TED for head h (student ``s_h``, teacher ``p_hj = base_h + excess_hj``): ``CE_h = lse_h -
sum_j p_hj s_h.E_j / tau``. The cross term is exact in both forms (``teacher_cross_term``:
``base_h`` times ``s_h . sum_j E_j`` plus the successor edges). In the catalogue form ``lse_h``
keeps the successors' terms exactly and estimates the rest of the partition from the candidates
that are not successors of h, ``logsumexp(s_h . E_succ / tau, s_h . E_ck / tau - logQ_k)``; the
gradient of ``sum_j E_j`` (a dense update of every row) is estimated by
``sum_k E_ck exp(-logQ_k)``, which only touches candidate rows.
With every item as a candidate once (``log_q = 0``) the catalogue form equals the paper form.

Every loss sums over positions (= heads) with a weight per position (``weights [P]``:
``StepBatch.weights``, 1 but for the targets that are new since the base); every normaliser
may be a float or a device scalar tensor (the global sum of those weights, summed over ranks on
the device): nothing here reads a value back to the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from trainer.model.cpu_kernels import CpuKernel
from trainer.model.logpartition import weighted_log_partition
from trainer.model.transition_term import ScoreBonus


@dataclass
class LossTerms:
    """Per-rank loss contributions, already divided by the global normalisers.

    ``rec`` and ``kd`` are the two losses' shares from this rank (sum over ranks = the loss of the
    global batch); ``total = rec + lambda_kd * kd`` is what this rank back-propagates.
    """

    total: torch.Tensor
    rec: torch.Tensor
    kd: torch.Tensor


@dataclass
class TeacherRows:
    """The sparse teacher rows of a batch's heads, gathered on the device.

    Attributes:
        base: ``[H]`` each head's non-successor probability.
        head_index: ``[E]`` the head (index into the H heads) of each successor edge.
        excess: ``[E]`` the edge's teacher probability above ``base``.
        rows: ``[R, D]`` table rows the successors are among; succ_row: ``[E]`` each edge's
            successor's row in them. The edges come head after head (``head_index`` sorted).
        heads: ``[H]`` each head's item (the column that anchors its log-partition: the
            student of an item scores highest at the item itself).
    """

    base: torch.Tensor
    head_index: torch.Tensor
    excess: torch.Tensor
    rows: torch.Tensor
    succ_row: torch.Tensor
    heads: torch.Tensor


def full_softmax_rec_loss(
    queries: torch.Tensor,
    target_emb: torch.Tensor,
    items: torch.Tensor,
    norm: float | torch.Tensor,
    chunk: int,
    bf16: bool,
    term: tuple[ScoreBonus, torch.Tensor] | None = None,
    weights: torch.Tensor | None = None,
    kernel: CpuKernel | None = None,
) -> torch.Tensor:
    """Softmax cross-entropy over all N items, a weighted sum over positions divided by
    ``norm``.

    As in the reference, the softmax also holds the zero padding row (one more class whose logit
    is always 0): its training scores are against the whole ``[N + 1, D]`` table; only evaluation
    drops the padding column.

    Args:
        queries: ``[P, D]`` mixed query vectors at the real positions.
        target_emb: ``[P, D]`` the rows of the next items.
        items: ``[N, D]`` the whole item table.
        term: the transition term, ``(additions to the scores, each target's own [P])``
            (``trainer.model.transition_term.training_bonus``), or None.
        weights: ``[P]`` each position's weight (None: all 1).
        kernel: the run's CPU kernel (``trainer.model.cpu_kernels.select``) or None.
    """
    weights = _ones_if_none(weights, queries)  # [P]
    bias, target_bias = term if term is not None else (None, None)
    lse = weighted_log_partition(
        queries, items, weights / norm, chunk, bf16, True, bias, kernel=kernel
    )  # fmt: skip
    target = (queries * target_emb).sum(-1)  # [P]
    if target_bias is not None:
        target = target + target_bias
    return lse - (weights * target).sum() / norm


def _ones_if_none(weights: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor:
    """``weights``, or ``[R]`` ones for the rows of ``rows [R, D]`` (on its device)."""
    return torch.ones_like(rows[:, 0]) if weights is None else weights


def edge_scores(scaled: torch.Tensor, teacher: TeacherRows) -> torch.Tensor:
    """``[E]`` the student's logit of each successor edge: ``scaled_h(e) . E_succ(e)``."""
    succ_emb = teacher.rows.index_select(0, teacher.succ_row)  # [E, D]
    return (scaled.index_select(0, teacher.head_index) * succ_emb).sum(-1)


def teacher_cross_term(
    scaled: torch.Tensor,
    item_sum: torch.Tensor,
    teacher: TeacherRows,
    succ: torch.Tensor | None = None,
) -> torch.Tensor:
    """``sum_h sum_j p_hj * (scaled_h . E_j)`` for the sparse teacher, without an ``[H, N]`` term.

    ``p_hj = base_h + excess_hj`` (``excess`` on successors only), so the sum is
    ``sum_h base_h * (scaled_h . sum_j E_j) + sum_edges excess_e * succ_e``. Without the edges'
    logits the successor part is ``sum_h scaled_h . (sum_{e of h} excess_e E_succ(e))``: one
    weighted embedding bag per head, no ``[E, D]`` tensor (~1.5x cheaper on CPU, forward and
    backward, in a micro-benchmark of a Beauty batch's ~50,000 edges).

    Args:
        scaled: ``[H, D]`` student vectors divided by tau.
        item_sum: ``[D]`` ``sum_j E_j`` over all N items.
        succ: ``[E]`` the edges' student logits (``edge_scores``) where they are at hand.
    Returns:
        A scalar.
    """
    base = (teacher.base * (scaled @ item_sum)).sum()
    if succ is not None:
        return base + (teacher.excess * succ).sum()
    heads = torch.arange(scaled.shape[0], device=scaled.device)
    offsets = torch.searchsorted(teacher.head_index, heads)  # [H] each head's first edge
    bags = F.embedding_bag(
        teacher.succ_row, teacher.rows, offsets, mode="sum", per_sample_weights=teacher.excess
    )  # [H, D]
    return base + (scaled * bags).sum()


def logsumexp_with_edges(
    row_logits: torch.Tensor, edge_logits: torch.Tensor, edge_row: torch.Tensor
) -> torch.Tensor:
    """``[H]`` logsumexp of each row's logits ``[H, K]`` together with the extra logits of the
    edges that belong to it (``edge_logits [E]``, row ``edge_row [E]``)."""
    top = row_logits.detach().amax(1).scatter_reduce(0, edge_row, edge_logits.detach(), "amax")
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))  # [H]
    total = (row_logits - top.unsqueeze(1)).exp().sum(1)
    total = total.index_add(0, edge_row, (edge_logits - top.index_select(0, edge_row)).exp())
    return total.log() + top


def ted_loss(
    student: torch.Tensor,
    items: torch.Tensor,
    teacher: TeacherRows,
    tau: float,
    norm: float | torch.Tensor,
    chunk: int,
    bf16: bool,
    weights: torch.Tensor | None = None,
    kernel: CpuKernel | None = None,
) -> torch.Tensor:
    """Paper TED: cross-entropy(teacher, student) over all N items, a weighted sum over heads
    divided by ``norm``.

    With student logits ``s_hj = student_h . E_j / tau``, ``CE_h = lse_h - base_h * (student_h .
    sum_j E_j) / tau - sum_succ excess_hj * s_hj``: exact, and the zero-count mass costs one
    ``[D]`` sum.

    Args:
        student: ``[H, D]`` student vectors (dropout(E[head] * sqrt(d))).
        items: ``[N, D]`` the whole item table.
        weights: ``[H]`` each head's weight (None: all 1).
        kernel: the run's CPU kernel (``trainer.model.cpu_kernels.select``) or None.
    """
    scaled = student / tau  # [H, D]
    weights = _ones_if_none(weights, student)  # [H]
    lse = weighted_log_partition(
        scaled, items, weights / norm, chunk, bf16, anchors=teacher.heads, kernel=kernel
    )  # fmt: skip
    # the cross term is linear in each head's vector: weighting it weights the head
    cross = teacher_cross_term(scaled * weights[:, None], items.sum(0), teacher)
    return lse - cross / norm


def sampled_rec_loss(
    queries: torch.Tensor,
    targets: torch.Tensor,
    target_emb: torch.Tensor,
    cand_ids: torch.Tensor,
    cand_log_q: torch.Tensor,
    cand_emb: torch.Tensor,
    norm: float | torch.Tensor,
    term: tuple[ScoreBonus, torch.Tensor] | None = None,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sampled-softmax next-item loss, a weighted sum over positions divided by ``norm``.

    Args:
        queries: ``[P, D]`` query vectors at the real positions.
        targets: ``[P]`` target ids.
        target_emb: ``[P, D]`` target rows.
        cand_ids: ``[K]`` shared candidate ids; ``cand_log_q``: ``[K]`` their log-Q.
        cand_emb: ``[K, D]`` candidate rows.
        term: the transition term as ``(additions at (position, candidate index), each
            target's own addition [P])``, or None.
        weights: ``[P]`` each position's weight (None: all 1).
    """
    pos = (queries * target_emb).sum(-1, keepdim=True)  # [P, 1]
    neg = queries @ cand_emb.T - cand_log_q  # [P, K]
    if term is not None:
        bias, target_bias = term
        neg = neg.index_put((bias.rows, bias.items), bias.values, accumulate=True)
        pos = pos + target_bias.unsqueeze(1)
    neg = neg.masked_fill(cand_ids.unsqueeze(0) == targets.unsqueeze(1), float("-inf"))
    logits = torch.cat([pos, neg, torch.zeros_like(pos)], dim=1)  # [P, 1 + K + 1]
    per_position = torch.logsumexp(logits, dim=1) - pos.squeeze(1)  # [P]
    return (_ones_if_none(weights, queries) * per_position).sum() / norm


def sampled_ted_loss(
    student: torch.Tensor,
    teacher: TeacherRows,
    cand_log_q: torch.Tensor,
    cand_emb: torch.Tensor,
    hits: tuple[torch.Tensor, torch.Tensor],
    item_sum: torch.Tensor,
    tau: float,
    norm: float | torch.Tensor,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """TED cross-entropy with an estimated student log-partition, a weighted sum over heads
    divided by ``norm``.

    The partition of head h is its successors' terms, exactly (where the teacher puts its mass
    and where the student's mass concentrates), plus the candidates' estimate of every other
    item: ``Z_h = sum_{j in S_h} exp(s_hj) + sum_k exp(s_hk - logQ_k)`` over the candidates
    that are not successors of h (those are masked: ``hits``), unbiased for the rest.

    Args:
        student: ``[H, D]`` student vectors (dropout(E[head] * sqrt(d))).
        cand_log_q: ``[K]`` the candidates' log-Q; ``cand_emb``: ``[K, D]`` their rows.
        hits: ``(head [A], candidate [A])``: candidate k is a successor of head h.
        item_sum: ``[D]`` exact ``sum_j E_j`` (its own gradient, if any, is not used).
        weights: ``[H]`` each head's weight (None: all 1).
    """
    scaled = student / tau  # [H, D]
    cand = (scaled @ cand_emb.T - cand_log_q).index_put(hits, scaled.new_tensor(float("-inf")))
    succ = edge_scores(scaled, teacher)  # [E]
    lse = logsumexp_with_edges(cand, succ, teacher.head_index)  # [H]
    estimate = torch.exp(-cand_log_q) @ cand_emb  # [D]
    item_sum = item_sum.detach() + (estimate - estimate.detach())  # exact value, sampled grad
    weights = _ones_if_none(weights, student)  # [H]
    succ_weighted = succ * weights.index_select(0, teacher.head_index)  # [E]
    cross = teacher_cross_term(scaled * weights[:, None], item_sum, teacher, succ_weighted)
    return ((weights * lse).sum() - cross) / norm
