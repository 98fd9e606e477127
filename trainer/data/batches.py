"""Training batches as the step consumes them: built on the host, moved to the device in one go.

Everything whose SIZE depends on the data is decided here, on the host, before the step: which
slots hold real items, which teacher edges the batch's heads have, which negatives are drawn,
which distinct rows the item table must fetch. The step on the device then runs only ops of
known shapes (gathers with these indices), so it never waits for the device to tell the host
a size (no ``nonzero``, ``unique`` or boolean-mask indexing in the step).

Shapes: ``B`` users (this rank's share of the global batch), ``T`` slots (the longest
sequence of the batch), ``P`` real positions (= TED heads), ``K`` candidates, ``E`` teacher
edges of the heads, ``U`` distinct item rows the step reads, ``S`` slots the encoder runs
(the sum over length groups of ``B_g x T_g``).

Length groups: most users are much shorter than the longest user of their batch, so the
encoder runs on the batch's users sorted by length in a few groups, each trimmed to its own
longest user (:func:`length_groups`): the same outputs at the real slots (padding never reaches
them), a fraction of the slots (Beauty, 4 groups: 3,600 instead of 11,500 per batch of 256).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from mqsa_core.collectives import all_gather_rows, distributed, loader_group
from trainer.data.samplers import NegativeSampler
from trainer.data.sequences import TrainRows
from trainer.data.teacher import SparseTeacher


@dataclass
class StepBatch:
    """One rank's share of a global batch, ready for the step.

    Attributes:
        inputs: ``[B, T]`` int64 input items (padding id N), right-aligned: slot ``T - 1`` is
            position ``max_len - 1``.
        positions: ``[P]`` int64 flat slot index ``b * T + t`` of every real input item (these
            slots are scored, and their items are the TED heads).
        targets: ``[P]`` int64 the next item at each position.
        weights: ``[P]`` float32 each position's weight in both losses: 1, or
            ``train.new_target_weight`` where the target is new since the base.
        counts: ``[1]`` float64 the sum of ``weights``: this rank's part of the loss normalisers
            (the step sums it over ranks on the device).
        rows: ``[U]`` int64 distinct item ids the step reads from the table.
        inputs_row: ``[B, T]`` int64 index into ``rows`` of each input (``U`` at padding: the zero
            row appended by the objective).
        targets_row: ``[P]`` index into ``rows`` of each target.
        cand_row: ``[K]`` index into ``rows`` of each candidate (catalogue mode, else empty).
        cand_log_q: ``[K]`` float32 log expected multiplicity of each candidate.
        cand_ids: ``[K]`` int64 candidate ids (accidental-hit masking).
        edge_head: ``[E]`` int64 index into the ``P`` heads of each teacher edge (TED, else
            empty).
        edge: ``[E]`` int64 index into the teacher's edge arrays.
        succ_row: ``[E]`` index into ``rows`` of each edge's successor.
        edge_succ: ``[E]`` int64 each edge's successor id.
        edge_is_target: ``[E]`` bool, the successor is its position's target.
        hit_head, hit_cand: ``[A]`` int64: candidate ``hit_cand`` is a successor of head
            ``hit_head`` (catalogue TED counts it exactly, not as a sample).
        hit_edge: ``[A]`` int64 the teacher edge (index into the ``E`` edges) of each hit.
        group_rows: ``[B]`` int64 the users in encoder order (by length, group after group).
        grouped_positions: ``[P]`` int64 index of each real position in the encoder's output
            ``[S, D]`` (see :func:`length_groups`).
        host_rows: ``rows`` kept on the host (a sharded table's bookkeeping reads it there);
            not moved by ``to``.
        group_shapes: ``((B_g, T_g), ...)`` host ints: users and slots of each length group.
    """

    inputs: torch.Tensor
    positions: torch.Tensor
    targets: torch.Tensor
    weights: torch.Tensor
    counts: torch.Tensor
    rows: torch.Tensor
    inputs_row: torch.Tensor
    targets_row: torch.Tensor
    cand_row: torch.Tensor
    cand_log_q: torch.Tensor
    cand_ids: torch.Tensor
    edge_head: torch.Tensor
    edge: torch.Tensor
    succ_row: torch.Tensor
    edge_succ: torch.Tensor
    edge_is_target: torch.Tensor
    hit_head: torch.Tensor
    hit_cand: torch.Tensor
    hit_edge: torch.Tensor
    group_rows: torch.Tensor
    grouped_positions: torch.Tensor
    host_rows: torch.Tensor
    group_shapes: tuple[tuple[int, int], ...]

    def _map(self, fn) -> StepBatch:
        host = ("host_rows", "group_shapes")
        moved = {f.name: fn(getattr(self, f.name)) for f in dataclasses.fields(self)
                 if f.name not in host}  # fmt: skip
        return StepBatch(**moved, host_rows=self.host_rows, group_shapes=self.group_shapes)

    def pin_memory(self) -> StepBatch:
        """Page-locked host copies, so the device copy can be asynchronous."""
        return self._map(lambda t: t.pin_memory())

    def to(self, device: torch.device, non_blocking: bool = False) -> StepBatch:
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    @property
    def mask(self) -> torch.Tensor:
        """``[B, T]`` bool, True at real input items (derived on the batch's device)."""
        return self.inputs_row != self.rows.shape[0]


def accidental_hits(
    edge_head: torch.Tensor, succ: torch.Tensor, cand_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Host-side: every ``(head, candidate position)`` where candidate ``cand_ids[k]`` is a
    successor ``succ[e]`` of head ``edge_head[e]``: ``(head [A], candidate [A], edge [A])``."""
    order = cand_ids.argsort()
    ordered = cand_ids[order]
    start = torch.searchsorted(ordered, succ)
    count = torch.searchsorted(ordered, succ, right=True) - start  # [E]
    edge = torch.repeat_interleave(torch.arange(succ.numel()), count)
    within = torch.arange(edge.numel()) - torch.repeat_interleave(count.cumsum(0) - count, count)
    return edge_head[edge], order[start[edge] + within], edge


@dataclass
class LengthGroups:
    """Users of a right-aligned ``[B, T]`` batch in encoder order (host).

    Attributes:
        rows: ``[B]`` user indices sorted by length, group after group.
        shapes: ``((B_g, T_g), ...)`` each group's users and its longest user's length.
        slot_base: ``[B]`` int64 such that slot ``t`` of user ``b`` is row
            ``slot_base[b] + t`` of the encoder's output ``[S, D]`` (for ``t >= T - T_g``).
    """

    rows: torch.Tensor
    shapes: tuple[tuple[int, int], ...]
    slot_base: torch.Tensor

    def positions(self, flat: torch.Tensor, width: int) -> torch.Tensor:
        """``[P]`` output rows of the flat slot indices ``b * width + t``."""
        return self.slot_base[flat // width] + flat % width


def length_groups(mask: torch.Tensor, groups: int) -> LengthGroups:
    """Split the users of a host ``mask [B, T]`` (True at real slots, right-aligned) into at
    most ``groups`` groups of consecutive lengths (equal counts)."""
    batch, width = mask.shape
    lengths = mask.sum(1)
    order = lengths.argsort(stable=True)
    slot_base = torch.zeros(batch, dtype=torch.int64)
    shapes, offset = [], 0
    for part in order.tensor_split(max(1, min(groups, batch))):
        if part.numel() == 0:
            continue
        length = max(1, int(lengths[part].max()))
        slot_base[part] = offset + torch.arange(part.numel()) * length - (width - length)
        shapes.append((part.numel(), length))
        offset += part.numel() * length
    return LengthGroups(order, tuple(shapes) or ((0, 1),), slot_base)  # no users: one empty


def trim(seqs: torch.Tensor, pad: int) -> torch.Tensor:
    """Drop the leading all-padding columns of a right-aligned host ``[B, M]`` matrix (keeps at
    least one column)."""
    real = (seqs != pad).any(dim=0)
    first = int(real.nonzero()[0]) if bool(real.any()) else seqs.shape[1] - 1
    return seqs[:, first:]


class BatchBuilder:
    """Host side of a training step: cut train sequences ``[B, M]`` -> :class:`StepBatch`.

    Input = train[:-1], target = train[1:] (METHOD.md), trimmed to the longest sequence; the
    teacher edges of every head (TED), the step's candidates (catalogue mode), the distinct
    rows to read and each position's weight (``new_target_weight`` where the target is new since
    the base of an incremental prepare, else 1) are found here.
    """

    def __init__(
        self,
        num_items: int,
        teacher: SparseTeacher | None = None,
        sampler: NegativeSampler | None = None,
        groups: int = 1,
        new_target_weight: float = 1.0,
    ) -> None:
        self.pad = num_items
        self.teacher = teacher
        self.sampler = sampler
        self.groups = groups
        self.new_target_weight = new_target_weight

    def __call__(self, users: TrainRows | torch.Tensor, epoch: int = 0, step: int = 0) -> StepBatch:
        """The batch of ``users`` (or of bare cut train sequences ``[B, M]``: no target is
        new) at ``(epoch, step)`` (seeds the step's candidate draws)."""
        if not isinstance(users, TrainRows):
            users = TrainRows(users, torch.zeros(users.shape[0], dtype=torch.int64))
        train, pad = users.items, self.pad
        shifted = torch.full_like(train, pad)
        shifted[:, 1:] = train[:, :-1]
        inputs = trim(shifted, pad)  # [B, T]
        targets_full = train[:, train.shape[1] - inputs.shape[1] :]  # [B, T]
        real_slots = inputs != pad  # [B, T]
        positions = real_slots.flatten().nonzero().squeeze(1)  # [P]
        targets = targets_full.flatten()[positions]  # [P]
        heads = inputs.flatten()[positions]  # [P]
        weights = torch.ones(positions.numel())  # [P]
        if self.new_target_weight != 1.0:
            width = inputs.shape[1]  # right-aligned: a user's last n targets fill the last n slots
            is_new = torch.arange(width) >= width - users.new_targets.unsqueeze(1)  # [B, T]
            weights[is_new.flatten()[positions]] = self.new_target_weight
        empty = torch.zeros(0, dtype=torch.int64)
        cand_ids, cand_log_q = empty, torch.zeros(0)
        if self.sampler is not None:
            # the same candidates on every rank: in-batch draws come from the GLOBAL batch
            in_batch = self.sampler.uses_targets and distributed()
            pool = all_gather_rows(targets, loader_group())[0] if in_batch else targets
            cands = self.sampler.sample(pool, self.sampler.generator(epoch, step))
            cand_ids, cand_log_q = cands.ids, cands.log_q
        edge_head, edge, succ = empty, empty, empty
        if self.teacher is not None:
            edge_head, edge = self.teacher.edges_of(heads)
            succ = self.teacher.dst[edge]
        hit_head, hit_cand, hit_edge = accidental_hits(edge_head, succ, cand_ids)
        groups = [inputs.flatten(), targets, cand_ids, succ]
        flat = torch.cat(groups)
        real = flat != pad
        rows, inverse = flat[real].unique(return_inverse=True)  # [U], sorted
        index = torch.full_like(flat, rows.numel())
        index[real] = inverse
        inputs_row, targets_row, cand_row, succ_row = index.split([g.numel() for g in groups])
        encoder_groups = length_groups(real_slots, self.groups)
        return StepBatch(
            inputs=inputs,
            positions=positions,
            targets=targets,
            weights=weights,
            counts=weights.sum(dtype=torch.float64).reshape(1),
            rows=rows,
            inputs_row=inputs_row.view_as(inputs),
            targets_row=targets_row,
            cand_row=cand_row,
            cand_log_q=cand_log_q,
            cand_ids=cand_ids,
            edge_head=edge_head,
            edge=edge,
            succ_row=succ_row,
            edge_succ=succ,
            edge_is_target=succ == targets[edge_head],
            hit_head=hit_head,
            hit_cand=hit_cand,
            hit_edge=hit_edge,
            group_rows=encoder_groups.rows,
            grouped_positions=encoder_groups.positions(positions, inputs.shape[1]),
            host_rows=rows,
            group_shapes=encoder_groups.shapes,
        )
