"""One training step's forward pass in each mode: what the DeepSpeed engine wraps.

- :class:`PaperObjective` (``loss.candidates: all``): the full softmax over the catalogue and the
  paper's TED (METHOD.md "Losses"), exactly.
- :class:`CatalogObjective` (``loss.candidates: sampled``): the same two losses against the
  batch's shared sampled candidates, with the sparse TED teacher (METHOD.md "Catalog mode").

Both read the table once per step (``table.rows``: one exchange for a sharded table), encode,
and compute their losses from device tensors of known shapes: the batch
(``trainer.data.batches.StepBatch``) carries every data-dependent index, so nothing here waits on
the device. The dense table is a submodule (the engine trains it); a sharded table is held outside
the module tree (it trains itself in the backward pass, fused).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from embeddings.base import ItemTable
from mqsa_core.collectives import all_reduce_sum, world
from mqsa_core.config import LossConfig, ModelConfig, TrainConfig
from trainer.data.batches import StepBatch
from trainer.data.teacher import SparseTeacher
from trainer.model.cpu_kernels import CpuKernel
from trainer.model.encoder import MQSAEncoder, dropout
from trainer.model.losses import (
    LossTerms,
    TeacherRows,
    full_softmax_rec_loss,
    sampled_rec_loss,
    sampled_ted_loss,
    ted_loss,
)
from trainer.model.transition_term import ScoreBonus, training_bonus


class Objective(nn.Module):
    """What both modes share: the encoder, the table, the teacher and the step's first half
    (read the rows, encode, pick the real positions)."""

    def __init__(
        self,
        encoder: MQSAEncoder,
        table: ItemTable,
        teacher: SparseTeacher | None,
        model: ModelConfig,
        train: TrainConfig,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        if table.has_fused_optimizer:
            self.__dict__["table"] = table  # not a submodule: the engine must not train it
        else:
            self.table = table
        self.teacher = teacher
        self.model_cfg, self.train_cfg = model, train
        self.use_kd = model.lambda_kd > 0 and teacher is not None
        if encoder.transition_weight is not None and teacher is None:
            raise ValueError("model.transition_term needs the transition graph (a teacher)")

    def encode(self, batch: StepBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(rows [U + 1, D], queries [P, D], student [P, D])``: the batch's table rows (row U
        is the zero padding row), the mixed query at each real position and the TED student of
        each head (``dropout(E[head] * sqrt(d))``)."""
        rows = self.table.rows(batch.rows, batch.host_rows)  # [U, D]
        rows = torch.cat([rows, rows.new_zeros(1, rows.shape[1])])  # [U + 1, D]
        groups = (batch.group_rows, batch.group_shapes)
        hidden = self.encoder.forward_groups(rows, batch.inputs_row, batch.mask, *groups)  # [S, D]
        # index_select, not rows[index]: its backward is an index_add, ~10x faster on CPU than
        # the accumulating index_put of advanced indexing
        queries = hidden.index_select(0, batch.grouped_positions)  # [P, D]
        head_rows = batch.inputs_row.flatten().index_select(0, batch.positions)  # [P]
        scale = math.sqrt(self.model_cfg.dim)
        student = dropout(
            rows.index_select(0, head_rows) * scale, self.model_cfg.dropout, self.training
        )
        return rows, queries, student

    def teacher_rows(self, batch: StepBatch, rows: torch.Tensor) -> TeacherRows:
        """The teacher rows of the batch's heads, gathered on the device."""
        heads = batch.inputs.flatten().index_select(0, batch.positions)  # [P]
        return TeacherRows(
            base=self.teacher.base[heads],
            head_index=batch.edge_head,
            excess=self.teacher.excess[batch.edge],
            rows=rows,
            succ_row=batch.succ_row,
            heads=heads,
        )

    def transition_term(self, batch: StepBatch) -> tuple[ScoreBonus, torch.Tensor] | None:
        """The transition term at the batch's positions (``(additions to their scores over
        all items, each target's own [P])``), or None when ``model.transition_term`` is off."""
        weight = self.encoder.transition_weight
        if weight is None:
            return None
        return training_bonus(
            weight, self.teacher, batch.edge_head, batch.edge, batch.edge_succ,
            batch.edge_is_target, batch.positions.shape[0],
        )  # fmt: skip

    @staticmethod
    def normaliser(batch: StepBatch) -> torch.Tensor:
        """The global sum of the positions' (= heads') weights divided by the world size, on
        the device: DeepSpeed and TorchRec average gradients over ranks."""
        return (all_reduce_sum(batch.counts) / world()[1]).float().squeeze(0)

    def total(self, rec: torch.Tensor, kd: torch.Tensor | None) -> LossTerms:
        if kd is None:
            return LossTerms(total=rec, rec=rec.detach(), kd=torch.zeros_like(rec).detach())
        return LossTerms(
            total=rec + self.model_cfg.lambda_kd * kd, rec=rec.detach(), kd=kd.detach()
        )


