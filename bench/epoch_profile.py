"""A paper-mode epoch by stage, each stage against its own floor.

    .venv/bin/python bench/epoch_profile.py --data data/beauty [--config configs/beauty.yaml]
        [--steps 30] [--bf16] [--threads 2]

Runs the steps of one epoch one stage at a time (the same code the trainer runs, called piece by
piece so each piece can be timed: the host is synchronous, so wall time per call is the cost),
then the real DeepSpeed step for the same batches, and prints per step and per epoch:

- batch building (host, normally overlapped by the prefetching reader),
- table read + encoder forward, the recommendation log-partition (scores over all N items and
  both gradients, fused), TED (its log-partition and the sparse teacher terms), the backward
  pass through the encoder, the optimizer step,
- DeepSpeed's overhead (the engine step minus the pieces) and host reads (none in a step),

each with its floor: matrix products at this machine's measured bf16/fp32 GEMM rate (a 4096^3
product measured here, in the same process), elementwise work at its measured copy bandwidth.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mqsa_core.config import load_config  # noqa: E402
from trainer.model.losses import full_softmax_rec_loss, ted_loss  # noqa: E402
from trainer.runtime.builder import build_run  # noqa: E402
from trainer.runtime.distributed import init_distributed  # noqa: E402
from trainer.runtime.trainer import Trainer  # noqa: E402


def gemm_rate(dtype: torch.dtype, n: int = 4096) -> float:
    """FLOP/s of an ``n^3`` matrix product in ``dtype`` here (best of 3)."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    torch.mm(a, b)
    best = min(_timed(lambda: torch.mm(a, b)) for _ in range(3))
    return 2 * n**3 / best


def copy_bandwidth(mib: int = 256) -> float:
    """Bytes/s of reading and writing a large float32 buffer (best of 3)."""
    x = torch.empty(mib << 18)
    y = torch.empty_like(x)
    y.copy_(x)
    return 2 * x.numel() * 4 / min(_timed(lambda: y.copy_(x)) for _ in range(3))


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


class Stages:
    """Accumulates seconds per named stage."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def __call__(self, name: str, fn, *args):
        start = time.perf_counter()
        out = fn(*args)
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
        return out


def profile(trainer: Trainer, steps: int) -> tuple[Stages, dict[str, float], float]:
    """Stage seconds over ``steps`` steps, their GEMM FLOPs, and the real step's seconds."""
    cfg, model = trainer.cfg, trainer.model
    chunk, bf16, tau = cfg.train.score_chunk, cfg.train.bf16, cfg.model.tau
    stages = Stages()
    flops = {"rec": 0.0, "ted": 0.0}
    sequences = list(zip(range(steps), trainer.users.train_batches(epoch=1), strict=False))
    optimizer = trainer.guard.optimizer
    for step, train in sequences:
        batch = stages("batch building (host)", trainer.run.batches, train, 1, step)
        norm = model.normaliser(batch)
        rows, queries, student = stages("table read + encoder forward", model.encode, batch)
        items = model.table.all_items()
        targets = rows[batch.targets_row]
        rec = stages("rec log-partition (fused grads)", full_softmax_rec_loss,
                     queries, targets, items, norm, chunk, bf16)  # fmt: skip
        teacher = model.teacher_rows(batch, rows)
        kd = stages("TED (log-partition + teacher terms)", ted_loss,
                    student, items, teacher, tau, norm, chunk, bf16)  # fmt: skip
        total = rec + cfg.model.lambda_kd * kd
        stages("backward (encoder, lookups)", total.backward)
        stages("optimizer step (fused Adam)", optimizer.step)
        optimizer.zero_grad()
        n, d, p = items.shape[0], items.shape[1], queries.shape[0]
        flops["rec"] += 3 * 2 * p * n * d
        flops["ted"] += 3 * 2 * p * n * d
    start = time.perf_counter()
    for step, train in sequences:
        trainer.train_step(trainer.run.batches(train, 1, step), step)
    real = (time.perf_counter() - start) / len(sequences)
    return stages, flops, real


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--config", default="configs/beauty.yaml")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    cfg = load_config(args.config, [
        f"data.dir={args.data}", "train.progress=false", f"train.bf16={args.bf16}",
        f"train.threads={args.threads}", "train.run_dir=/tmp/epoch_profile_run",
    ])  # fmt: skip
    trainer = Trainer(build_run(cfg, init_distributed()))
    steps_per_epoch = trainer.users.steps_per_epoch()
    profile(trainer, 3)  # warm-up
    stages, flops, real = profile(trainer, args.steps)
    rate = gemm_rate(torch.bfloat16 if args.bf16 else torch.float32)
    bandwidth = copy_bandwidth()
    per_step = {k: v / args.steps for k, v in stages.seconds.items()}
    pieces = sum(per_step.values()) - per_step["batch building (host)"]
    floors = {
        "rec log-partition (fused grads)": flops["rec"] / args.steps / rate,
        "TED (log-partition + teacher terms)": flops["ted"] / args.steps / rate,
    }
    print(f"machine: {torch.get_num_threads()} threads, GEMM {rate / 1e9:.0f} GFLOP/s "
          f"({'bf16' if args.bf16 else 'fp32'}), copy {bandwidth / 1e9:.1f} GB/s; "
          f"{steps_per_epoch} steps per epoch")  # fmt: skip
    print(f"{'stage':40s} {'ms/step':>9s} {'s/epoch':>8s} {'floor s/epoch':>14s} {'x floor':>8s}")
    for name, seconds in per_step.items():
        floor = floors.get(name)
        epoch = seconds * steps_per_epoch
        floor_text = f"{floor * steps_per_epoch:14.2f} {seconds / floor:8.1f}" if floor else ""
        print(f"{name:40s} {seconds * 1000:9.1f} {epoch:8.2f} {floor_text}")
    overhead = real - pieces
    print(f"{'DeepSpeed engine + guard overhead':40s} {overhead * 1000:9.1f} "
          f"{overhead * steps_per_epoch:8.2f}")  # fmt: skip
    print(f"{'host reads in the step':40s} {0.0:9.1f} {0.0:8.2f}   (bench/host_syncs.py)")
    total_floor = sum(floors.values()) * steps_per_epoch
    print(f"real step (DeepSpeed, batch built inline): {real * 1000:.1f} ms -> "
          f"{real * steps_per_epoch:.2f} s/epoch; GEMM floor of the epoch {total_floor:.2f} s "
          f"(x{real * steps_per_epoch / total_floor:.1f})")  # fmt: skip


if __name__ == "__main__":
    main()
