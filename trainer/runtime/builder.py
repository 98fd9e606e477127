"""Builds a training run: every component, each placed on the run's device when it is built.

    run = build_run(cfg, env)     # users, table, teacher, batches, objective, engine, ...
    Trainer(run).fit()            # the trainer only loops

``build_components`` stops before the DeepSpeed engine (it is what the meta-device step test
builds: DeepSpeed itself moves models to its accelerator).

Where each part lives:

- the user source (``trainer.data.user_source``) and the batch builder (``trainer.data.batches``:
  the teacher's graph, the negative sampler) are data-side: host tensors, prefetched;
- the item table, the encoder, the teacher's probabilities and the objective live on
  ``env.device`` (``cuda:<local rank>`` under NCCL, the host under gloo).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from embeddings.base import ItemTable
from embeddings.factory import build_item_table
from mqsa_core.collectives import all_gather_objects
from mqsa_core.config import Config
from mqsa_core.log import get_logger
from trainer.data.batches import BatchBuilder
from trainer.data.samplers import NegativeSampler
from trainer.data.sequences import load_transitions
from trainer.data.teacher import SparseTeacher
from trainer.data.user_source import UserSource, build_user_source
from trainer.model import cpu_kernels
from trainer.model.cpu_kernels import CpuKernel
from trainer.model.encoder import MQSAEncoder
from trainer.model.objectives import Objective, build_objective
from trainer.runtime.checkpoint import Checkpointer
from trainer.runtime.distributed import DistEnv
from trainer.runtime.engine import DivergenceGuard, build_engine
from trainer.runtime.schedule import describe_schedule, lr_factor, planned_steps
from trainer.runtime.warm_start import warm_optimizer, warm_start

log = get_logger(__name__)


@dataclass
class Run:
    """One training run's parts (``engine`` and what follows are None until ``build_run``)."""

    cfg: Config
    env: DistEnv
    users: UserSource
    table: ItemTable
    batches: BatchBuilder
    objective: Objective
    engine: object | None = None  # deepspeed.DeepSpeedEngine around ``objective``
    guard: DivergenceGuard | None = None
    checkpointer: Checkpointer | None = None
    lr_factor: Callable[[int], float] | None = None  # trainer.runtime.schedule; None: constant rate

    @property
    def device(self) -> torch.device:
        return self.env.device


def set_threads(cfg: Config, env: DistEnv) -> None:
    """Split this machine's cores between the local processes unless ``train.threads`` is set."""
    threads = cfg.train.threads or max(1, (os.cpu_count() or 1) // env.local_world)
    torch.set_num_threads(threads)


def load_teacher(cfg: Config, num_items: int) -> SparseTeacher | None:
    """The transition graph from ``transitions/`` as the sparse TED teacher (host), or None
    when neither TED nor the transition term uses it."""
    if cfg.model.lambda_kd <= 0 and not cfg.model.transition_term:
        return None
    src, dst, count = load_transitions(cfg.data.dir)
    return SparseTeacher.from_edges(src, dst, count, num_items, cfg.model.tau)


def load_cpu_kernel(cfg: Config, env: DistEnv) -> CpuKernel | None:
    """The run's CPU kernel of the paper-mode log-partition (``trainer.model.cpu_kernels``) where it
    applies (catalogue-wide losses on CPU in bf16 with ``train.cpu_kernel``), built if needed and
    self-checked on every rank; None (torch's path) elsewhere or if any rank could not use it.
    Rank 0 logs one line saying what runs."""
    paper = cfg.loss.candidates != "sampled"
    if not (paper and cfg.train.bf16 and cfg.train.cpu_kernel and env.device.type == "cpu"):
        return None
    if cpu_kernels.missing() is None and not cpu_kernels.is_built():
        log.info("CPU kernel: building (once per source and machine, ~30 s)")
    kernel, message = cpu_kernels.select()
    messages = all_gather_objects(message)
    failed = [(rank, m) for rank, m in enumerate(messages) if m != cpu_kernels.LOADED]
    line = failed[0][1] if failed else message
    if len(failed) < env.world and failed or len({m for _, m in failed}) > 1:
        ranks = ", ".join(str(rank) for rank, _ in failed)
        line += f" (on rank(s) {ranks}; every rank takes torch's path)"
    log.info(line)
    return None if failed else kernel


def precision_note(cfg: Config, env: DistEnv) -> None:
    """Rank 0 notes when ``train.bf16`` runs on a CPU that only emulates bf16."""
    if env.device.type == "cpu" and cfg.train.bf16 and not cpu_kernels.native_bf16():
        log.info(
            "note: train.bf16 on a CPU without bf16 instructions (no avx512_bf16, amx_bf16 or "
            "bf16 in /proc/cpuinfo): torch emulates the bf16 products, slower than float32 here "
            "(docs/configuration.md, train.bf16); train.bf16=false is faster"
        )


def build_components(cfg: Config, env: DistEnv) -> Run:
    """Everything but the engine, on ``env.device``."""
    set_threads(cfg, env)
    kernel = load_cpu_kernel(cfg, env)
    precision_note(cfg, env)
    users = build_user_source(cfg.data, cfg.train, env.rank, env.world)
    num_items = users.num_items
    teacher = load_teacher(cfg, num_items)
    sampler = (
        NegativeSampler.from_config(cfg.loss, cfg.data.dir, num_items, cfg.train.seed)
        if cfg.loss.candidates == "sampled"
        else None
    )
    table = build_item_table(cfg.embeddings, cfg.model, num_items, cfg.train.seed, env.device)
    torch.manual_seed(cfg.train.seed)  # the same encoder weights on every rank, world and device
    encoder = MQSAEncoder(cfg.model, cfg.data.max_len).to(env.device)
    if cfg.train.init_from:
        log.info(warm_start(cfg, encoder, table))
    device_teacher = teacher.to(env.device) if teacher is not None else None
    objective = build_objective(
        cfg.loss, cfg.model, cfg.train, encoder, table, device_teacher, kernel
    )
    batches = BatchBuilder(
        num_items, teacher, sampler, cfg.train.length_groups, cfg.train.new_target_weight
    )
    return Run(cfg, env, users, table, batches, objective)


def build_run(cfg: Config, env: DistEnv) -> Run:
    """The whole run: components, the DeepSpeed engine and its guard, the checkpointer."""
    run = build_components(cfg, env)
    steps_per_epoch = run.users.steps_per_epoch()
    total_steps = planned_steps(cfg.train, steps_per_epoch)
    run.lr_factor = lr_factor(cfg.train, total_steps)
    note = describe_schedule(cfg.train, total_steps)
    if note:
        log.info(note)
    run.engine, optimizer = build_engine(
        run.objective, cfg.train, cfg.distributed, cfg.model.l2, env, run.lr_factor
    )
    run.guard = DivergenceGuard(optimizer, env.device)
    if cfg.train.init_from:
        log.info(warm_optimizer(cfg, run.objective, optimizer))
    if run.table.has_fused_optimizer:
        run.table.grad_gate = run.guard.gate  # a skipped step leaves the fused update out too
    torch.manual_seed(cfg.train.seed + 7919 * env.rank)  # dropout differs per rank
    run.checkpointer = Checkpointer(cfg, env, run.users.num_items)
    return run
