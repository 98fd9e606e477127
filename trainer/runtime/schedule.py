"""The learning-rate schedule: one factor per optimizer step, applied to ``train.lr`` (the dense
part, through DeepSpeed's scheduler) and to a sharded table's fused optimizer alike.

- warm-up (``train.warmup_steps``): the factor rises linearly to 1 over the first steps;
- then ``train.lr_schedule``: ``constant`` (the paper) or ``linear``, falling to 0 at the run's
  last planned step. A warm-started day-two run is short and starts from a trained model: on
  Beauty it ends higher with a larger rate that decays than with a constant one
  (docs/results.md).
"""

from __future__ import annotations

from collections.abc import Callable

from mqsa_core.config import TrainConfig


def planned_epochs(train: TrainConfig, steps_per_epoch: int) -> int:
    """``train.epochs``, raised so that at least ``train.min_steps`` steps run, and cut to the
    epoch where ``train.max_steps`` ends (the last one possibly partial)."""
    epochs = max(train.epochs, -(-train.min_steps // steps_per_epoch))
    if train.max_steps:
        epochs = min(epochs, -(-train.max_steps // steps_per_epoch))
    return epochs


def planned_steps(train: TrainConfig, steps_per_epoch: int) -> int:
    """Optimizer steps of the whole run: the planned epochs', at most ``train.max_steps``."""
    steps = planned_epochs(train, steps_per_epoch) * steps_per_epoch
    return min(steps, train.max_steps) if train.max_steps else steps


def lr_factor(train: TrainConfig, total_steps: int) -> Callable[[int], float] | None:
    """The factor of step ``s`` (0-based) over a run of ``total_steps`` steps, or None when it
    is always 1 (no warm-up, constant schedule)."""
    warmup = train.warmup_steps
    if not warmup and train.lr_schedule == "constant":
        return None
    decay_steps = max(1, total_steps - warmup)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if train.lr_schedule == "linear":
            return max(0.0, (total_steps - step) / decay_steps)
        return 1.0

    return factor


def describe_schedule(train: TrainConfig, total_steps: int) -> str | None:
    """The log line of a non-constant schedule or of a warm-up longer than the run, else None."""
    warmup = train.warmup_steps
    if warmup >= total_steps > 0:
        return (f"warning: train.warmup_steps={warmup} is not shorter than the run's "
                f"{total_steps} steps: the rate never reaches train.lr (set it lower, e.g. 0 "
                "for a warm start)")  # fmt: skip
    if train.lr_schedule != "constant":
        return (f"learning rate: {train.lr_schedule} schedule after {warmup} warm-up steps, 0 "
                f"at step {total_steps}")  # fmt: skip
    return None
