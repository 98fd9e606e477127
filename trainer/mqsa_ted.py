"""MQSA-TED: the encoder plus the losses of one training step (what the DeepSpeed engine wraps)."""

from __future__ import annotations

import math

from torch import nn

from embeddings.base import ItemTable
from trainer.catalog import catalog_forward
from trainer.config import Config
from trainer.data import Batch
from trainer.losses import LossTerms, paper_losses
from trainer.model import MQSAEncoder, dropout
from trainer.samplers import NegativeSampler
from trainer.teacher import SparseTeacher


class MQSATED(nn.Module):
    """The dense part of the model, plus the item table when it is dense.

    With the dense backend the table is a submodule (trained by the same DeepSpeed engine); with
    a sharded backend the table lives outside (its own fused optimizer) and is passed to
    ``forward``. With a sampler, the losses are the catalogue-mode ones (``trainer.catalog``).
    """

    def __init__(
        self,
        cfg: Config,
        max_len: int,
        table: ItemTable | None,
        sampler: NegativeSampler | None = None,
    ) -> None:
        super().__init__()
        self.cfg = cfg.model
        self.train_cfg = cfg.train
        self.encoder = MQSAEncoder(cfg.model, max_len)
        self.table = table
        self.sampler = sampler  # catalogue mode: shared sampled candidates instead of all items

    def forward(
        self,
        batch: Batch,
        teacher: SparseTeacher | None,
        rec_norm: float,
        kd_norm: float,
        table: ItemTable | None = None,
    ) -> LossTerms:
        """Losses of this rank's share of a batch.

        Args:
            batch: ``inputs``/``targets``/``mask`` of shape ``[B, T]``.
            rec_norm: the global count of real positions / world size (DeepSpeed averages grads).
            kd_norm: the global count of distillation heads / world size.
        """
        table = table if table is not None else self.table
        if self.sampler is not None:
            return catalog_forward(
                self.encoder, table, batch, self.sampler, teacher, self.cfg, rec_norm, kd_norm
            )
        emb = table.lookup(batch.inputs)  # [B, T, D]
        queries = self.encoder(emb, batch.mask)[batch.mask]  # [P, D]
        heads = batch.inputs[batch.mask]  # [H] (H = P: every real input item is a head)
        student = dropout(
            emb[batch.mask] * math.sqrt(self.cfg.dim), self.cfg.dropout, self.training
        )  # [H, D]
        return paper_losses(
            queries=queries,
            targets=batch.targets[batch.mask],
            student=student,
            heads=heads,
            items=table.all_items(),
            teacher=teacher,
            tau=self.cfg.tau,
            lambda_kd=self.cfg.lambda_kd,
            rec_norm=rec_norm,
            kd_norm=kd_norm,
            chunk=self.train_cfg.score_chunk,
            bf16=self.train_cfg.bf16,
        )
