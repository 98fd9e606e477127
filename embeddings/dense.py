"""Dense item table: one ``[N + 1, D]`` parameter whose last row is the zero padding vector."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from embeddings.base import ItemTable, init_rows


class DenseItemTable(ItemTable):
    """Item table as an ordinary parameter, trained by the DeepSpeed engine with the encoder.

    Initialised normal(0, init_std) by ``init_rows`` (on the host: the same values whatever the
    device, then moved to ``device``); the padding row (index N) is zero and, being the
    ``padding_idx`` of the lookup, never receives a gradient, so it stays zero under Adam with
    (coupled) weight decay.
    """

    def __init__(
        self,
        num_items: int,
        dim: int,
        init_std: float = 0.01,
        seed: int = 0,
        device: torch.device | str = "cpu",
        rows: torch.Tensor | None = None,
    ) -> None:
        """``rows``: ``[N, D]`` values to hold instead of the seeded initial ones."""
        super().__init__()
        self.num_items = num_items
        self.dim = dim
        if rows is None:
            initial = init_rows(0, num_items + 1, dim, init_std, seed, num_items)  # host
        else:
            initial = torch.cat([rows.float(), rows.new_zeros(1, dim, dtype=torch.float32)])
        self.weight = nn.Parameter(initial.to(device))  # [N + 1, D]

    @property
    def device(self) -> torch.device:
        return self.weight.device

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight, padding_idx=self.num_items)

    def all_items(self) -> torch.Tensor:
        return self.weight[: self.num_items]

    def held_ids(self) -> torch.Tensor:
        return torch.arange(self.num_items)  # every rank holds (a replica of) every row

    @torch.no_grad()
    def assign_rows(self, ids: torch.Tensor, values: torch.Tensor) -> None:
        self.weight[ids.to(self.device)] = values.to(self.weight)
