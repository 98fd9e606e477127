"""The multi-query self-attention encoder of MQSA-TED (METHOD.md, "Encoder").

Shapes: ``B`` users, ``T`` sequence slots (left-padded, right-aligned so the newest item is in
the last slot), ``D`` embedding width. Inside, the encoder works on PACKED slots: the users in
length groups (``trainer.data.batches.length_groups``), each group trimmed to its longest user, one
group after the other as ``[S, D]`` rows (``S = sum_g B_g * T_g``). Everything but attention and
the window mean's running sum is row-wise, so it runs once over all groups; those two run per
group on ``[B_g, T_g, D]`` views of the packed rows. The plain ``[B, T, D]`` pass is one group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from mqsa_core.config import ModelConfig

NEG_INF = -(2.0**32) + 1.0  # the reference's mask value: finite, so fully masked rows stay finite
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Inverted dropout, ``p`` rounded to a multiple of 1/65536.

    The keep mask compares random 16-bit words with a threshold: one 64-bit draw gives four
    words, ~3x cheaper on CPU than a float uniform draw per element (~10x than the
    ``bernoulli_`` of ``F.dropout``).
    """
    if not training or p == 0.0:
        return x
    dropped = min(round(p * 65536), 65535)  # of the 65536 values of a word, this many drop
    draws = torch.empty((x.numel() + 3) // 4, dtype=torch.int64, device=x.device)
    words = draws.random_(_INT64_MIN, _INT64_MAX).view(torch.int16)[: x.numel()].view(x.shape)
    keep = (words >= dropped - 32768).to(x.dtype)  # P(keep) = 1 - dropped / 65536
    return x * keep.mul_(65536 / (65536 - dropped))


class Dropout(nn.Module):
    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)


@dataclass
class PackedLayout:
    """Where each user's slots sit in the packed ``[S, D]`` rows; built once per forward pass
    (device tensors from host shapes: nothing is read back).

    Attributes:
        groups: ``(B_g, T_g)`` per group (host ints).
        gather: ``[S]`` each packed slot's flat index ``b * T + t`` in the ``[B, T]`` batch.
        mask: ``[S, 1]`` float, 1 at real items.
        last: ``[B]`` each user's newest slot, group after group.
        back: ``[S]`` the slot ``window`` steps back in the same user (slot 0 where there is
            none); ``has_back``: ``[S, 1]`` float, 1 where there is one.
        window_count: ``[S, 1]`` real items in each slot's window (at least 1).
        blocked: per group ``[B_g, T_g, T_g]`` bool, True where a query may not see a key (a
            later slot or padding); ``blocked_last``: per group ``[B_g, 1, T_g]`` (padding).
    """

    groups: tuple[tuple[int, int], ...]
    gather: torch.Tensor
    mask: torch.Tensor
    last: torch.Tensor
    back: torch.Tensor
    has_back: torch.Tensor
    window_count: torch.Tensor
    blocked: list[torch.Tensor]
    blocked_last: list[torch.Tensor]

    @property
    def sizes(self) -> list[int]:
        """``[B_g * T_g]`` each group's packed rows (``_group_sizes``)."""
        return _group_sizes(self.groups)

    @staticmethod
    def build(
        mask: torch.Tensor,
        rows: torch.Tensor,
        shapes: tuple[tuple[int, int], ...],
        window: int,
    ) -> PackedLayout:
        """Args: mask ``[B, T]`` bool, True at real items (right-aligned); rows ``[B]`` the
        users in group order; shapes ``(B_g, T_g)`` per group (host), ``T_g <= T``."""
        width, device = mask.shape[1], mask.device
        gathers, steps, lasts = [], [], []
        slot = user = 0
        for count, length in shapes:
            step = torch.arange(length, device=device)  # [T_g]
            users = rows[user : user + count].unsqueeze(1)  # [B_g, 1]
            gathers.append((users * width + (width - length) + step).flatten())
            steps.append(step.repeat(count))
            lasts.append(slot + length - 1 + torch.arange(count, device=device) * length)
            slot, user = slot + count * length, user + count
        gather, step = torch.cat(gathers), torch.cat(steps)  # [S]: step = slot inside its user
        real = mask.flatten().index_select(0, gather)  # [S]
        has_back = step >= window
        back = torch.where(has_back, torch.arange(slot, device=device) - window, 0)
        mask_f, has_back_f = real.unsqueeze(1).float(), has_back.unsqueeze(1).float()  # [S, 1]
        running = _per_user_cumsum(mask_f, shapes)  # [S, 1]
        blocked, blocked_last = [], []
        for part, (count, length) in zip(real.split(_group_sizes(shapes)), shapes, strict=True):
            padding = ~part.view(count, 1, length)
            later = torch.ones(length, length, dtype=torch.bool, device=device).triu(1)
            blocked.append(later | padding)  # [B_g, T_g, T_g]
            blocked_last.append(padding)  # [B_g, 1, T_g]
        return PackedLayout(
            groups=tuple(shapes),
            gather=gather,
            mask=mask_f,
            last=torch.cat(lasts),
            back=back,
            has_back=has_back_f,
            window_count=(running - running.index_select(0, back) * has_back_f).clamp(min=1.0),
            blocked=blocked,
            blocked_last=blocked_last,
        )


