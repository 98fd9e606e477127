"""Checkpoints: the DeepSpeed engine's own checkpoint, per-rank RNG and loss sums, trainer state.

Layout under the checkpoint root (``checkpoint.dir``, default ``<run_dir>/checkpoints``)::

    step-000000123/
        ds/...                  engine.save_checkpoint (weights + optimizer, per ZeRO stage)
        table/...               torch.distributed.checkpoint of a sharded item table and its
                                fused optimizer state (TorchRec backend only)
        rank-00000.pt           that rank's RNG state and partial-epoch loss sums (weights_only)
        trainer_state.json      epoch, step, best metrics, history, config hash, vocab size
        COMPLETE                written last, after every rank has finished: the commit marker

A directory without ``COMPLETE`` (a run killed while saving) is never loaded. Remote roots
(``s3://``...) are staged in a local directory and uploaded before the marker is written.
DeepSpeed's own files are pickles: load checkpoints only from runs you trust.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field

import fsspec
import torch
import torch.distributed.checkpoint as dcp

from core.collectives import barrier
from core.config import Config, config_hash
from core.storage import load_state, save_state, write_json
from trainer.distributed import DistEnv

COMPLETE = "COMPLETE"
DS_TAG = "ds"


TABLE_DIR = "table"


def sharded_state(table) -> dict:
    return {"table": table.state_dict(), "opt": table.fused_optimizer.state_dict()}


def load_sharded(table, checkpoint_id: str) -> None:
    """Load a DCP checkpoint of a sharded table and its fused optimizer state (any world size
    for row-wise sharding: DCP reshards)."""
    state = sharded_state(table)
    dcp.load(state, checkpoint_id=checkpoint_id)
    table.load_state_dict(state["table"])
    table.fused_optimizer.load_state_dict(state["opt"])


class CheckpointError(ValueError):
    """A checkpoint is missing, unfinished, or does not match the run's config or data."""


@dataclass
class TrainerState:
    """Where training stands; ``epoch``/``step_in_epoch`` point at the next batch to run."""

    epoch: int = 1
    step_in_epoch: int = 0
    global_step: int = 0
    stale: int = 0
    best: dict = field(default_factory=lambda: {"best_epoch": 0, "valid": {}, "test": {}})
    history: list = field(default_factory=list)


def _is_local(url: str) -> bool:
    fs, _ = fsspec.core.url_to_fs(url)
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


