"""The item-embedding table behind one small interface, so the model never knows the backend.

Backends: ``dense`` (an ordinary parameter trained by the DeepSpeed engine, paper mode) and
``torchrec`` (an EmbeddingCollection sharded by TorchRec, catalogue scale). Item ids are dense
indices ``0..N-1``; the padding id is ``N`` and always looks up a zero vector.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

INIT_BLOCK = 1 << 16  # rows drawn per seeded block


def init_rows(
    start: int, stop: int, dim: int, std: float, seed: int, num_items: int
) -> torch.Tensor:
    """Initial values of global rows ``start..stop-1``: ``[stop - start, dim]``.

    Row ``num_items`` (padding) is zero. Independent of how the table is split.
    """
    out = torch.empty(stop - start, dim)
    for block in range(start // INIT_BLOCK, (stop - 1) // INIT_BLOCK + 1 if stop > start else 0):
        lo = block * INIT_BLOCK
        gen = torch.Generator().manual_seed(seed * 1_000_003 + block)
        values = torch.randn(INIT_BLOCK, dim, generator=gen) * std
        a, b = max(lo, start), min(lo + INIT_BLOCK, stop)
        out[a - start : b - start] = values[a - lo : b - lo]
    if start <= num_items < stop:
        out[num_items - start] = 0.0
    return out


class ItemTable(nn.Module):
    """An item table: ``num_items`` rows of width ``dim`` plus a zero padding row.

    ``has_fused_optimizer`` says who trains it: False = its parameters belong to the model that
    the DeepSpeed engine optimizes; True = it updates itself inside the backward pass (TorchRec's
    fused kernel) and is checkpointed on its own.
    """

    num_items: int
    dim: int
    has_fused_optimizer: bool = False
    # fused tables: a hook applied to the gradient of every looked-up row before the fused
    # update (the trainer's divergence guard zeroes a skipped step's gradient with it)
    grad_gate: Callable[[torch.Tensor], torch.Tensor] | None = None

    @property
    def padding_id(self) -> int:
        return self.num_items

    def scale_learning_rate(self, factor: float) -> None:
        """A fused table: its optimizer's rate is its configured rate times ``factor`` from the
        next update on (host-side, no device work). Other tables: nothing (the dense optimizer's
        schedule covers them)."""

    @property
    def device(self) -> torch.device:
        """Where lookups return their rows."""
        raise NotImplementedError

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows of ``ids`` (any shape ``[*]``, values in ``0..N``): ``[*, D]``; id N gives zeros."""
        raise NotImplementedError

    def rows(self, ids: torch.Tensor, host_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Rows of distinct real ids ``[U]`` (on this table's device): ``[U, D]``.

        The step's one read of the table (a sharded table makes it one exchange). ``host_ids``
        is the same ids on the host, where a sharded table does its bookkeeping without waiting
        on the device. This default is :meth:`lookup`.
        """
        return self.lookup(ids)

    def all_items(self) -> torch.Tensor:
        """The whole catalogue as one differentiable ``[N, D]`` tensor (paper mode only)."""
        raise NotImplementedError

    def item_sum(self) -> torch.Tensor:
        """``sum_j E_j`` over the N items, ``[D]`` (the zero-count mass of TED needs it).

        This default is exact and differentiable but reads the whole table.
        """
        return self.all_items().sum(0)

    def local_rows(self) -> tuple[int, torch.Tensor]:
        """``(first_id, rows [C, D])``: the contiguous rows this rank scores in evaluation, on
        this table's device.

        Together the ranks cover ``0..N-1`` exactly once. This default (a table every rank holds
        whole) gives each rank an even slice.
        """
        items = self.all_items().detach()
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        bounds = [self.num_items * r // world for r in range(world + 1)]
        return bounds[rank], items[bounds[rank] : bounds[rank + 1]]

    def held_ids(self) -> torch.Tensor:
        """Host ids of the rows this rank holds and may write (:meth:`assign_rows`)."""
        raise NotImplementedError

    def assign_rows(self, ids: torch.Tensor, values: torch.Tensor) -> None:
        """Overwrite the held rows ``ids [R]`` (host) with ``values [R, D]`` (no gradient)."""
        raise NotImplementedError

    def export_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(global ids [R], vectors [R, D])`` this rank writes in an export, ON THE HOST."""
        first_id, rows = self.local_rows()
        ids = torch.arange(first_id, first_id + rows.shape[0])
        return ids, rows.detach().to("cpu", torch.float32)