def _group_sizes(groups: tuple[tuple[int, int], ...]) -> list[int]:
    """``[B_g * T_g]`` each group's packed rows: the sizes to ``split`` packed tensors by (a
    split's backward is one cat; each slice's would zero-fill a whole ``[S, D]`` gradient)."""
    return [count * length for count, length in groups]


def _join(parts: list[torch.Tensor]) -> torch.Tensor:
    """The groups' packed parts as one ``[S, ...]`` tensor (no copy for a single group)."""
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def _per_user_cumsum(x: torch.Tensor, groups: tuple[tuple[int, int], ...]) -> torch.Tensor:
    """``[S, C]`` running sum of packed rows ``x [S, C]`` over each user's own slots."""
    parts = x.split(_group_sizes(groups))
    return _join([
        part.view(count, length, x.shape[-1]).cumsum(dim=1).flatten(0, 1)
        for part, (count, length) in zip(parts, groups, strict=True)
    ])  # fmt: skip


def window_mean(x: torch.Tensor, layout: PackedLayout) -> torch.Tensor:
    """Mean of packed rows ``x [S, D]`` over the last ``window`` slots of the same user ending
    at each slot, padding excluded (slots whose window holds no real item give zeros)."""
    running = _per_user_cumsum(x * layout.mask, layout.groups)  # [S, D]
    total = running - running.index_select(0, layout.back) * layout.has_back
    return total / layout.window_count


class AttentionBlock(nn.Module):
    """One block of single-head causal self-attention with the reference's residual layout."""

    def __init__(self, dim: int, dropout: float) -> None:
        super().__init__()
        self.query_norm = nn.LayerNorm(dim, eps=1e-8)
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_norm = nn.LayerNorm(dim, eps=1e-8)
        self.ffn = nn.Sequential(
            nn.Linear(dim, dim),
            nn.ReLU(),
            Dropout(dropout),
            nn.Linear(dim, dim),
            Dropout(dropout),
        )
        self.attn_dropout = Dropout(dropout)

    def forward(
        self, query: torch.Tensor, x: torch.Tensor, layout: PackedLayout, last_only: bool
    ) -> torch.Tensor:
        """
        Args:
            query: packed query source (the item itself, or the long-query window mean):
                ``[S, D]``, or ``[B, D]`` at each user's newest slot with ``last_only``.
            x: ``[S, D]`` packed block input (keys and values come from it, un-normalised).
        Returns:
            Like ``query``; zero at padding slots.
        """
        q_norm = self.query_norm(query)
        q = self.q_proj(q_norm) * (1.0 / math.sqrt(q_norm.shape[-1]))
        k, v = self.k_proj(x), self.v_proj(x)
        dim = q.shape[-1]
        keys, values = k.split(layout.sizes), v.split(layout.sizes)
        queries = q.split([count for count, _ in layout.groups] if last_only else layout.sizes)
        blocked = layout.blocked_last if last_only else layout.blocked
        parts = []
        for g, (count, length) in enumerate(layout.groups):
            q_g = queries[g].view(count, 1 if last_only else length, dim)  # [B_g, Tq, D]
            scores = q_g @ keys[g].view(count, length, dim).transpose(1, 2)  # [B_g, Tq, T_g]
            attn = torch.softmax(scores.masked_fill(blocked[g], NEG_INF), dim=-1)
            parts.append(
                (self.attn_dropout(attn) @ values[g].view(count, length, dim)).flatten(0, 1)
            )
        out = _join(parts) + q_norm
        out = self.out_norm(out)
        out = out + self.ffn(out)
        return out * (layout.mask.index_select(0, layout.last) if last_only else layout.mask)


