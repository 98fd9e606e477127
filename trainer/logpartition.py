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

_WORKSPACE: dict[tuple[str, torch.dtype, torch.device], torch.Tensor] = {}


def _buffer(
    name: str, rows: int, cols: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """A reusable ``[rows, cols]`` scratch tensor on ``device`` (grown when needed, never
    shrunk; one per name, dtype and device)."""
    key = (name, dtype, device)
    buf = _WORKSPACE.get(key)
    if buf is None or buf.numel() < rows * cols:
        buf = torch.empty(rows * cols, dtype=dtype, device=device)
        _WORKSPACE[key] = buf
    return buf[: rows * cols].view(rows, cols)


class _WeightedLogPartition(torch.autograd.Function):
    @staticmethod
    def forward(ctx, queries, table, row_weights, chunk: int, bf16: bool, zero_column: bool):  # type: ignore[override]
        needs_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        mm_dtype = torch.bfloat16 if bf16 else torch.float32
        table_mm = table.detach().to(mm_dtype)  # [N, D]
        table_t = table_mm.T.contiguous()  # [D, N]
        num_items, device = table.shape[0], queries.device
        total = torch.zeros((), dtype=torch.float64, device=device)
        grad_q = torch.empty_like(queries, dtype=torch.float32) if needs_grad else None
        grad_t = torch.zeros_like(table, dtype=torch.float32) if needs_grad else None
        for start in range(0, queries.shape[0], chunk):
            q = queries[start : start + chunk].detach()  # [C, D]
            w = row_weights[start : start + chunk]  # [C]
            rows = q.shape[0]
            scores = _buffer("scores", rows, num_items, mm_dtype, device)
            torch.mm(q.to(mm_dtype), table_t, out=scores)  # [C, N]
            probs = _buffer("probs", rows, num_items, mm_dtype, device)
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
        ctx.save_for_backward(grad_q, grad_t)
        return total.to(queries.dtype)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        grad_q, grad_t = ctx.saved_tensors
        return grad_q * grad_out, grad_t * grad_out, None, None, None, None


def weighted_log_partition(
    queries: torch.Tensor,
    table: torch.Tensor,
    row_weights: torch.Tensor,
    chunk: int = 4096,
    bf16: bool = False,
    zero_column: bool = False,
) -> torch.Tensor:
    """``sum_r row_weights[r] * logsumexp_j(queries[r] . table[j])`` with exact gradients.

    Args:
        queries: ``[R, D]`` float32 (differentiable).
        table: ``[N, D]`` float32 (differentiable).
        row_weights: ``[R]`` constants.
        chunk: rows per block of the ``[chunk, N]`` score matrix.
        bf16: run the three matrix products in bfloat16 (softmax and sums stay float32).
        zero_column: score one more row that is all zeros (logit 0 for every query), like the
            padding row the reference keeps in its score matrix.
    Returns:
        A scalar.
    """
    return _WeightedLogPartition.apply(
        queries, table, row_weights.detach(), chunk, bf16, zero_column
    )
