"""The item-embedding table behind one small interface, so the model never knows the backend.

Backends: ``dense`` (an ordinary parameter trained by the DeepSpeed engine, paper mode) and
``torchrec`` (an EmbeddingCollection sharded by TorchRec, catalogue scale). Item ids are dense
indices ``0..N-1``; the padding id is ``N`` and always looks up a zero vector.
"""

from __future__ import annotations

import torch
from torch import nn


class ItemTable(nn.Module):
    """An item table: ``num_items`` rows of width ``dim`` plus a zero padding row."""

    num_items: int
    dim: int

    @property
    def padding_id(self) -> int:
        return self.num_items

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows of ``ids`` (any shape ``[*]``, values in ``0..N``): ``[*, D]``; id N gives zeros."""
        raise NotImplementedError

    def all_items(self) -> torch.Tensor:
        """The whole catalogue as one differentiable ``[N, D]`` tensor (paper mode only)."""
        raise NotImplementedError