class Checkpointer:
    """Saves, finds and loads checkpoints of one run (all ranks call every method)."""

    def __init__(self, cfg: Config, env: DistEnv, num_items: int) -> None:
        self.cfg, self.env = cfg, env
        self.root = (cfg.checkpoint.dir or f"{cfg.train.run_dir}/checkpoints").rstrip("/")
        self.identity = {"config_hash": config_hash(cfg), "num_items": num_items}
        self.fs, self.root_path = fsspec.core.url_to_fs(self.root)

    def complete(self) -> list[str]:
        """Complete checkpoint paths under the root, oldest first."""
        if not self.fs.exists(self.root_path):
            return []
        dirs = sorted(
            p
            for p in self.fs.ls(self.root_path, detail=False)
            if p.rstrip("/").split("/")[-1].startswith("step-")
        )
        return [d for d in dirs if self.fs.exists(f"{d}/{COMPLETE}")]

    def save(self, engine, table, state: TrainerState, loss_sums: torch.Tensor) -> str:
        """Write a checkpoint of ``engine``, a sharded ``table`` and ``state``; returns its URL
        once committed."""
        name = f"step-{state.global_step:09d}"
        target = f"{self.root_path}/{name}"
        local = _is_local(self.root)
        staging = target if local else tempfile.mkdtemp(prefix="ckpt-")
        if self.env.is_main and self.fs.exists(target):
            self.fs.rm(target, recursive=True)  # an unfinished attempt at the same step
        barrier()
        engine.save_checkpoint(staging, tag=DS_TAG, save_latest=False)
        if table.has_fused_optimizer:
            dcp.save(sharded_state(table), checkpoint_id=f"{staging}/{TABLE_DIR}")
        rank_state = {
            "rng": torch.get_rng_state(),
            "loss_sums": loss_sums.detach().cpu(),
            "world": self.env.world,
        }
        if self.env.device.type == "cuda":
            rank_state["cuda_rng"] = torch.cuda.get_rng_state(self.env.device)
        save_state(f"{staging}/rank-{self.env.rank:05d}.pt", rank_state)
        if self.env.is_main:
            write_json(
                f"{staging}/trainer_state.json", {**dataclasses.asdict(state), **self.identity}
            )
        barrier()
        if not local:
            self.fs.put(f"{staging}/", target, recursive=True)
            shutil.rmtree(staging, ignore_errors=True)
        if self.env.is_main:
            write_json(f"{target}/{COMPLETE}", {"world": self.env.world, "step": state.global_step})
            for old in self.complete()[: -self.cfg.checkpoint.keep]:
                self.fs.rm(old, recursive=True)
        barrier()
        return target

    def resolve(self, resume: str) -> str | None:
        """The checkpoint to resume from: ``auto`` = newest complete one (None if there is none)."""
        if resume == "auto":
            done = self.complete()
            return done[-1] if done else None
        fs, path = fsspec.core.url_to_fs(resume)
        if not fs.exists(f"{path}/{COMPLETE}"):
            raise CheckpointError(f"{resume} is not a complete checkpoint (no {COMPLETE} marker)")
        return path

    def load(self, engine, table, path: str) -> tuple[TrainerState, torch.Tensor]:
        """Restore ``engine`` from ``path``; returns the trainer state and this rank's loss sums."""
        with self.fs.open(f"{path}/trainer_state.json", "r") as f:
            saved = json.load(f)
        for key, value in self.identity.items():
            if saved.get(key) != value:
                raise CheckpointError(
                    f"checkpoint {path} does not match this run: {key} is {saved.get(key)!r} "
                    f"there and {value!r} here (different config data/model sections or vocab)"
                )
        local_dir = path if _is_local(self.root) else tempfile.mkdtemp(prefix="ckpt-")
        if local_dir != path:
            self.fs.get(f"{path}/", local_dir, recursive=True)
        load_path, _ = engine.load_checkpoint(local_dir, tag=DS_TAG)
        if load_path is None:
            raise CheckpointError(f"DeepSpeed found no checkpoint in {path}/{DS_TAG}")
        if table.has_fused_optimizer:
            load_sharded(table, f"{local_dir}/{TABLE_DIR}")
        loss_sums = torch.zeros(2, dtype=torch.float64)
        rank_file = f"{local_dir}/rank-{self.env.rank:05d}.pt"
        if os.path.exists(rank_file):
            rank_state = load_state(rank_file)
            if rank_state["world"] == self.env.world:  # same layout: resume the exact streams
                torch.set_rng_state(rank_state["rng"])
                if "cuda_rng" in rank_state and self.env.device.type == "cuda":
                    torch.cuda.set_rng_state(rank_state["cuda_rng"], self.env.device)
                loss_sums = rank_state["loss_sums"]
        state = TrainerState(
            **{k: saved[k] for k in (f.name for f in dataclasses.fields(TrainerState))}
        )
        return state, loss_sums


BEST_TABLE = "best_table-e"


def save_best(run_dir: str, model, table, epoch: int, env: DistEnv) -> None:
    """Keep the best-validation weights: ``model.pt`` (dense part, plus the table when it is
    dense) and, for a sharded table, ``best_table-eNNNNN/`` (DCP, each rank its shard, with a
    COMPLETE marker; the previous one is deleted once the new one is committed)."""
    if env.is_main:
        save_state(f"{run_dir}/model.pt", {k: v.cpu() for k, v in model.state_dict().items()})
    if not table.has_fused_optimizer:
        return
    target = f"{run_dir}/{BEST_TABLE}{epoch:05d}"
    dcp.save({"table": table.state_dict()}, checkpoint_id=target)
    barrier()
    if env.is_main:
        fs, root = fsspec.core.url_to_fs(run_dir)
        write_json(f"{target}/{COMPLETE}", {"epoch": epoch, "world": env.world})
        for old in fs.glob(f"{root}/{BEST_TABLE}*"):
            if not old.endswith(f"{BEST_TABLE}{epoch:05d}"):
                fs.rm(old, recursive=True)
    barrier()


def load_best_table(run_dir: str, table) -> str:
    """Load the newest complete ``best_table-e*`` of ``run_dir`` into a sharded ``table``
    (any world size: DCP reshards); returns its path."""
    fs, root = fsspec.core.url_to_fs(run_dir)
    done = sorted(p for p in fs.glob(f"{root}/{BEST_TABLE}*") if fs.exists(f"{p}/{COMPLETE}"))
    if not done:
        raise CheckpointError(f"{run_dir} holds no complete {BEST_TABLE}* snapshot")
    state = {"table": table.state_dict()}
    dcp.load(state, checkpoint_id=done[-1])
    table.load_state_dict(state["table"])
    return done[-1]