class PaperObjective(Objective):
    """Paper mode: full softmax and TED over all N items (no ``positions x N`` matrix kept), on
    the CPU kernel where the run has one."""

    def __init__(
        self, encoder: MQSAEncoder, table: ItemTable, teacher: SparseTeacher | None,
        model: ModelConfig, train: TrainConfig, kernel: CpuKernel | None = None,
    ) -> None:  # fmt: skip
        super().__init__(encoder, table, teacher, model, train)
        self.kernel = kernel

    def forward(self, batch: StepBatch) -> LossTerms:
        norm = self.normaliser(batch)
        rows, queries, student = self.encode(batch)
        items = self.table.all_items()  # [N, D]
        chunk, bf16 = self.train_cfg.score_chunk, self.train_cfg.bf16
        target_emb = rows.index_select(0, batch.targets_row)  # [P, D]
        term = self.transition_term(batch)
        weights = batch.weights
        rec = full_softmax_rec_loss(
            queries, target_emb, items, norm, chunk, bf16, term, weights, self.kernel
        )
        if not self.use_kd:
            return self.total(rec, None)
        teacher = self.teacher_rows(batch, rows)
        kd = ted_loss(
            student, items, teacher, self.model_cfg.tau, norm, chunk, bf16, weights, self.kernel
        )
        return self.total(rec, kd)


class CatalogObjective(Objective):
    """Catalogue mode: both losses against the batch's shared candidates (log-Q corrected,
    accidental hits masked) and the sparse TED teacher; never an ``N``-wide row."""

    def forward(self, batch: StepBatch) -> LossTerms:
        norm = self.normaliser(batch)
        rows, queries, student = self.encode(batch)
        cand_emb = rows.index_select(0, batch.cand_row)  # [K, D]
        target_emb = rows.index_select(0, batch.targets_row)  # [P, D]
        term = self.transition_term(batch)
        if term is not None:  # the additions at the candidates that are successors
            bias, target_bias = term
            at_candidates = ScoreBonus(
                batch.hit_head, batch.hit_cand, bias.values.index_select(0, batch.hit_edge)
            )
            term = (at_candidates, target_bias)
        rec = sampled_rec_loss(
            queries, batch.targets, target_emb, batch.cand_ids, batch.cand_log_q, cand_emb, norm,
            term, batch.weights,
        )  # fmt: skip
        if not self.use_kd:
            return self.total(rec, None)
        teacher = self.teacher_rows(batch, rows)
        kd = sampled_ted_loss(
            student, teacher, batch.cand_log_q, cand_emb, (batch.hit_head, batch.hit_cand),
            self.table.item_sum(), self.model_cfg.tau, norm, batch.weights,
        )  # fmt: skip
        return self.total(rec, kd)


def build_objective(
    loss: LossConfig,
    model: ModelConfig,
    train: TrainConfig,
    encoder: MQSAEncoder,
    table: ItemTable,
    teacher: SparseTeacher | None,
    kernel: CpuKernel | None = None,
) -> Objective:
    """The objective ``loss.candidates`` asks for; paper mode's catalogue-wide products run on
    ``kernel`` where given (``trainer.model.cpu_kernels.select``)."""
    if loss.candidates == "sampled":
        return CatalogObjective(encoder, table, teacher, model, train)
    return PaperObjective(encoder, table, teacher, model, train, kernel)
