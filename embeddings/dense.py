"""Dense item table: one ``[N + 1, D]`` parameter whose last row is the zero padding vector."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from embeddings.base import ItemTable, init_rows


class DenseItemTable(ItemTable):
    """Item table as an ordinary parameter, trained by the DeepSpeed engine with the encoder.

    Initialised normal(0, init_std) by ``init_rows``; the padding row (index N) is zero and,
    being the ``padding_idx`` of the lookup, never receives a gradient, so it stays zero under
    Adam with (coupled) weight decay.
    """

    def __init__(self, num_items: int, dim: int, init_std: float = 0.01, seed: int = 0) -> None:
        super().__init__()
        self.num_items = num_items
        self.dim = dim
        # the same seeded values as the TorchRec backend, whatever the sharding
        self.weight = nn.Parameter(init_rows(0, num_items + 1, dim, init_std, seed, num_items))

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight, padding_idx=self.num_items)

    def all_items(self) -> torch.Tensor:
        return self.weight[: self.num_items]
