"""The one place that turns ``embeddings.backend`` into an item table (trainer, export and
recommend all build their tables here)."""

from __future__ import annotations

import torch

from embeddings.base import ItemTable
from embeddings.dense import DenseItemTable
from mqsa_core.config import EmbeddingsConfig, ModelConfig


def build_item_table(
    embeddings: EmbeddingsConfig,
    model: ModelConfig,
    num_items: int,
    seed: int,
    device: torch.device | str,
) -> ItemTable:
    """The table ``embeddings.backend`` asks for, with ``num_items`` rows of ``model.dim`` plus
    padding, initialised from ``seed`` (``train.seed``: the same values for every backend,
    sharding and world size), placed on ``device``. The TorchRec backend is collective (every
    rank calls)."""
    device = torch.device(device)
    if embeddings.backend == "torchrec":
        from embeddings.torchrec_table import TorchRecItemTable  # imports fbgemm: only if used

        return TorchRecItemTable.from_config(embeddings, model, num_items, seed, device)
    return DenseItemTable(num_items, model.dim, seed=seed, device=device)


def table_from_rows(rows: torch.Tensor) -> DenseItemTable:
    """A dense table holding exported vectors ``rows [N, D]`` (serving: the export's items)."""
    table = DenseItemTable(rows.shape[0], rows.shape[1], device=rows.device, rows=rows)
    return table.requires_grad_(False)
