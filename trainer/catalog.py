"""One catalogue-mode forward pass: one lookup for every row the step needs, then the losses.

The item table may be the dense one or the TorchRec-sharded one (``ItemTable.lookup_many`` packs
the sequence items, targets, shared candidates and teacher successors into a single exchange).
"""

from __future__ import annotations

import math

from embeddings.base import ItemTable
from trainer.config import ModelConfig
from trainer.data import Batch
from trainer.losses import LossTerms
from trainer.model import MQSAEncoder, dropout
from trainer.sampled_losses import sampled_rec_loss, sampled_ted_loss
from trainer.samplers import NegativeSampler
from trainer.teacher import SparseTeacher


def catalog_forward(
    encoder: MQSAEncoder,
    table: ItemTable,
    batch: Batch,
    sampler: NegativeSampler,
    teacher: SparseTeacher | None,
    cfg: ModelConfig,
    rec_norm: float,
    kd_norm: float,
) -> LossTerms:
    """Losses of this rank's share of a batch against shared sampled candidates.

    Same contract as ``MQSATED.forward`` (``rec_norm``/``kd_norm``: global counts of real
    positions and of heads, divided by the world size). Collective calls (the table's exchange,
    its item sum) happen in the same order on every rank.

    Args:
        batch: ``inputs``/``targets``/``mask`` of shape ``[B, T]``.
    """
    mask = batch.mask
    targets = batch.targets[mask]  # [P]
    heads = batch.inputs[mask]  # [H] (H = P)
    cands = sampler.sample(targets)
    use_kd = cfg.lambda_kd > 0 and teacher is not None
    ids = {"inputs": batch.inputs, "targets": targets, "candidates": cands.ids}
    if use_kd:
        edges = teacher.rows(heads)
        ids["successors"] = edges[1]
    emb = table.lookup_many(ids)  # {"inputs": [B, T, D], "targets": [P, D], ...}
    queries = encoder(emb["inputs"], mask)[mask]  # [P, D]
    rec = sampled_rec_loss(queries, targets, emb["targets"], cands, emb["candidates"], rec_norm)
    if not use_kd:
        return LossTerms(total=rec, rec=rec.detach(), kd=rec.new_zeros(()))
    student = dropout(emb["inputs"][mask] * math.sqrt(cfg.dim), cfg.dropout, encoder.training)
    kd = sampled_ted_loss(
        student, heads, teacher, edges, emb["successors"], cands, emb["candidates"],
        table.item_sum(), cfg.tau, kd_norm,
    )  # fmt: skip
    return LossTerms(total=rec + cfg.lambda_kd * kd, rec=rec.detach(), kd=kd.detach())
