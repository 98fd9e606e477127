"""Catalogue-wide log-partition with its gradient, chunked so no ``rows x N`` matrix is kept.

Both paper-mode losses need ``logsumexp_j(q_r . E_j)`` over all N items for every row ``r``
(positions for the recommendation loss, distillation heads for TED, each pre-scaled). Autograd
would keep the whole ``[R, N]`` score matrix for the backward pass; here the forward pass walks
the rows in chunks and, since the result only feeds a scalar loss, computes the gradients on the
way (3 matrix products per chunk, the same work as autograd) and keeps only ``[R, D]`` and
``[N, D]`` gradient buffers. Between the products, the softmax is torch's fused row-wise kernel
(max, exp-sum and normalise while a row is in cache): one pass over the chunk's scores instead
of one per elementwise op, and the row weights are applied to the ``[C, D]`` sides instead.

The ``[chunk, N]`` score buffers are reused between calls: on this class of machine a fresh
multi-megabyte allocation is paid for in page faults on every step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trainer.transition_term import ScoreBonus

_WORKSPACE: dict[tuple[str, torch.dtype, torch.device], torch.Tensor] = {}


def _buffer(name: str, size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A reusable flat ``[size]`` scratch tensor on ``device`` (grown when needed, never shrunk;
    one per name, dtype and device)."""
    key = (name, dtype, device)
    buf = _WORKSPACE.get(key)
    if buf is None or buf.numel() < size:
        buf = torch.empty(size, dtype=dtype, device=device)
        _WORKSPACE[key] = buf
    return buf[:size]


class _WeightedLogPartition(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx, queries, table, row_weights, bias_values, bias_rows, bias_items,
        chunk: int, bf16: bool, zero_column: bool,
    ):  # fmt: skip
        needs_grad = any(ctx.needs_input_grad[:4])
        mm_dtype = torch.bfloat16 if bf16 else torch.float32
        table_mm = table.detach().to(mm_dtype)  # [N, D]
        table_t = table_mm.T.contiguous()  # [D, N]
        num_items, device = table.shape[0], queries.device
        total = torch.zeros((), dtype=torch.float64, device=device)
        grad_q = torch.empty_like(queries, dtype=torch.float32) if needs_grad else None
        grad_t = torch.zeros_like(table, dtype=torch.float32) if needs_grad else None
        has_bias = bias_values is not None
        grad_bias = torch.zeros_like(bias_values) if has_bias and needs_grad else None
        for start in range(0, queries.shape[0], chunk):
            q = queries[start : start + chunk].detach()  # [C, D]
            w = row_weights[start : start + chunk]  # [C]
            rows = q.shape[0]
            size = rows * num_items  # one spare element after the [C, N] block
            flat_scores = _buffer("scores", size + 1, mm_dtype, device)
            scores = flat_scores[:size].view(rows, num_items)
            torch.mm(q.to(mm_dtype), table_t, out=scores)  # [C, N]
            if has_bias:  # this chunk's additions; the other chunks' go to the spare element
                local = bias_rows - start
                inside = (local >= 0) & (local < rows)
                flat_index = torch.where(inside, local * num_items + bias_items, size)  # [E]
                flat_scores.index_add_(0, flat_index, bias_values.detach().to(mm_dtype))
            flat_probs = _buffer("probs", size + 1, mm_dtype, device)
            probs = flat_probs[:size].view(rows, num_items)
            # one fused row-wise pass (max, exp-sum, normalise; float32 inside for bf16)
            torch.ops.aten._softmax.out(scores, 1, False, out=probs)  # [C, N]
            # logsumexp = max score - log(largest probability): that probability is
            # exp(0) / sum >= 1 / N, so its log is exact to the dtype's rounding
            lse = scores.amax(dim=1).float() - probs.amax(dim=1).float().log()  # [C]
            if zero_column:  # one more logit 0 (its row is zero: it adds nothing to grads)
                w = w * torch.sigmoid(lse)  # the N items' share of the partition
                lse = F.softplus(lse)  # log(exp(lse) + 1)
            total += (row_weights[start : start + chunk] * lse).sum().double()
            if needs_grad:  # d/dq = w * softmax . E, d/dE = softmax^T . (w * q)
                grad_q[start : start + rows] = torch.mm(probs, table_mm).float() * w[:, None]
                grad_t += torch.mm(probs.T, (q * w[:, None]).to(mm_dtype)).float()
                if has_bias:  # d/d(bias value) = w * softmax at its pair
                    row_w = w.index_select(0, local.clamp(0, rows - 1))
                    picked = flat_probs.index_select(0, flat_index).float() * row_w
                    grad_bias += torch.where(inside, picked, torch.zeros_like(picked))
        ctx.save_for_backward(grad_q, grad_t, grad_bias)
        return total.to(queries.dtype)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        grad_q, grad_t, grad_bias = ctx.saved_tensors
        grad_bias = grad_bias * grad_out if grad_bias is not None else None
        return grad_q * grad_out, grad_t * grad_out, None, grad_bias, None, None, None, None, None


def weighted_log_partition(
    queries: torch.Tensor,
    table: torch.Tensor,
    row_weights: torch.Tensor,
    chunk: int = 4096,
    bf16: bool = False,
    zero_column: bool = False,
    bias: ScoreBonus | None = None,
) -> torch.Tensor:
    """``sum_r row_weights[r] * logsumexp_j(queries[r] . table[j] + bias[r, j])`` with exact
    gradients.

    Args:
        queries: ``[R, D]`` float32 (differentiable).
        table: ``[N, D]`` float32 (differentiable).
        row_weights: ``[R]`` constants.
        chunk: rows per block of the ``[chunk, N]`` score matrix.
        bf16: run the three matrix products in bfloat16 (softmax and sums stay float32).
        zero_column: score one more row that is all zeros (logit 0 for every query), like the
            padding row the reference keeps in its score matrix.
        bias: sparse additions to the scores (rows index ``queries``; values differentiable),
            e.g. the transition term (:mod:`trainer.transition_term`).
    Returns:
        A scalar.
    """
    values, rows, items = (bias.values, bias.rows, bias.items) if bias else (None, None, None)
    return _WeightedLogPartition.apply(
        queries, table, row_weights.detach(), values, rows, items, chunk, bf16, zero_column
    )
