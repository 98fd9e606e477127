"""The multi-query self-attention encoder of MQSA-TED (METHOD.md, "Encoder").

Shapes: ``B`` users, ``T`` sequence slots (left-padded, right-aligned so the newest item is in
the last slot), ``D`` embedding width.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from core.config import ModelConfig

NEG_INF = -(2.0**32) + 1.0  # the reference's mask value: finite, so fully masked rows stay finite


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Inverted dropout, same distribution as ``F.dropout`` but ~3x faster on CPU (a uniform
    draw and a compare instead of ``bernoulli_``)."""
    if not training or p == 0.0:
        return x
    keep = torch.rand_like(x) >= p
    return x * keep.to(x.dtype) / (1.0 - p)


class Dropout(nn.Module):
    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)


def window_mean(x: torch.Tensor, mask: torch.Tensor, window: int) -> torch.Tensor:
    """Mean of ``x`` over the last ``window`` slots ending at each slot, padding excluded.

    Args:
        x: ``[B, T, D]`` (padding slots may hold anything; they are masked out).
        mask: ``[B, T]`` bool, True at real items.
    Returns:
        ``[B, T, D]``; slots whose window holds no real item give zeros.
    """
    m = mask.to(x.dtype).unsqueeze(-1)  # [B, T, 1]
    csum = F.pad((x * m).cumsum(dim=1), (0, 0, 1, 0))  # [B, T + 1, D]
    ccount = F.pad(m.cumsum(dim=1), (0, 0, 1, 0))  # [B, T + 1, 1]
    hi = torch.arange(1, x.shape[1] + 1, device=x.device)
    lo = (hi - window).clamp(min=0)
    total = csum[:, hi] - csum[:, lo]  # [B, T, D]
    count = ccount[:, hi] - ccount[:, lo]  # [B, T, 1]
    return total / count.clamp(min=1.0)


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

    def forward(self, query: torch.Tensor, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """
        Args:
            query: ``[B, Tq, D]`` query source (the item itself, or the long-query window mean)
                for the LAST ``Tq <= T`` slots (``Tq = 1``: only the newest slot, as inference
                needs).
            x: ``[B, T, D]`` block input (keys and values come from it, un-normalised).
            mask: ``[B, T]`` bool, True at real items.
        Returns:
            ``[B, Tq, D]``, zero at padding slots.
        """
        t, tq = x.shape[1], query.shape[1]
        q_mask = mask[:, t - tq :].unsqueeze(-1)  # [B, Tq, 1]
        q_norm = self.query_norm(query)
        q, k, v = self.q_proj(q_norm), self.k_proj(x), self.v_proj(x)
        scores = q @ k.transpose(1, 2) / math.sqrt(q.shape[-1])  # [B, Tq, T]
        causal = torch.ones(tq, t, dtype=torch.bool, device=x.device).tril(diagonal=t - tq)
        allowed = causal.unsqueeze(0) & mask.unsqueeze(1)  # key must be real and not in the future
        scores = scores.masked_fill(~allowed, NEG_INF)
        attn = torch.softmax(scores, dim=-1) * q_mask.to(scores.dtype)
        out = self.attn_dropout(attn) @ v + q_norm
        out = self.out_norm(out)
        out = out + self.ffn(out)
        return out * q_mask.to(out.dtype)


class MQSAEncoder(nn.Module):
    """Short-query and long-query branches over the same sequence, mixed by ``alpha``.

    ``forward`` returns the mixed query ``alpha * h_short + (1 - alpha) * h_long`` so the scores
    against the item table are ONE matrix product. With ``model.transition_term`` the encoder
    also holds the scalar ``transition_weight`` that :mod:`trainer.transition_term` applies.
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
        # validation for ranking (trainer.evaluate.TRANSITION_SCALES), kept for recommend
        term = cfg.transition_term
        self.register_parameter("transition_weight", nn.Parameter(torch.ones(1)) if term else None)
        self.register_buffer("transition_scale", torch.ones(1) if term else None)

    def forward(
        self, item_emb: torch.Tensor, mask: torch.Tensor, last_only: bool = False
    ) -> torch.Tensor:
        """
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
        t = item_emb.shape[1]
        pos = self.positions[self.max_len - t :]  # [T, D]
        x = self.input_dropout(item_emb * math.sqrt(self.dim) + pos)
        x = x * mask.unsqueeze(-1).to(x.dtype)
        h_short, h_long = x, x
        last = len(self.short_blocks) - 1
        for i, block in enumerate(self.short_blocks):
            query = h_short[:, -1:] if last_only and i == last else h_short
            h_short = block(query, h_short, mask)
        for i, block in enumerate(self.long_blocks):
            query = window_mean(h_long, mask, self.window)
            h_long = block(query[:, -1:] if last_only and i == last else query, h_long, mask)
        h_short = self.short_norm(h_short)
        h_long = self.long_norm(h_long)
        return self.alpha * h_short + (1.0 - self.alpha) * h_long

    def forward_groups(
        self,
        item_emb: torch.Tensor,
        mask: torch.Tensor,
        rows: torch.Tensor,
        shapes: tuple[tuple[int, int], ...],
        last_only: bool = False,
    ) -> torch.Tensor:
        """The encoder over length groups of the batch (``trainer.batches.length_groups``):
        each group's users, trimmed to its longest user, in one pass. Real slots get exactly
        what :meth:`forward` gives them on the whole batch (padding never reaches a real slot).

        Args:
            item_emb: ``[B, T, D]``; mask: ``[B, T]`` as in :meth:`forward`.
            rows: ``[B]`` the users in group order; shapes: ``(B_g, T_g)`` per group (host).
        Returns:
            ``[S, D]`` every group's slots, group after group (``S = sum B_g * T_g``), or with
            ``last_only`` ``[B, D]`` each user's newest slot, in ``rows`` order.
        """
        width, parts, start = item_emb.shape[1], [], 0
        for count, length in shapes:
            users = rows[start : start + count]
            start += count
            emb = item_emb.index_select(0, users)[:, width - length :]  # [B_g, T_g, D]
            hidden = self(emb, mask.index_select(0, users)[:, width - length :], last_only)
            parts.append(hidden.flatten(0, 1))  # [B_g * T_g, D] (last_only: [B_g, D])
        return torch.cat(parts)
