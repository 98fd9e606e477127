"""Catalogue-wide log-partition with its gradient, chunked so no ``rows x N`` matrix is kept.

Both paper-mode losses need ``logsumexp_j(q_r . E_j)`` over all N items for every row ``r``
(positions for the recommendation loss, distillation heads for TED, each pre-scaled). Autograd
would keep the whole ``[R, N]`` score matrix for the backward pass; here the forward pass walks
the rows in chunks and, since the result only feeds a scalar loss, computes the gradients on the
way (3 matrix products per chunk, the same work as autograd) and keeps only ``[R, D]`` and
``[N, D]`` gradient buffers. Between the products, the softmax is torch's fused row-wise kernel
(max, exp-sum and normalise while a row is in cache): one pass over the chunk's scores instead
of one per elementwise op, and the row weights are applied to the ``[C, D]`` sides instead.
The log-partition itself is read from the softmax at one column per row (no row maximum or sum
of its own), and the reference's zero padding column is a real column of the block.

One backend computes each block of rows (:class:`TorchBlocks`, or :class:`KernelBlocks` on CPU
with bf16 and the run's hand-written kernel, ``trainer.model.cpu_kernels.select``): the kernel runs
the score product too, and without a score bonus the product and the softmax in one pass (the
scores stay in cache; the log-partition comes out of the softmax's own max and sum); its softmax
also writes its transpose, the left operand of ``softmax^T . (w q)`` in its fast layout. The
gradients are the same for both (``forward``).

The ``[chunk, N]`` score buffers are reused between calls: on this class of machine a fresh
multi-megabyte allocation is paid for in page faults on every step. They are zeroed when they
are allocated, and every region a product may read is written on each call (a matrix product is
free to read an operand's padding up to its row stride: oneDNN's AMX kernels do), so no
uninitialised memory can reach a result.

A gradient that is not finite makes the returned value NaN, so the step's guard
(``trainer.runtime.engine.DivergenceGuard``) skips it before any weight changes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from trainer.model import cpu_kernels
from trainer.model.cpu_kernels import CpuKernel
from trainer.model.transition_term import ScoreBonus

_SMALLEST_NORMAL = torch.finfo(torch.float32).tiny  # bf16 has float32's exponent range
_WORKSPACE: dict[tuple[str, torch.dtype, torch.device], torch.Tensor] = {}
_HEALTH: list[dict[str, object]] | None = None  # see recording_health


def _buffer(name: str, size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A reusable flat ``[size]`` scratch tensor on ``device`` (one per name, dtype and device;
    never shrunk), zeros when allocated. It grows with 25% headroom, so that batches of varying
    size rarely allocate again: the pages of a fresh multi-megabyte buffer are paid in faults on
    first touch."""
    key = (name, dtype, device)
    buf = _WORKSPACE.get(key)
    if buf is None or buf.numel() < size:
        buf = torch.zeros(size + size // 4, dtype=dtype, device=device)
        _WORKSPACE[key] = buf
    return buf[:size]


@contextmanager
def recording_health() -> Iterator[list[dict[str, object]]]:
    """Inside the block, every call appends what it found finite: ``{"loss": "recommendation"
    | "TED", "bonus": bool, "value": bool, "d/dqueries": bool, "d/dtable": bool, "d/dbonus":
    bool | None}`` (host reads: for the diagnosis of a non-finite
    step, ``trainer.runtime.diagnose``; never inside a training step)."""
    global _HEALTH
    saved, _HEALTH = _HEALTH, []
    try:
        yield _HEALTH
    finally:
        _HEALTH = saved


def _all_finite(tensor: torch.Tensor | None) -> bool | None:
    return None if tensor is None else bool(torch.isfinite(tensor).all())


def fill_workspace(value: float) -> None:
    """Every scratch buffer filled with ``value`` (NaN: what a reused buffer may hold; the
    kernel's self-check and tests)."""
    for buf in _WORKSPACE.values():
        buf.fill_(value)


def reset_workspace() -> None:
    """Drop the scratch buffers (the next call allocates zeroed ones)."""
    _WORKSPACE.clear()


def _transpose_buffer(rows: int, width: int, like: torch.Tensor) -> torch.Tensor:
    """A reusable ``[width, rows]`` buffer laid out as the CPU kernel writes transposes."""
    stride = cpu_kernels.transpose_stride(rows)
    flat = _buffer("probs_t", width * stride, like.dtype, like.device)
    return flat.view(width, stride)[:, :rows]


def _anchored_lse(
    flat_scores: torch.Tensor,
    flat_probs: torch.Tensor,
    rows: int,
    width: int,
    anchors: torch.Tensor | None,
    start: int,
) -> torch.Tensor:
    """``[C]`` float32 logsumexp of each row of a ``[C, width]`` block, read as ``s_a - log(p_a)``
    at the row's anchor column ``a`` (its entry of ``anchors`` from ``start`` on, else the zero
    column ``width - 1``): no pass over the row."""
    anchor = torch.arange(rows, device=flat_scores.device) * width
    anchor += anchors[start : start + rows] if anchors is not None else width - 1
    p_anchor = flat_probs.index_select(0, anchor).float().clamp(min=_SMALLEST_NORMAL)
    return flat_scores.index_select(0, anchor).float() - p_anchor.log()


@dataclass
class Block:
    """One block of rows ``[C]`` against the ``width`` columns: what the gradients need.

    ``lse [C]`` float32; ``probs [C, width]`` the softmax (None when the block was fused and
    never wrote it) and ``flat_probs`` its flat buffer (one spare element after it);
    ``probs_t [width, C]`` its transpose when the backend wrote one; ``expected [C, D]`` the
    product ``softmax . E`` when the backend computed it."""

    lse: torch.Tensor
    probs: torch.Tensor | None = None
    flat_probs: torch.Tensor | None = None
    probs_t: torch.Tensor | None = None
    expected: torch.Tensor | None = None


AddBias = Callable[[torch.Tensor, int, int], None]  # (flat scores, first row, rows): in place


class TorchBlocks:
    """Blocks computed by torch: oneDNN's score product, torch's fused row-wise softmax, the
    log-partition read at one column per row (:func:`_anchored_lse`)."""

    def __init__(self, table_mm: torch.Tensor, anchors: torch.Tensor | None) -> None:
        self.table_mm, self.anchors = table_mm, anchors  # [width, D]
        self.width = table_mm.shape[0]
        self.table_t = self._table_operand(table_mm)

    def _table_operand(self, table_mm: torch.Tensor) -> torch.Tensor:
        return table_mm.T.contiguous()  # [D, width]

    def queries(self, q: torch.Tensor) -> torch.Tensor:
        """A block's ``[C, D]`` queries in the layout :meth:`scores` reads."""
        return q

    def scores(self, q: torch.Tensor, out: torch.Tensor) -> None:
        torch.mm(q, self.table_t, out=out)

    def softmax(self, scores: torch.Tensor, probs: torch.Tensor) -> torch.Tensor | None:
        """``probs = softmax(scores)`` along rows; the transpose, if the backend writes one."""
        torch.ops.aten._softmax.out(scores, 1, False, out=probs)
        return None

    def block(self, q: torch.Tensor, start: int, add_bias: AddBias | None) -> Block:
        """The rows ``start..start+C`` with queries ``q [C, D]`` (from :meth:`queries`),
        their scores plus ``add_bias`` when given."""
        rows, width, dtype, device = q.shape[0], self.width, self.table_mm.dtype, q.device
        size = rows * width  # one spare element after the [C, width] block
        flat_scores = _buffer("scores", size + 1, dtype, device)
        scores = flat_scores[:size].view(rows, width)
        self.scores(q, scores)
        if add_bias is not None:
            add_bias(flat_scores, start, rows)
        flat_probs = _buffer("probs", size + 1, dtype, device)
        probs = flat_probs[:size].view(rows, width)
        # one fused row-wise pass (max, exp-sum, normalise; float32 inside for bf16)
        probs_t = self.softmax(scores, probs)
        lse = _anchored_lse(flat_scores, flat_probs, rows, width, self.anchors, start)
        return Block(lse, probs, flat_probs, probs_t)


class KernelBlocks(TorchBlocks):
    """Blocks computed by the run's CPU kernel (``trainer.model.cpu_kernels``): the score product,
    and the softmax with its transpose (the left operand of ``softmax^T . (w q)`` in its fast
    layout); without a score bonus all of it in one pass per block of rows, the log-partition
    from the softmax's own max and sum and ``softmax . E`` beside it."""

    def __init__(
        self, kernel: CpuKernel, table_mm: torch.Tensor, anchors: torch.Tensor | None
    ) -> None:
        self.kernel = kernel
        super().__init__(table_mm, anchors)
        self.paired: torch.Tensor | None = None  # the fused pass's table operand, when first used

    def _table_operand(self, table_mm: torch.Tensor) -> torch.Tensor:
        return cpu_kernels.pack_items(table_mm)

    def queries(self, q: torch.Tensor) -> torch.Tensor:
        return cpu_kernels.pairs(q)

    def scores(self, q: torch.Tensor, out: torch.Tensor) -> None:
        self.kernel.scores(q, self.table_t, out)  # [C, width]

    def softmax(self, scores: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        probs_t = _transpose_buffer(*scores.shape, probs)
        self.kernel.softmax_rows_and_transpose(scores, probs, probs_t)
        return probs_t  # [width, C]

    def block(self, q: torch.Tensor, start: int, add_bias: AddBias | None) -> Block:
        if add_bias is not None:
            return super().block(q, start, add_bias)
        if self.paired is None:
            self.paired = cpu_kernels.pair_items(self.table_mm)
        rows, dim, device = q.shape[0], self.paired.shape[1], q.device
        probs_t = _transpose_buffer(rows, self.width, self.table_mm)
        lse = _buffer("lse", rows, torch.float32, device)  # [C]
        expected = _buffer("expected", rows * dim, torch.float32, device).view(rows, dim)
        self.kernel.log_partition_block(q, self.table_t, self.paired, probs_t, lse, expected)
        return Block(lse, probs_t=probs_t, expected=expected[:, : self.table_mm.shape[1]])


class _WeightedLogPartition(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx, queries, table, row_weights, bias_values, bias_rows, bias_items, anchors,
        chunk: int, bf16: bool, zero_column: bool, cpu_kernel: CpuKernel | None,
    ):  # fmt: skip
        needs_grad = any(ctx.needs_input_grad[:4])
        mm_dtype = torch.bfloat16 if bf16 else torch.float32
        num_items, dim, device = table.shape[0], table.shape[1], queries.device
        has_bias = bias_values is not None
        width = num_items + int(zero_column)  # the zero column, if any, is column N
        table_mm = torch.empty(width, dim, dtype=mm_dtype, device=device)  # [width, D]
        table_mm[:num_items] = table.detach()
        table_mm[num_items:] = 0.0
        # which backend computes the blocks: the CPU kernel (bf16 on CPU, for a gradient), or
        # torch
        use_kernel = cpu_kernel is not None and device.type == "cpu" and bf16 and needs_grad
        blocks = (
            KernelBlocks(cpu_kernel, table_mm, anchors)
            if use_kernel
            else TorchBlocks(table_mm, anchors)
        )
        total = torch.zeros((), dtype=torch.float64, device=device)
        grad_q = torch.empty_like(queries, dtype=torch.float32) if needs_grad else None
        grad_t = None  # [width, D] float32, from the first chunk on
        grad_bias = torch.zeros_like(bias_values) if has_bias and needs_grad else None
        flat_index = inside = None  # where this chunk's bias values sit in its flat scores

        def add_bias(flat_scores: torch.Tensor, start: int, rows: int) -> None:
            """This chunk's additions; the other chunks' go to the spare element."""
            nonlocal flat_index, inside
            local = bias_rows - start
            inside = (local >= 0) & (local < rows)
            flat_index = torch.where(inside, local * width + bias_items, rows * width)  # [E]
            flat_scores.index_add_(0, flat_index, bias_values.detach().to(mm_dtype))

        for start in range(0, queries.shape[0], chunk):
            q = queries[start : start + chunk].detach()  # [C, D]
            w = row_weights[start : start + chunk]  # [C]
            rows = q.shape[0]
            block = blocks.block(
                blocks.queries(q.to(mm_dtype)), start, add_bias if has_bias else None
            )
            total += (w * block.lse).sum().double()
            if needs_grad:  # d/dq = w * softmax . E, d/dE = softmax^T . (w * q)
                expected = block.expected
                if expected is None:
                    expected = torch.mm(block.probs, table_mm)
                grad_q[start : start + rows] = expected.float() * w[:, None]
                left = block.probs.T if block.probs_t is None else block.probs_t  # [width, C]
                part = torch.mm(left, (q * w[:, None]).to(mm_dtype)).float()
                grad_t = part if grad_t is None else grad_t.add_(part)
                if has_bias:  # d/d(bias value) = w * softmax at its pair
                    row_w = w.index_select(0, (bias_rows - start).clamp(0, rows - 1))
                    picked = block.flat_probs.index_select(0, flat_index).float() * row_w
                    grad_bias += torch.where(inside, picked, torch.zeros_like(picked))
        if needs_grad and grad_t is None:  # no rows on this rank
            grad_t = torch.zeros(width, dim, device=device)
        if _HEALTH is not None:
            _HEALTH.append({
                "loss": "recommendation" if zero_column else "TED", "bonus": has_bias,
                "value": _all_finite(total),
                "d/dqueries": _all_finite(grad_q), "d/dtable": _all_finite(grad_t),
                "d/dbonus": _all_finite(grad_bias),
            })  # fmt: skip
        if needs_grad:  # 0 * (a sum with a NaN or Inf) is NaN: a bad gradient spoils the value
            total += 0.0 * (grad_q.sum() + grad_t.sum()).double()
            if grad_bias is not None:
                total += 0.0 * grad_bias.sum().double()
        ctx.save_for_backward(grad_q, grad_t[:num_items] if needs_grad else None, grad_bias)
        return total.to(queries.dtype)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        grad_q, grad_t, grad_bias = ctx.saved_tensors
        grad_bias = grad_bias * grad_out if grad_bias is not None else None
        return (
            grad_q * grad_out, grad_t * grad_out, None, grad_bias, *([None] * 7)
        )  # fmt: skip


def weighted_log_partition(
    queries: torch.Tensor,
    table: torch.Tensor,
    row_weights: torch.Tensor,
    chunk: int = 4096,
    bf16: bool = False,
    zero_column: bool = False,
    bias: ScoreBonus | None = None,
    anchors: torch.Tensor | None = None,
    kernel: CpuKernel | None = None,
) -> torch.Tensor:
    """``sum_r row_weights[r] * logsumexp_j(queries[r] . table[j] + bias[r, j])`` with exact
    gradients.

    The log-partition of a row is read at one column ``a`` as ``s_a - log(softmax_a)``: exact
    to rounding while ``softmax_a`` is a normal float, i.e. while ``logsumexp - s_a < 87``. The
    zero column (``s_a = 0``) anchors every row where there is one; without it, ``anchors``
    names each row's column (a column with a high score: TED anchors a head at its own item).
    Past that range the value is a lower bound; the gradients are exact regardless.

    Args:
        queries: ``[R, D]`` float32 (differentiable).
        table: ``[N, D]`` float32 (differentiable).
        row_weights: ``[R]`` constants.
        chunk: rows per block of the ``[chunk, N]`` score matrix.
        bf16: run the three matrix products in bfloat16 (softmax and sums stay float32).
        zero_column: score one more row that is all zeros (logit 0 for every query), like the
            padding row the reference keeps in its score matrix.
        bias: sparse additions to the scores (rows index ``queries``; values differentiable),
            e.g. the transition term (:mod:`trainer.model.transition_term`).
        anchors: ``[R]`` int64 column per row; required without ``zero_column``.
        kernel: the run's CPU kernel (``trainer.model.cpu_kernels.select``), used on CPU with bf16
            when gradients are needed; None: torch's path.
    Returns:
        A scalar (NaN when a gradient is not finite).
    """
    if not zero_column and anchors is None:
        raise ValueError("weighted_log_partition needs anchors when there is no zero column")
    values, rows, items = (bias.values, bias.rows, bias.items) if bias else (None, None, None)
    return _WeightedLogPartition.apply(
        queries, table, row_weights.detach(), values, rows, items,
        None if zero_column else anchors, chunk, bf16, zero_column, kernel,
    )  # fmt: skip
