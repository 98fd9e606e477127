"""The training loop: epochs of shuffled user batches, evaluation, early stopping, run outputs."""

from __future__ import annotations

import os
import time

import torch
from tqdm import tqdm

from embeddings.dense import DenseItemTable
from trainer.checkpoint import Checkpointer, TrainerState, save_best
from trainer.config import Config
from trainer.data import load_transitions, training_batch
from trainer.distributed import DistEnv, all_reduce_sum
from trainer.engine import build_engine
from trainer.evaluate import evaluate
from trainer.mqsa_ted import MQSATED
from trainer.run_dir import RunDir, save_state
from trainer.samplers import NegativeSampler
from trainer.teacher import SparseTeacher
from trainer.user_source import build_user_source


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good weights were saved."""


def set_threads(cfg: Config, env: DistEnv) -> None:
    """Split this machine's cores between the local processes unless ``train.threads`` is set."""
    threads = cfg.train.threads or max(1, (os.cpu_count() or 1) // env.local_world)
    torch.set_num_threads(threads)


def format_epoch(record: dict) -> str:
    """One log line per epoch: losses, seconds and (when evaluated) the headline metrics."""
    line = (
        f"epoch {record['epoch']:3d} | loss {record['loss']:.4f} (rec {record['loss_rec']:.4f},"
        f" kd {record['loss_kd']:.4f}) | {record['seconds']:.1f} s"
    )
    if "valid" in record:
        valid, test = record["valid"], record["test"]
        line += (
            f" | eval {record['eval_seconds']:.1f} s | valid NDCG@20 {valid['NDCG@20']:.4f}"
            f" | test HR@5 {test['HR@5']:.4f} NDCG@5 {test['NDCG@5']:.4f}"
            f" HR@10 {test['HR@10']:.4f} NDCG@10 {test['NDCG@10']:.4f}"
        )
    return line


class Trainer:
    """Paper-mode trainer (dense item table in the DeepSpeed engine)."""

    def __init__(self, cfg: Config, env: DistEnv) -> None:
        self.cfg, self.env = cfg, env
        set_threads(cfg, env)
        self.users = build_user_source(cfg, env.rank, env.world)
        num_items = self.pad = self.users.num_items
        self.teacher = None
        if cfg.model.lambda_kd > 0:
            src, dst, count = load_transitions(cfg.data.dir)
            self.teacher = SparseTeacher.from_edges(src, dst, count, num_items, cfg.model.tau)
        sampler = None
        if cfg.loss.candidates == "sampled":
            sampler = NegativeSampler.from_config(cfg, num_items)
        if cfg.embeddings.backend == "torchrec":
            from embeddings.torchrec_table import TorchRecItemTable  # imports fbgemm: only if used

            self.table = TorchRecItemTable.from_config(cfg, num_items, cfg.train.seed)
        else:
            self.table = DenseItemTable(num_items, cfg.model.dim, seed=cfg.train.seed)
        torch.manual_seed(cfg.train.seed)  # the same encoder weights on every rank and world size
        dense_table = self.table if cfg.embeddings.backend == "dense" else None
        self.model = MQSATED(cfg, cfg.data.max_len, dense_table, sampler)
        self.engine = build_engine(self.model, cfg, env)
        torch.manual_seed(cfg.train.seed + 7919 * env.rank)  # dropout differs per rank
        self.run_dir = RunDir(cfg.train.run_dir)
        self.checkpointer = Checkpointer(cfg, env, num_items)
        self.loss_sums = torch.zeros(2, dtype=torch.float64)  # [rec, kd] of this epoch, this rank
        self.log(
            f"data: {self.users.num_users} users, {num_items} items, max_len "
            f"{cfg.data.max_len}; world {env.world}; {torch.get_num_threads()} threads/rank; "
            + self.users.describe()
        )

    def log(self, message: str) -> None:
        if self.env.is_main:
            tqdm.write(message)

    def train_step(self, train: torch.Tensor) -> torch.Tensor:
        """One optimiser step on this rank's share ``[b, M]`` of a global batch (cut train
        sequences); returns ``[rec, kd]`` of this rank."""
        positions = torch.tensor(float((train[:, :-1] != self.pad).sum()))
        norm = float(all_reduce_sum(positions)) / self.env.world  # DeepSpeed averages over ranks
        batch = training_batch(train, self.pad)
        losses = self.engine(batch, self.teacher, norm, norm, self.table)
        if not torch.isfinite(losses.total):
            raise TrainingDiverged(f"loss is {losses.total.item()}")
        self.engine.backward(losses.total)
        self.engine.step()
        return torch.stack([losses.rec, losses.kd])

    def train_epoch(self, state: TrainerState) -> dict[str, float]:
        """Run the rest of epoch ``state.epoch`` from batch ``state.step_in_epoch``, checkpointing
        every ``checkpoint.every`` steps; returns the epoch's record (mean losses, seconds)."""
        start = time.perf_counter()
        self.model.train()
        steps = self.users.steps_per_epoch()
        every = self.cfg.checkpoint.every
        bar = tqdm(
            self.users.train_batches(state.epoch, state.step_in_epoch),
            total=steps - state.step_in_epoch,
            desc=f"epoch {state.epoch}",
            disable=not (self.cfg.train.progress and self.env.is_main),
            leave=False,
        )
        for train in bar:
            self.loss_sums += self.train_step(train)
            state.step_in_epoch += 1
            state.global_step += 1
            if every and state.global_step % every == 0 and state.step_in_epoch < steps:
                self.checkpointer.save(self.engine, self.table, state, self.loss_sums)
        rec, kd = (all_reduce_sum(self.loss_sums) / self.env.world / steps).tolist()
        self.loss_sums.zero_()
        return {
            "epoch": state.epoch,
            "loss": rec + self.cfg.model.lambda_kd * kd,
            "loss_rec": rec,
            "loss_kd": kd,
            "seconds": time.perf_counter() - start,
        }

    def evaluate(self) -> dict[str, dict[str, float]]:
        start = time.perf_counter()
        progress = self.cfg.train.progress and self.env.is_main
        result = evaluate(
            self.model.encoder, self.table, self.users, self.cfg.train.eval_batch_size, progress
        )
        result["eval_seconds"] = time.perf_counter() - start
        return result

    def save_weights(self, name: str) -> None:
        if self.env.is_main:
            save_state(self.run_dir.path(name), self.model.state_dict())

    def start_state(self) -> TrainerState:
        """A fresh state, or the one of the checkpoint ``train.resume`` names."""
        resume = self.cfg.train.resume
        path = self.checkpointer.resolve(resume) if resume else None
        if path is None:
            if resume:
                self.log(f"resume=auto: no complete checkpoint under {self.checkpointer.root}")
            return TrainerState()
        state, self.loss_sums = self.checkpointer.load(self.engine, self.table, path)
        self.log(f"resumed from {path}: epoch {state.epoch}, step {state.step_in_epoch}")
        return state

    def fit(self) -> dict:
        """Train, evaluate every ``eval_every`` epochs, keep the best-validation weights."""
        cfg = self.cfg.train
        if self.env.is_main:
            self.run_dir.write_config(self.cfg)
        state = self.start_state()
        while state.epoch <= cfg.epochs and not (cfg.patience and state.stale >= cfg.patience):
            try:
                record = self.train_epoch(state)
            except TrainingDiverged as e:
                self.save_weights("last_good.pt")
                raise TrainingDiverged(
                    f"epoch {state.epoch}: {e}; stopped, the last good weights are in "
                    f"{self.run_dir.path('last_good.pt')} (lower train.lr?)"
                ) from e
            if state.epoch % cfg.eval_every == 0 or state.epoch == cfg.epochs:
                record.update(self.evaluate())
                if record["valid"]["NDCG@20"] > state.best["valid"].get("NDCG@20", -1.0):
                    state.best = {
                        "best_epoch": state.epoch,
                        "valid": record["valid"],
                        "test": record["test"],
                    }
                    state.stale = 0
                    save_best(self.cfg.train.run_dir, self.model, self.table, state.epoch, self.env)
                else:
                    state.stale += 1
            state.history.append(record)
            self.log(format_epoch(record))
            if self.env.is_main:
                self.run_dir.write_metrics({**state.best, "epochs": state.history})
            state.epoch, state.step_in_epoch = state.epoch + 1, 0
            self.checkpointer.save(self.engine, self.table, state, self.loss_sums)
        if cfg.patience and state.stale >= cfg.patience:
            self.log(f"early stop: no better valid NDCG@20 in {state.stale} evaluations")
        return {**state.best, "epochs": state.history}