class MQSAEncoder(nn.Module):
    """Short-query and long-query branches over the same sequence, mixed by ``alpha``.

    ``forward`` returns the mixed query ``alpha * h_short + (1 - alpha) * h_long`` so the scores
    against the item table are ONE matrix product. With ``model.transition_term`` the encoder
    also holds the scalar ``transition_weight`` that :mod:`trainer.model.transition_term` applies.
    """

    def __init__(self, cfg: ModelConfig, max_len: int) -> None:
        super().__init__()
        self.dim = cfg.dim
        self.window = cfg.L
        self.alpha = cfg.alpha
        self.max_len = max_len
        self.positions = nn.Parameter(torch.randn(max_len, cfg.dim) * 0.01)
        self.input_dropout = Dropout(cfg.dropout)
        self.short_blocks = nn.ModuleList(
            AttentionBlock(cfg.dim, cfg.dropout) for _ in range(cfg.num_blocks)
        )
        self.long_blocks = nn.ModuleList(
            AttentionBlock(cfg.dim, cfg.dropout) for _ in range(cfg.num_blocks)
        )
        self.short_norm = nn.LayerNorm(cfg.dim, eps=1e-8)
        self.long_norm = nn.LayerNorm(cfg.dim, eps=1e-8)
        for module in self.modules():
            if isinstance(module, nn.Linear):  # the reference's dense layers: Glorot, zero bias
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        # the transition term (model.transition_term; None when off): its learned weight w
        # ([1], not [], for DeepSpeed's broadcast) and the multiple of w that evaluation chose on
        # validation for ranking (trainer.evaluation.evaluate.TRANSITION_SCALES), kept for recommend
        term = cfg.transition_term
        self.register_parameter("transition_weight", nn.Parameter(torch.ones(1)) if term else None)
        self.register_buffer("transition_scale", torch.ones(1) if term else None)

    def _add_positions(self, x: torch.Tensor, layout: PackedLayout) -> torch.Tensor:
        """Packed ``x [S, D]`` plus each slot's position row (the newest slot of a user gets
        ``max_len - 1``): a broadcast add per group, whose backward is a sum over its users."""
        parts = x.split(layout.sizes)
        return _join([
            (part.view(count, length, self.dim) + self.positions[self.max_len - length :])
            .flatten(0, 1)
            for part, (count, length) in zip(parts, layout.groups, strict=True)
        ])  # fmt: skip

    def forward(
        self, item_emb: torch.Tensor, mask: torch.Tensor, last_only: bool = False
    ) -> torch.Tensor:
        """The whole batch as one group.

        Args:
            item_emb: ``[B, T, D]`` item-table rows of the sequence (zeros at padding),
                ``T <= max_len``, right-aligned: slot ``T - 1`` holds the newest item and gets
                position ``max_len - 1``.
            mask: ``[B, T]`` bool, True at real items.
            last_only: compute only the newest slot's output (inference): ``[B, 1, D]``. The
                last block then runs one query row instead of T; earlier blocks run in full.
        Returns:
            ``[B, T, D]`` mixed query vectors (``[B, 1, D]`` with ``last_only``); zeros where
            ``mask`` is False are not guaranteed: callers select the real slots.
        """
        batch, width = mask.shape
        users = torch.arange(batch, device=mask.device)
        slots = torch.arange(batch * width, device=mask.device).view(batch, width)
        groups = ((batch, width),)
        hidden = self.forward_groups(item_emb.flatten(0, 1), slots, mask, users, groups, last_only)
        return hidden.view(batch, 1 if last_only else width, self.dim)

    def forward_groups(
        self,
        item_rows: torch.Tensor,
        slots: torch.Tensor,
        mask: torch.Tensor,
        rows: torch.Tensor,
        shapes: tuple[tuple[int, int], ...],
        last_only: bool = False,
    ) -> torch.Tensor:
        """The encoder over length groups of the batch (``trainer.data.batches.length_groups``):
        each group's users, trimmed to its longest user. Real slots get exactly what one pass
        over the whole batch gives them (padding never reaches a real slot).

        Args:
            item_rows: ``[R, D]`` item-table rows (a zero row for padding among them).
            slots: ``[B, T]`` int64, the row of ``item_rows`` at each slot (right-aligned).
            mask: ``[B, T]`` bool, True at real items.
            rows: ``[B]`` the users in group order; shapes: ``(B_g, T_g)`` per group (host).
            last_only: as in :meth:`forward`.
        Returns:
            ``[S, D]`` every group's slots, group after group (``S = sum B_g * T_g``), or with
            ``last_only`` ``[B, D]`` each user's newest slot, in ``rows`` order.
        """
        layout = PackedLayout.build(mask, rows, shapes, self.window)
        # one gather from the table rows (no [B, T, D] copy: its backward would zero-fill it)
        emb = item_rows.index_select(0, slots.flatten().index_select(0, layout.gather))  # [S, D]
        x = self.input_dropout(self._add_positions(emb * math.sqrt(self.dim), layout))
        x = x * layout.mask
        h_short, h_long = x, x
        last = len(self.short_blocks) - 1
        for i, block in enumerate(self.short_blocks):
            at_last = last_only and i == last
            query = h_short.index_select(0, layout.last) if at_last else h_short
            h_short = block(query, h_short, layout, at_last)
        for i, block in enumerate(self.long_blocks):
            at_last = last_only and i == last
            query = window_mean(h_long, layout)
            query = query.index_select(0, layout.last) if at_last else query
            h_long = block(query, h_long, layout, at_last)
        return self.alpha * self.short_norm(h_short) + (1.0 - self.alpha) * self.long_norm(h_long)
