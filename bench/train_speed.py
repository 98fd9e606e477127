"""Seconds per training epoch and per full evaluation, paper mode, with an in-process baseline.

    python bench/train_speed.py --data data/beauty [--config configs/beauty.yaml] [--bf16]
        [--set train.cpu_kernel=false ...]

The baseline is a step written the way the reference code computes it: scores at all B x M
slots (padding included) as one autograd ``[B*M, N]`` matrix, and the TED teacher as dense
``N``-wide rows of the ``N x N`` transition matrix. It runs ``--baseline-steps`` steps on the
same batches and model, and its epoch time is extrapolated from them. It also prints the minor
page faults per step (first touches of fresh memory) of the warm-up epoch and the timed ones.

Correctness beside the speed: the timed epochs' mean loss, and the loss of ``--check-batches``
batches computed on the timed path (bf16, the CPU kernel where it runs) and on torch's float32
path with the same weights (dropout off). The bench exits 1 when a loss is not finite or the two
differ by more than ``--tolerance`` (relative; bf16 rounds each score to 2^-8).
"""

from __future__ import annotations

import argparse
import math
import resource
import sys
import time

from mqsa_core import openmp

openmp.limit_spinning()  # as every mqsa-ted command does, before torch loads libgomp

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from mqsa_core.config import load_config  # noqa: E402
from trainer.data.sequences import epoch_order  # noqa: E402
from trainer.runtime.builder import build_run  # noqa: E402
from trainer.runtime.checkpoint import TrainerState  # noqa: E402
from trainer.runtime.diagnose import path_check  # noqa: E402
from trainer.runtime.distributed import init_distributed  # noqa: E402
from trainer.runtime.trainer import Trainer  # noqa: E402


def dense_teacher(trainer: Trainer) -> torch.Tensor:
    """``[N, N]`` teacher probabilities, built the reference way (dense rows)."""
    n = trainer.users.num_items
    return trainer.run.batches.teacher.dense()[:n, :n]


def baseline_step(trainer: Trainer, users: torch.Tensor, teacher: torch.Tensor, opt) -> None:
    """One reference-style step: every slot scored, dense teacher rows, plain autograd."""
    cfg, pad = trainer.cfg.model, trainer.users.num_items
    model = trainer.model
    train = trainer.users.seqs.train[users]
    inputs = torch.full_like(train, pad)
    inputs[:, 1:] = train[:, :-1]
    mask = inputs != pad  # [B, M]
    emb = model.table.lookup(inputs)  # [B, M, D]
    h = model.encoder(emb, mask).reshape(-1, cfg.dim)  # [B*M, D]
    items = model.table.all_items()
    logits = h @ model.table.weight.T  # [B*M, N + 1]: the reference scores the padding row too
    flat_mask = mask.reshape(-1).float()
    targets = train.reshape(-1).clamp(max=pad - 1)
    rec = (F.cross_entropy(logits, targets, reduction="none") * flat_mask).sum() / flat_mask.sum()
    student = F.dropout(emb.reshape(-1, cfg.dim) * math.sqrt(cfg.dim), cfg.dropout, True)
    log_q = torch.log_softmax(student @ items.T / cfg.tau, dim=1)  # [B*M, N]
    p = teacher[inputs.reshape(-1).clamp(max=pad - 1)]  # [B*M, N]
    kd = (-(p * log_q).sum(1) * flat_mask).sum() / flat_mask.sum()
    loss = rec + cfg.lambda_kd * kd
    opt.zero_grad()
    loss.backward()
    opt.step()


def minor_page_faults() -> int:
    """This process's minor page faults so far (first touches of fresh memory)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", required=True, help="prepared data dir (spark_jobs.prepare)")
    parser.add_argument("--config", default="configs/beauty.yaml")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--baseline-steps", type=int, default=3)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--set", nargs="*", default=[], help="config overrides, KEY=VALUE")
    parser.add_argument("--check-batches", type=int, default=8)
    parser.add_argument("--tolerance", type=float, default=5e-3)
    args = parser.parse_args()
    cfg = load_config(
        args.config,
        [f"data.dir={args.data}", "train.progress=false", f"train.bf16={args.bf16}",
         f"train.threads={args.threads}", "train.run_dir=/tmp/train_speed_run", *args.set],
    )  # fmt: skip
    trainer = Trainer(build_run(cfg, init_distributed()))
    steps = trainer.users.steps_per_epoch()
    faults = [minor_page_faults()]
    trainer.train_epoch(TrainerState(epoch=0))  # warm-up (allocator, thread pools)
    faults.append(minor_page_faults())
    records = [trainer.train_epoch(TrainerState(epoch=e)) for e in range(1, args.epochs + 1)]
    epoch_s = [record["seconds"] for record in records]
    faults.append(minor_page_faults())
    eval_s = trainer.evaluate()["eval_seconds"]
    ours = sum(epoch_s) / len(epoch_s)
    print(f"ours: {ours:.2f} s/epoch ({steps} steps, bf16={args.bf16}, "
          f"{torch.get_num_threads()} threads); full valid+test eval of "
          f"{trainer.users.num_users} users: {eval_s:.2f} s")  # fmt: skip
    print(
        f"minor page faults per step: {(faults[1] - faults[0]) / steps:.0f} in the warm-up "
        f"epoch, {(faults[2] - faults[1]) / (steps * args.epochs):.0f} in the timed ones"
    )
    mean_loss = sum(record["loss"] for record in records) / len(records)
    batches = [b for _, b in zip(range(args.check_batches), trainer.step_batches(1), strict=False)]
    correct, line = path_check(trainer.model, batches, args.bf16, args.tolerance,
                               {"per epoch": mean_loss})  # fmt: skip
    print(line, flush=True)
    if args.baseline_steps:
        teacher = dense_teacher(trainer)
        opt = torch.optim.Adam(trainer.model.parameters(), lr=cfg.train.lr)
        batches = epoch_order(trainer.users.num_users, 0, 0).split(cfg.train.batch_size)
        baseline_step(trainer, batches[0], teacher, opt)  # warm-up
        start = time.perf_counter()
        for users in batches[1 : args.baseline_steps + 1]:
            baseline_step(trainer, users, teacher, opt)
        base = (time.perf_counter() - start) / args.baseline_steps * steps
        print(f"baseline (reference-style step): {base:.2f} s/epoch (extrapolated from "
              f"{args.baseline_steps} steps); speed-up x{base / ours:.1f}")  # fmt: skip
    return 0 if correct else 1


if __name__ == "__main__":
    sys.exit(main())
