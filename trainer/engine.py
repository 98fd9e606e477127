"""Wraps the dense model in a DeepSpeed engine (ZeRO stage from config, torch Adam passed in)."""

from __future__ import annotations

import logging

import deepspeed
import torch
from torch import nn

from trainer.config import Config
from trainer.distributed import DistEnv


def build_engine(model: nn.Module, cfg: Config, env: DistEnv) -> deepspeed.DeepSpeedEngine:
    """DeepSpeed engine around ``model`` with ``torch.optim.Adam`` (or SGD, ``train.optimizer``).

    The paper adds ``l2 * sum(w^2) / 2`` over all trainable tensors to the loss; its gradient is
    ``l2 * w``, which is exactly Adam's (coupled) ``weight_decay = l2``, so it is applied there
    instead of materialising the sum every step. A torch optimizer is passed in because a
    config-named one would JIT-compile FusedAdam.
    """
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    kind = torch.optim.Adam if cfg.train.optimizer == "adam" else torch.optim.SGD
    optimizer = kind(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.model.l2)
    micro = max(1, cfg.train.batch_size // env.world)
    ds_config = {
        "train_micro_batch_size_per_gpu": micro,
        "train_batch_size": micro * env.world,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": cfg.distributed.zero_stage},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    return engine
