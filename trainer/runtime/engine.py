"""The DeepSpeed engine around the dense part of the model, and the guard that skips a
non-finite step on the device.

The paper adds ``l2 * sum(w^2) / 2`` over all trainable tensors to the loss; its gradient is
``l2 * w``, which is exactly Adam's (coupled) ``weight_decay = l2``, so it is applied there
instead of materialising the sum every step. A torch optimizer is passed in (a config-named one
would JIT-compile FusedAdam); on CPU and CUDA it is torch's fused kernel, which also takes a
device-side "skip this step" flag (``found_inf``), so a step whose loss is not finite changes no
weight and no optimizer state without the host ever reading the loss.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

from mqsa_core.collectives import all_reduce_sum
from mqsa_core.config import DistributedConfig, TrainConfig
from trainer.runtime.distributed import DistEnv

FUSED_DEVICES = ("cpu", "cuda")


def build_optimizer(
    model: nn.Module, train: TrainConfig, l2: float, device: torch.device
) -> torch.optim.Optimizer:
    """``train.optimizer`` (Adam or SGD) at ``train.lr`` over ``model``'s parameters, L2
    (``model.l2``) as weight decay; fused where torch has the kernel (CPU, CUDA)."""
    kind = torch.optim.Adam if train.optimizer == "adam" else torch.optim.SGD
    fused = {"fused": True} if device.type in FUSED_DEVICES else {}
    return kind(model.parameters(), lr=train.lr, weight_decay=l2, **fused)


def build_engine(
    model: nn.Module,
    train: TrainConfig,
    distributed: DistributedConfig,
    l2: float,
    env: DistEnv,
    lr_factor: Callable[[int], float] | None = None,
):
    """``(DeepSpeed engine around model, its torch optimizer)``: ``train.batch_size`` split over
    the ranks, ``train.grad_clip``, ZeRO stage ``distributed.zero_stage``; ``lr_factor(step)``
    scales ``train.lr`` (``trainer.runtime.schedule``; None: constant)."""
    import deepspeed

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    optimizer = build_optimizer(model, train, l2, env.device)
    micro = max(1, train.batch_size // env.world)
    clip = train.grad_clip
    zero = {"stage": distributed.zero_stage}
    if distributed.zero_stage > 0 and clip == 0:
        zero["compute_grad_norm"] = False  # no clipping: a norm would only cost a host read
    ds_config = {
        "train_micro_batch_size_per_gpu": micro,
        "train_batch_size": micro * env.world,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": clip,  # DeepSpeed's default is 1.0; the reference does not clip
        "zero_optimization": zero,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    scheduler = None
    if lr_factor is not None:  # trainer.runtime.schedule: warm-up, then constant or linear decay
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=ds_config, lr_scheduler=scheduler
    )
    return engine, optimizer


class DivergenceGuard:
    """Catches a non-finite loss without reading it on the host.

    ``observe(total)`` (every step, before the backward pass) sums "is this rank's loss not
    finite" over the ranks on the device and hands the result to the fused optimizer as its
    skip flag; a sharded table gates its own fused update with the same flag (``gate``). The
    count of skipped steps is read only where the trainer logs (``skipped``), and training stops
    there with the weights that no non-finite step has touched.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, device: torch.device) -> None:
        self.optimizer = optimizer
        self.skipped_steps = torch.zeros((), device=device)
        self.first_skipped = torch.full((), -1, dtype=torch.int64, device=device)  # global step
        self.flag = torch.zeros((), device=device)

    def observe(self, total: torch.Tensor, step: int = -1) -> torch.Tensor:
        """The device flag (1.0 = skip) of optimiser step ``step``, from its loss ``total`` (a
        gradient that is not finite makes the loss NaN: ``trainer.model.logpartition``)."""
        bad = all_reduce_sum((~torch.isfinite(total.detach())).reshape(1))
        self.flag = (bad > 0).to(self.skipped_steps.dtype).reshape(())
        if self.optimizer.defaults.get("fused"):
            self.optimizer.found_inf = self.flag
        self.skipped_steps += self.flag
        first = (self.flag > 0) & (self.first_skipped < 0)
        self.first_skipped = torch.where(first, step, self.first_skipped)
        return self.flag

    def gate(self, grad: torch.Tensor) -> torch.Tensor:
        """``grad``, or zeros if this step is skipped (a gradient hook for fused tables)."""
        return torch.where(self.flag > 0, torch.zeros_like(grad), grad)

    def skipped(self) -> int:
        """Steps skipped so far (a host read: call only where the trainer logs)."""
        return int(self.skipped_steps)

    def first_skipped_step(self) -> int:
        """The global step of the first skipped step, -1 if none (a host read)."""
        return int(self.first_skipped)
