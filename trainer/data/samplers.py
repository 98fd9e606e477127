"""Shared negative candidates for catalogue mode, each with its log-Q correction.

A candidate set is a list of item ids drawn for the whole (per-rank) batch, shared by every
position and every distillation head. ``log_q[k]`` is the log of the EXPECTED number of times
``ids[k]`` appears in the set, so ``sum_k exp(s_k - log_q[k])`` is an unbiased estimate of
``sum_j exp(s_j)`` over the items the sampler can reach:

- ``uniform``: K draws from ``0..N-1``: ``log(K / N)``.
- ``popularity``: K draws with probability ``p_j = count_j / sum(count)``: ``log(K p_j)``.
- ``in_batch``: K draws of the global batch's real targets (positions picked uniformly), i.e.
  item j with its in-batch frequency ``c_j / P``: ``log(K c_j / P)``.
- ``mixed``: K/2 popularity draws plus K - K/2 in-batch draws; every candidate gets the
  mixture's expected count ``log(K1 p_j + K2 c_j / P)`` (balance-heuristic importance sampling),
  so the union still estimates the sum once, not twice.
- ``global_batch``: every real target of the global batch once (the in-batch negatives of the
  whole global batch, no draw) plus K popularity draws: ``log(K p_j + c_j)``.
- ``all``: every item once, ``log_q = 0``: the exact full softmax (paper mode's candidate set).

The sampler is data-side: the batch builder draws on the host, in the prefetching loader, and
the candidates travel to the device with the batch (so the step never waits on a draw, and a
CPU and a GPU run of the same seed see the same candidates). Each step's draws come from a
generator seeded by ``(seed, epoch, step)`` and in-batch draws from the targets of the whole
global batch (gathered by the reader thread over its own gloo group): every rank scores the same
candidates, shared across ranks, the same whatever the world size, and a resumed run draws the
same ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mqsa_core.config import SAMPLERS, LossConfig
from mqsa_core.prepared import VOCAB, read_dataset


@dataclass
class Candidates:
    """A shared candidate set.

    Attributes:
        ids: ``[K]`` int64 item ids (repeats allowed).
        log_q: ``[K]`` float32 log expected multiplicity of each id in the set.
    """

    ids: torch.Tensor
    log_q: torch.Tensor


def load_item_counts(data_dir: str, num_items: int) -> torch.Tensor:
    """Event counts per item index from ``vocab/`` (columns ``index``, ``count``): ``[N]``."""
    table = read_dataset(data_dir, VOCAB, ["index", "count"])
    counts = torch.zeros(num_items, dtype=torch.float64)
    index = torch.from_numpy(table.column("index").to_numpy().astype("int64"))
    counts[index] = torch.from_numpy(table.column("count").to_numpy().astype("float64"))
    return counts


def occurrences(values: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """How often each of ``ids`` (``[K]``) occurs in ``values`` (``[P]``): ``[K]`` int64.

    Two binary searches in the sorted values: no data-dependent shapes."""
    ordered = values.sort().values
    right = torch.searchsorted(ordered, ids, right=True)
    return right - torch.searchsorted(ordered, ids)


class NegativeSampler:
    """Draws the shared candidate set of one step (see the module docstring for the kinds)."""

    def __init__(
        self,
        kind: str,
        num_items: int,
        num_negatives: int,
        counts: torch.Tensor | None = None,
        seed: int = 0,
    ) -> None:
        """
        Args:
            kind: one of ``mqsa_core.config.SAMPLERS`` (``all`` included).
            counts: ``[N]`` item popularity (``popularity`` and ``mixed`` only).
            seed: the base seed of every step's generator (use the same on every rank).
        """
        if kind not in (*SAMPLERS, "all"):
            raise ValueError(f"unknown sampler {kind!r} (known: {', '.join(SAMPLERS)}, all)")
        if kind in ("popularity", "mixed", "global_batch"):
            if counts is None or counts.shape != (num_items,):
                raise ValueError(f"sampler {kind!r} needs item counts of shape [{num_items}]")
            self.probs = counts.to(torch.float64) / counts.sum()  # [N]
            self.cdf = self.probs.cumsum(0)  # [N]
        self.kind = kind
        self.num_items = num_items
        self.num_negatives = num_negatives
        self.seed = seed

    @classmethod
    def from_config(
        cls, loss: LossConfig, data_dir: str, num_items: int, seed: int
    ) -> NegativeSampler:
        """``loss.sampler`` with ``loss.num_negatives``; popularity from ``<data_dir>/vocab``;
        seeded with ``seed`` (``train.seed``: identical on every rank)."""
        kind = loss.sampler
        counts = (
            load_item_counts(data_dir, num_items)
            if kind in ("popularity", "mixed", "global_batch")
            else None
        )
        return cls(kind, num_items, loss.num_negatives, counts, seed=seed)

    @property
    def uses_targets(self) -> bool:
        """Whether the draws depend on the batch's targets (in-batch kinds)."""
        return self.kind in ("in_batch", "mixed", "global_batch")

    def generator(self, *stream: int) -> torch.Generator:
        """The generator of one step: seeded by ``(seed, *stream)`` (e.g. epoch, step)."""
        value = self.seed
        for part in stream:
            value = (value * 1_000_003 + part) % (1 << 62)
        return torch.Generator().manual_seed(value)

    def popular(self, k: int, gen: torch.Generator) -> torch.Tensor:
        """``k`` draws with probability ``probs`` (inverse CDF: O(k log N), no O(N) pass)."""
        u = torch.rand(k, dtype=torch.float64, generator=gen) * self.cdf[-1]
        return torch.searchsorted(self.cdf, u, right=True).clamp(max=self.num_items - 1)

    @staticmethod
    def _in_batch(targets: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
        """``k`` of the targets, positions drawn uniformly with replacement."""
        if targets.numel() == 0:
            return targets.new_empty(0)
        return targets[torch.randint(targets.numel(), (k,), generator=gen)]

    def sample(self, targets: torch.Tensor, gen: torch.Generator | None = None) -> Candidates:
        """The candidate set of one step (host tensors).

        Args:
            targets: ``[P]`` the real next-item targets of the global batch (in-batch kinds).
            gen: this step's generator (default: ``generator()``, the base seed).
        """
        gen = gen if gen is not None else self.generator()
        k, n = self.num_negatives, self.num_items
        if self.kind == "all":
            return Candidates(torch.arange(n), torch.zeros(n))
        if self.kind == "uniform":
            ids = torch.randint(n, (k,), generator=gen)
            return Candidates(ids, torch.full((k,), math.log(k / n)))
        if self.kind == "popularity":
            ids = self.popular(k, gen)
            return Candidates(ids, (k * self.probs[ids]).log().float())
        if self.kind == "global_batch":
            ids = torch.cat([self.popular(k, gen), targets])
            expected = k * self.probs[ids] + occurrences(targets, ids)
            return Candidates(ids, expected.log().float())
        num_targets = max(targets.numel(), 1)
        if self.kind == "in_batch":
            ids = self._in_batch(targets, k, gen)
            expected = k * occurrences(targets, ids).double() / num_targets
            return Candidates(ids, expected.log().float())
        k_pop = k // 2
        k_batch = k - k_pop if targets.numel() else 0
        ids = torch.cat([self.popular(k_pop, gen), self._in_batch(targets, k_batch, gen)])
        expected = k_pop * self.probs[ids] + k_batch * occurrences(targets, ids) / num_targets
        return Candidates(ids, expected.log().float())
