"""What went non-finite, found by replaying the step: one line for the whole job.

When the guard has skipped a step (``trainer.runtime.engine.DivergenceGuard``: a loss, or a gradient
of the catalogue-wide losses, was NaN or infinite), training stops at its next host read. Before it
does, every rank replays its share of the first skipped step with the current weights (no
skipped step changed them): on the run's own path, then on the others (torch's products instead
of the CPU kernel; float32 instead of bf16), recording which loss and which gradient went
non-finite on each (``trainer.model.logpartition.recording_health``). Rank 0 turns the evidence into
one line: the step, the part, the path, and the setting under which the same batch and weights
were finite. "Lower train.lr" is said only when every path fails on finite weights.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from mqsa_core.collectives import all_gather_objects
from trainer.data.batches import StepBatch
from trainer.model.logpartition import recording_health
from trainer.model.objectives import Objective, PaperObjective

LOSS_NAMES = {"recommendation": "the recommendation loss", "TED": "the TED loss"}


@dataclass(frozen=True)
class ComputePath:
    """One way of computing the step: ``switch`` is the setting that selects it."""

    name: str
    switch: str
    kernel: object | None
    bf16: bool


@dataclass
class Replay:
    """What one path gave on this rank's share of the step."""

    finite: bool
    bad: list[str]  # "the TED loss's d/dtable", ...


def paths(objective: Objective, bf16: bool) -> list[ComputePath]:
    """The run's path first, then the ones a setting switches to."""
    kernel = getattr(objective, "kernel", None)
    precision = "bf16" if bf16 else "float32"
    own = ComputePath(("CPU kernel" if kernel else "torch") + f", {precision}", "", kernel, bf16)
    found = [own]
    if kernel is not None:
        found.append(ComputePath(f"torch, {precision}", "train.cpu_kernel=false", None, bf16))
    if bf16:
        found.append(ComputePath("torch, float32", "train.bf16=false", None, False))
    return found


@contextmanager
def on_path(objective: Objective, path: ComputePath) -> Iterator[Objective]:
    """``objective`` computing on ``path`` inside the block (its own path after it)."""
    saved = getattr(objective, "kernel", None), objective.train_cfg
    if hasattr(objective, "kernel"):
        objective.kernel = path.kernel
    objective.train_cfg = dataclasses.replace(saved[1], bf16=path.bf16)
    try:
        yield objective
    finally:
        if hasattr(objective, "kernel"):
            objective.kernel = saved[0]
        objective.train_cfg = saved[1]


def replay(objective: Objective, batch: StepBatch, path: ComputePath) -> Replay:
    """The step's forward pass (which computes the catalogue-wide gradients) on ``path``."""
    with on_path(objective, path), recording_health() as health:
        losses = objective(batch)
    bad = []
    for record in health:
        name = LOSS_NAMES[str(record["loss"])]
        name += " with the transition term" if record["bonus"] else ""
        bad += [f"{name}'s {key}" for key in ("value", "d/dqueries", "d/dtable", "d/dbonus")
                if record[key] is False]  # fmt: skip
    for part, value in (("the recommendation loss", losses.rec), ("the TED loss", losses.kd)):
        if not torch.isfinite(value).all() and not any(b.startswith(part) for b in bad):
            bad.append(f"{part}'s value")
    return Replay(bool(torch.isfinite(losses.total).all()), bad)


def weights_finite(objective: Objective) -> bool:
    """The dense weights and, in paper mode, the whole table (collective for a sharded one)."""
    tensors = [p.detach() for p in objective.parameters()]
    if isinstance(objective, PaperObjective):
        tensors.append(objective.table.all_items().detach())
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def diagnose(objective: Objective, batch: StepBatch, bf16: bool, lr: float) -> str:
    """Replay ``batch`` on every path (collective: every rank calls it at the same point) and
    return, on every rank, what failed and the setting most likely to help."""
    tried = paths(objective, bf16)
    with torch.no_grad():
        finite_weights = weights_finite(objective)
    local = [replay(objective, batch, path) for path in tried]
    gathered = all_gather_objects(([(r.finite, r.bad) for r in local], finite_weights))
    finite = [all(rank[0][i][0] for rank in gathered) for i in range(len(tried))]
    bad = [sorted({b for rank in gathered for b in rank[0][i][1]}) for i in range(len(tried))]
    if not all(rank[1] for rank in gathered):
        return (f"the weights are already non-finite on the {tried[0].name} path (a step that "
                "was not caught changed them); start again from a checkpoint")  # fmt: skip
    if not finite[0]:
        what = ", ".join(bad[0]) or "the loss"
        fix = next((p for p, ok in zip(tried[1:], finite[1:], strict=True) if ok), None)
        if fix is not None:
            return (f"not finite on the {tried[0].name} path: {what}; the same batch and weights "
                    f"are finite on the {fix.name} path: rerun with {fix.switch}")  # fmt: skip
        return (f"not finite on every path ({'; '.join(p.name for p in tried)}) with finite "
                f"weights: {what}; the model diverges at train.lr={lr:g}: lower train.lr or set "
                "train.grad_clip")  # fmt: skip
    others = [p.switch for p in tried[1:]]
    hint = f"try {' or '.join(others)}" if others else "lower train.lr or set train.grad_clip"
    return (f"a replay of the step on the {tried[0].name} path was finite (the failure depends "
            f"on state a replay does not recreate); {hint}")  # fmt: skip


def path_check(
    objective: Objective,
    batches: list[StepBatch],
    bf16: bool,
    tolerance: float,
    timed_losses: dict[str, float],
) -> tuple[bool, str]:
    """The speed benches' correctness check: ``(passed, the "check: ..." line)``. The run's path
    and torch's float32 path compute the summed loss of ``batches`` with the same weights and no
    dropout; it passes when ``timed_losses`` (the timed run's mean losses, by name) and the run's
    path are finite and the two differ by at most ``tolerance`` (relative)."""
    tried = paths(objective, bf16)
    timed, fp32 = tried[0], tried[-1]
    was_training = objective.training
    objective.eval()
    totals = []
    for path in (timed, fp32):
        with on_path(objective, path):
            totals.append(sum(float(objective(batch).total.detach()) for batch in batches))
    objective.train(was_training)
    difference = abs(totals[0] - totals[1]) / max(abs(totals[1]), 1e-12)
    finite = all(math.isfinite(v) for v in (*timed_losses.values(), totals[0]))
    passed = finite and difference <= tolerance
    shown = ", ".join(f"{name} {value:.4f}" for name, value in timed_losses.items())
    count = max(len(batches), 1)
    return passed, (
        f"check: timed mean loss {shown}; over {len(batches)} batches with the same weights the "
        f"timed path ({timed.name}) gives {totals[0] / count:.5f}, torch float32 "
        f"{totals[1] / count:.5f} per batch: relative difference {difference:.2e} (tolerance "
        f"{tolerance:g}): {'ok' if passed else 'FAILED'}"
    )
