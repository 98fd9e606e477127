"""The training loop over a built run (``trainer.runtime.builder``): epochs of prefetched batches,
evaluation, best-validation selection, early stopping, checkpoints, run outputs.

The step never reads a value back to the host: the loss sums stay on the device and a
non-finite step is skipped there (``trainer.runtime.engine.DivergenceGuard``). The host reads happen
only where something is logged: every ``train.log_every`` steps and at the end of an epoch
(``host_reads``).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from itertools import islice

import torch

from mqsa_core.collectives import all_gather_objects, all_reduce_sum
from mqsa_core.log import get_logger
from mqsa_core.prepared import read_stats
from mqsa_core.progress import RunEta, progress
from mqsa_core.storage import save_state
from trainer.data.batches import StepBatch
from trainer.data.prefetch import prefetched
from trainer.evaluation.evaluate import evaluate
from trainer.runtime.builder import Run
from trainer.runtime.checkpoint import TrainerState, save_best
from trainer.runtime.diagnose import diagnose
from trainer.runtime.interrupt import Interrupted, StopRequests, signal_name
from trainer.runtime.run_dir import RunDir
from trainer.runtime.schedule import planned_epochs
from trainer.runtime.tracking import Tracker

log = get_logger(__name__)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good weights were saved."""


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
    """Loops over a :class:`~trainer.runtime.builder.Run` built by ``build_run``."""

    def __init__(self, run: Run) -> None:
        self.run, self.cfg, self.env = run, run.cfg, run.env
        self.users, self.table, self.model = run.users, run.table, run.objective
        self.engine, self.guard, self.checkpointer = run.engine, run.guard, run.checkpointer
        self.run_dir = RunDir(self.cfg.train.run_dir)
        stats = read_stats(self.cfg.data.dir)  # what a warm start from this run checks
        self.data_info = {"dir": self.cfg.data.dir, "version": stats.get("version"),
                          "items": self.users.num_items}  # fmt: skip
        # [rec, kd] summed over this epoch's steps on this rank, on the device
        self.loss_sums = torch.zeros(2, dtype=torch.float64, device=run.device)
        self.stop = StopRequests()  # SIGINT/SIGTERM: stop after a step, checkpoint (fit)
        self.last_checkpoint: tuple[tuple[int, int], str] | None = None
        steps = self.users.steps_per_epoch()  # wall-clock ETAs (progress) and the trackers
        self.eta = RunEta(planned_epochs(self.cfg.train, steps), steps, self.cfg.train.patience)
        self.tracker = Tracker(self.cfg, self.env.is_main, run.lr_factor,
                               self.table.has_fused_optimizer)  # fmt: skip
        log.info(
            f"data: {self.users.num_users} users, {self.users.num_items} items, max_len "
            f"{self.cfg.data.max_len}; world {self.env.world} on {self.env.device}; "
            f"{torch.get_num_threads()} threads/rank; " + self.users.describe()
        )
        if self.users.num_eval_users < self.users.num_users:
            sample, total = self.users.num_eval_users, self.users.num_users
            log.info(f"evaluation: a seeded sample of {sample} of {total} users "
                     "(train.eval_users), the same every time")  # fmt: skip

    def step_batches(
        self, epoch: int, start_step: int = 0, stop_step: int | None = None
    ) -> Iterator[StepBatch]:
        """This rank's batches of ``epoch`` from ``start_step`` (up to ``stop_step``: the
        epoch's end), built and moved to the device ahead of the step
        (``trainer.data.prefetch``)."""
        sequences = self.users.train_batches(epoch, start_step)
        if stop_step is not None:
            sequences = islice(sequences, stop_step - start_step)
        items = ((train, epoch, start_step + i) for i, train in enumerate(sequences))
        return prefetched(items, lambda item: self.run.batches(*item), self.env.device)

    def train_step(self, batch: StepBatch, step: int) -> None:
        """Optimiser step ``step`` (0-based, global) on this rank's share of a global batch (no
        host read)."""
        if self.run.lr_factor is not None:  # the dense rate follows DeepSpeed's scheduler
            self.table.scale_learning_rate(self.run.lr_factor(step))
        losses = self.engine(batch)
        self.guard.observe(losses.total, step)  # a non-finite step is skipped on the device
        self.engine.backward(losses.total)
        self.engine.step()
        self.loss_sums += torch.stack([losses.rec, losses.kd]).double()

    def host_reads(self, steps: int) -> tuple[float, float]:
        """The values the log shows, read from the device: mean ``(rec, kd)`` over the last
        ``steps`` steps of all ranks. Raises :class:`TrainingDiverged` if a step was skipped for
        a non-finite loss."""
        skipped = self.guard.skipped()
        if skipped:
            raise TrainingDiverged(f"{skipped} step(s) had a non-finite loss")
        rec, kd = (all_reduce_sum(self.loss_sums) / self.env.world / max(steps, 1)).tolist()
        return rec, kd

    def train_epoch(self, state: TrainerState) -> dict[str, float]:
        """Run the rest of epoch ``state.epoch`` from batch ``state.step_in_epoch``, checkpointing
        every ``checkpoint.every`` steps; returns the epoch's record (mean losses, seconds)."""
        start = time.perf_counter()
        self.eta.start(state.global_step)
        self.tracker.start(state.global_step)
        self.model.train()
        steps = self.users.steps_per_epoch()
        if budget := self.cfg.train.max_steps:  # the epoch ends where the step budget does
            steps = min(steps, budget - (state.global_step - state.step_in_epoch))
        every, log_every = self.cfg.checkpoint.every, self.cfg.train.log_every
        bar = progress(
            self.step_batches(state.epoch, state.step_in_epoch, steps),
            total=steps - state.step_in_epoch,
            desc=self.eta.title(state.epoch),
            enabled=self.cfg.train.progress and self.env.is_main,
            run_left=self.eta.remaining(state.epoch),
        )
        for batch in bar:
            self.train_step(batch, state.global_step)
            state.step_in_epoch += 1
            state.global_step += 1
            if log_every and state.global_step % log_every == 0:
                rec, kd = self.host_reads(state.step_in_epoch)
                bar.set_postfix(rec=f"{rec:.4f}", kd=f"{kd:.4f}")
                self.tracker.log_step(state.global_step, self.loss_record(rec, kd))
            if every and state.global_step % every == 0 and state.step_in_epoch < steps:
                self.host_reads(state.step_in_epoch)  # never checkpoint a diverged run
                self.checkpoint(state)
            if state.step_in_epoch < steps and (signum := self.stop.agreed()):
                self.host_reads(state.step_in_epoch)
                raise self.interrupted(signum, state, self.checkpoint(state))
        rec, kd = self.host_reads(steps)
        self.loss_sums.zero_()
        return {
            "epoch": state.epoch,
            **self.loss_record(rec, kd),
            "seconds": time.perf_counter() - start,
        }

    def loss_record(self, rec: float, kd: float) -> dict[str, float]:
        """The logged losses: the total (rec + ``model.lambda_kd`` x kd) and its two parts."""
        return {"loss": rec + self.cfg.model.lambda_kd * kd, "loss_rec": rec, "loss_kd": kd}

    def checkpoint(self, state: TrainerState) -> str:
        """A checkpoint of where training stands (its URL); the one just written when nothing
        ran since (an interrupt right after a periodic checkpoint)."""
        position = (state.epoch, state.global_step)
        if self.last_checkpoint is None or self.last_checkpoint[0] != position:
            url = self.checkpointer.save(self.engine, self.table, state, self.loss_sums)
            self.last_checkpoint = (position, url)
        return self.last_checkpoint[1]

    def evaluate(self) -> dict[str, dict[str, float]]:
        start = time.perf_counter()
        show = self.cfg.train.progress and self.env.is_main
        train = self.cfg.train
        result = evaluate(
            self.model.encoder, self.table, self.users, train.eval_batch_size, show,
            train.eval_protocol, train.length_groups, self.run.batches.teacher,
        )  # fmt: skip
        result["eval_seconds"] = time.perf_counter() - start
        if "transition_scale" in result:  # saved with the weights, for export and recommend
            self.model.encoder.transition_scale.fill_(result["transition_scale"])
        return result

    def save_weights(self, name: str) -> None:
        if self.env.is_main:
            state = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
            save_state(self.run_dir.path(name), state)

    def start_state(self) -> TrainerState:
        """Where this run starts (``train.resume``): ``auto``, the newest complete checkpoint
        of this run if there is one (a checkpoint of other data or model settings is refused,
        naming them); ``fresh``, the start, after deleting this run's checkpoints; else the
        checkpoint named."""
        resume = self.cfg.train.resume
        if resume == "fresh":
            removed = self.checkpointer.clear()
            if removed:
                log.info(f"train.resume=fresh: deleted {removed} checkpoint(s) of an earlier run "
                         f"under {self.checkpointer.root}")  # fmt: skip
            return TrainerState()
        path = self.checkpointer.resolve(resume)
        if path is None:
            return TrainerState()
        state, loss_sums, read = self.checkpointer.load(self.engine, self.table, path)
        self.loss_sums = loss_sums.to(self.loss_sums.device)
        mib = ", ".join(f"{b / 2**20:.2f}" for b in all_gather_objects(read))
        log.info(f"resumed from {path}: epoch {state.epoch}, step {state.step_in_epoch} "
                 f"(MiB read by rank: {mib})")  # fmt: skip
        return state

    def interrupted(self, signum: int, state: TrainerState, url: str) -> Interrupted:
        """The one line of a run stopped by ``signum`` after its checkpoint ``url``."""
        steps = self.users.steps_per_epoch()
        return Interrupted(
            signum,
            f"interrupted by {signal_name(signum)} at epoch {state.epoch}, step "
            f"{state.step_in_epoch} of {steps}; checkpoint {url}; rerun the same command to "
            "resume",
        )

    def divergence_report(self, state: TrainerState, error: TrainingDiverged) -> str:
        """One line for the whole job: which step, what went non-finite on which path, the
        setting under which a replay of that step was finite (``trainer.runtime.diagnose``), where
        the last good weights are. Collective."""
        first = self.guard.first_skipped_step()
        step = first - (state.global_step - state.step_in_epoch)  # in this epoch
        batch = next(self.step_batches(state.epoch, step))
        self.model.train()
        finding = diagnose(self.model, batch, self.cfg.train.bf16, self.cfg.train.lr)
        return (
            f"training stopped at epoch {state.epoch}, step {step + 1} of "
            f"{self.users.steps_per_epoch()} (global step {first + 1}): {finding}. {error}, "
            f"all skipped; the last good weights: {self.run_dir.path('last_good.pt')}"
        )

    def planned_epochs(self) -> int:
        """``train.epochs``, raised so that at least ``train.min_steps`` steps run, cut where
        ``train.max_steps`` ends."""
        steps = self.users.steps_per_epoch()
        epochs = planned_epochs(self.cfg.train, steps)
        train = self.cfg.train
        if epochs > train.epochs:
            log.info(f"train.min_steps={train.min_steps}: {steps} steps per epoch, "
                     f"training up to {epochs} epochs, not {train.epochs}")  # fmt: skip
        if train.max_steps and train.max_steps < epochs * steps:
            log.info(f"train.max_steps={train.max_steps}: {steps} steps per epoch, the run "
                     f"stops at step {train.max_steps}, in epoch {epochs}")  # fmt: skip
        return epochs

    def fit(self) -> dict:
        """Train, evaluate every ``eval_every`` epochs, keep the best-validation weights."""
        with self.stop, self.tracker:
            return self.train_and_evaluate()

    def train_and_evaluate(self) -> dict:
        cfg = self.cfg.train
        state = self.start_state()
        if self.env.is_main:
            self.run_dir.write_config(self.cfg)
        epochs = self.planned_epochs()
        if state.epoch > epochs or cfg.patience and state.stale >= cfg.patience:
            log.info(f"this run has already ended (epoch {state.epoch - 1} of {epochs}): nothing "
                     "to train; raise train.epochs to go on, or set train.resume=fresh to start "
                     "over")  # fmt: skip
        while state.epoch <= epochs and not (cfg.patience and state.stale >= cfg.patience):
            try:
                record = self.train_epoch(state)
            except TrainingDiverged as e:
                self.save_weights("last_good.pt")
                raise TrainingDiverged(self.divergence_report(state, e)) from e
            if state.epoch % cfg.eval_every == 0 or state.epoch == epochs:
                record.update(self.evaluate())
                if record["valid"]["NDCG@20"] > state.best["valid"].get("NDCG@20", -1.0):
                    state.best = {
                        "best_epoch": state.epoch,
                        "valid": record["valid"],
                        "test": record["test"],
                    }
                    if "transition_scale" in record:
                        state.best["transition_scale"] = record["transition_scale"]
                    state.stale = 0
                    save_best(self.cfg.train.run_dir, self.model, self.table, self.guard.optimizer,
                              state.epoch, self.env)  # fmt: skip
                else:
                    state.stale += 1
            state.history.append(record)
            self.tracker.log_epoch(record, state.global_step)
            log.info(format_epoch(record))
            self.eta.epoch_done(state.global_step)
            log.info(self.eta.line(state.epoch))
            self.write_metrics(state, [])
            state.epoch, state.step_in_epoch = state.epoch + 1, 0
            url = self.checkpoint(state)
            if signum := self.stop.agreed():
                raise self.interrupted(signum, state, url)
        if cfg.patience and state.stale >= cfg.patience:
            log.info(f"early stop: no better valid NDCG@20 in {state.stale} evaluations")
        warnings = self.final_warnings(state)
        for warning in warnings:
            log.warning(warning)
        return self.write_metrics(state, warnings)

    def final_warnings(self, state: TrainerState) -> list[str]:
        """What the user should know about how training ended (kept in metrics.json)."""
        evaluated = [r["epoch"] for r in state.history if "valid" in r]
        if evaluated and state.best["best_epoch"] == evaluated[-1] and len(evaluated) > 1:
            return [
                f"valid NDCG@20 was still improving at the last epoch ({evaluated[-1]}): the "
                "model may be under-trained; raise train.epochs or train.min_steps"
            ]
        return []

    def write_metrics(self, state: TrainerState, warnings: list[str]) -> dict:
        """``metrics.json``: the protocol, the best epoch's metrics, every epoch, warnings."""
        metrics = {"protocol": self.cfg.train.eval_protocol, "data": self.data_info, **state.best,
                   "epochs": state.history, "warnings": warnings}  # fmt: skip
        if self.env.is_main:
            self.run_dir.write_metrics(metrics)
        return metrics
