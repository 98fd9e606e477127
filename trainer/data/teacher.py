"""The transition-aware teacher of TED, kept sparse.

For head item i with transition counts ``G[i, :]`` the paper's teacher is
``p_i = softmax(G[i, :] / max(G[i, :]) / tau)`` over all N items. Every non-successor j has
``G[i, j] = 0`` and so the same probability ``base_i = 1 / Z_i``; a successor has
``base_i + excess_ij``. Storing ``base`` per item and ``excess`` per edge (CSR) is exact and
needs memory proportional to the graph, not N x N.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


def csr_edges(indptr: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The edges of ``rows`` ``[R]`` in a CSR structure with offsets ``indptr`` ``[N + 1]``.

    Returns:
        ``(row_index [E_r], edge [E_r])``: for each selected edge, its position in ``rows`` and
        its position in the CSR edge arrays.
    """
    starts = indptr[rows]
    lengths = indptr[rows + 1] - starts
    row_index = torch.repeat_interleave(torch.arange(rows.shape[0]), lengths)
    offsets = torch.arange(int(lengths.sum())) - torch.repeat_interleave(
        lengths.cumsum(0) - lengths, lengths
    )
    return row_index, starts[row_index] + offsets


def transition_feature(count: np.ndarray) -> np.ndarray:
    """``[E]`` float32 ``log(1 + max(count - 1, 0))``: the transition term's feature of an edge
    seen ``count`` times. One sighting is no evidence of a pattern (on a log that mixes
    item-to-next steps with taste steps, every item follows the last one about once), so it
    counts 0; then the log grows with the repeats."""
    return np.log1p(np.maximum(count - 1, 0)).astype(np.float32)


def csr_offsets(src: np.ndarray, num_rows: int) -> np.ndarray:
    """``[num_rows + 1]`` CSR offsets of edges sorted by ``src``."""
    indptr = np.zeros(num_rows + 1, dtype=np.int64)
    np.cumsum(np.bincount(src, minlength=num_rows), out=indptr[1:])
    return indptr


@dataclass
class SparseTeacher:
    """CSR teacher: row i's successors are ``dst[indptr[i]:indptr[i + 1]]``.

    The graph (row offsets, successor ids) stays on the host, where the batch builder finds each
    batch's edges (``edges_of``: their number depends on the data, so it is decided before the
    step); the probabilities live on the run's device (``to``), where the step gathers them.

    Attributes:
        indptr: ``[N + 1]`` int64 row offsets (host).
        dst: ``[E]`` int64 successor ids (host).
        excess: ``[E]`` float32, ``p_ij - base_i`` for each successor.
        base: ``[N]`` float32, the probability of a non-successor (``1 / Z_i``; ``1 / N`` for an
            item without successors, whose teacher is uniform).
        log_count: ``[E]`` float32 ``log(1 + max(G[i, j] - 1, 0))``, the feature of the
            transition term (``model.transition_term``, :mod:`trainer.model.transition_term`): a
            transition seen once counts 0 (the noise floor).
        log_count_others: ``[E]`` float32 ``log(1 + max(G[i, j] - 2, 0))``: the same without
            the one transition a training position is itself (no target leakage).
    """

    indptr: torch.Tensor
    dst: torch.Tensor
    excess: torch.Tensor
    base: torch.Tensor
    log_count: torch.Tensor
    log_count_others: torch.Tensor

    @property
    def num_items(self) -> int:
        return self.base.shape[0]

    def to(self, device: torch.device) -> SparseTeacher:
        """The probabilities and features on ``device``; the graph stays on the host."""
        return SparseTeacher(
            self.indptr, self.dst, self.excess.to(device), self.base.to(device),
            self.log_count.to(device), self.log_count_others.to(device),
        )  # fmt: skip

    def edges_of(self, heads: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Host-side: the successor edges of host ids ``heads`` ``[H]`` as
        ``(head_index [E_h], edge [E_h])`` (position in ``heads``, position in ``dst``)."""
        return csr_edges(self.indptr, heads)

    @classmethod
    def from_edges(
        cls, src: np.ndarray, dst: np.ndarray, count: np.ndarray, num_items: int, tau: float
    ) -> SparseTeacher:
        """Build from edge lists ``src``, ``dst``, ``count`` (``[E]``; counts summed over spans;
        a pair listed twice counts once with the summed count)."""
        src = np.asarray(src, dtype=np.int64)
        dst = np.asarray(dst, dtype=np.int64)
        count = np.asarray(count, dtype=np.float64)
        if src.size and (
            src.min() < 0 or src.max() >= num_items or dst.min() < 0 or dst.max() >= num_items
        ):
            raise ValueError(
                f"transitions hold item indices outside 0..{num_items - 1}: the graph does not "
                "match the vocabulary (re-run spark_jobs.prepare?)"
            )
        pairs, where = np.unique(np.stack([src, dst], axis=1), axis=0, return_inverse=True)
        src, dst = pairs[:, 0].copy(), pairs[:, 1].copy()  # sorted by (src, dst), distinct
        count = np.bincount(where.reshape(-1), weights=count, minlength=len(pairs))
        row_max = np.zeros(num_items)
        np.maximum.at(row_max, src, count)
        logits = count / row_max[src] / tau  # [E], in (0, 1 / tau]
        # Z_i = (#non-successors) * exp(0) + sum over successors of exp(logit); shift by 1/tau
        # keeps exp() finite for tiny tau: Z_i = e^{1/tau} * Z'_i.
        shift = 1.0 / tau
        succ_mass = np.zeros(num_items)
        np.add.at(succ_mass, src, np.exp(logits - shift))
        degree = np.bincount(src, minlength=num_items)
        z_shifted = (num_items - degree) * np.exp(-shift) + succ_mass  # [N]
        has_edges = degree > 0
        base = np.full(num_items, 1.0 / num_items)
        base[has_edges] = np.exp(-shift) / z_shifted[has_edges]
        excess = np.exp(logits - shift) / z_shifted[src] - base[src]
        return cls(
            indptr=torch.from_numpy(csr_offsets(src, num_items)),
            dst=torch.from_numpy(dst),
            excess=torch.from_numpy(excess.astype(np.float32)),
            base=torch.from_numpy(base.astype(np.float32)),
            log_count=torch.from_numpy(transition_feature(count)),
            log_count_others=torch.from_numpy(transition_feature(count - 1)),
        )

    def rows(self, heads: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The successor edges of host ids ``heads`` ``[H]`` (tests and tools, host teacher):
        ``(head_index [E_h], successor [E_h], excess [E_h])``."""
        head_index, edge = self.edges_of(heads)
        return head_index, self.dst[edge], self.excess[edge.to(self.excess.device)]

    def dense(self) -> torch.Tensor:
        """The full ``[N, N]`` teacher matrix (for tests on tiny graphs only)."""
        n = self.num_items
        out = self.base.unsqueeze(1).expand(n, n).clone()
        head_index, succ, excess = self.rows(torch.arange(n))
        out[head_index, succ] += excess
        return out
