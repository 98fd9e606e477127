"""The CPU kernel of the paper-mode log-partition (trainer/model/cpu_kernels.py) against torch
(oneDNN's score product and torch's softmax), side by side in one process: whole training steps,
alternated step by step.

    .venv/bin/python bench/cpu_kernel.py --data data/beauty [--config configs/beauty.yaml]
        [--steps 30] [--rounds 4] [--threads 2]

Builds the paper-mode run (bf16) and its first ``--steps`` batches, then runs each batch twice
per round, once with the kernel and once without (which goes first alternates), so the
machine's drift over minutes falls on both alike. Prints the mean step time of each and their
ratio per round, and the kernel's jobs at the batches' shapes on their own: the score product,
the softmax and ``softmax . E`` (the kernel's: in one pass with the transpose) and the product
``softmax^T . (w q)`` that reads the transpose; last, the whole block compiled by
``torch.compile`` (Inductor) against the kernel's.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mqsa_core import openmp  # noqa: E402

openmp.limit_spinning()  # as every mqsa-ted command does, before torch loads libgomp

import torch  # noqa: E402

from mqsa_core.config import load_config  # noqa: E402
from trainer.model import cpu_kernels  # noqa: E402
from trainer.runtime.builder import build_run  # noqa: E402
from trainer.runtime.diagnose import path_check  # noqa: E402
from trainer.runtime.distributed import init_distributed  # noqa: E402
from trainer.runtime.trainer import Trainer  # noqa: E402


def median_ms(fn, repeat: int = 9) -> float:
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[repeat // 2] * 1e3


def pieces(kernel, rows: int, width: int, dim: int) -> None:
    """The kernel's jobs at ``[rows, width]``, each way: the score product, the softmax and
    ``softmax . E`` (the kernel's: one pass with the transpose), and ``softmax^T . (w q)``."""
    queries = torch.randn(rows, dim).to(torch.bfloat16)
    table = (torch.randn(width, dim) * 0.3).to(torch.bfloat16)
    table_t, packed = table.T.contiguous(), cpu_kernels.pack_items(table)
    paired, q_pairs = cpu_kernels.pair_items(table), cpu_kernels.pairs(queries)
    scores = torch.empty(rows, width, dtype=torch.bfloat16)
    probs, lse, expected = torch.empty_like(scores), torch.empty(rows), torch.empty(rows, dim)
    stride = cpu_kernels.transpose_stride(rows)
    probs_t = torch.empty(width, stride, dtype=torch.bfloat16)[:, :rows]
    side = torch.randn(rows, dim).to(torch.bfloat16)
    for _ in range(3):
        onednn = median_ms(lambda: torch.mm(queries, table_t, out=scores))
        product = median_ms(lambda: kernel.scores(q_pairs, packed, scores))
        softmax = median_ms(lambda: torch.ops.aten._softmax.out(scores, 1, False, out=probs))
        times_e = median_ms(lambda: torch.mm(probs, table))
        fused = median_ms(
            lambda: kernel.log_partition_block(q_pairs, packed, paired, probs_t, lse, expected)
        )
        on_view = median_ms(lambda: torch.mm(probs.T, side))
        on_rows = median_ms(lambda: torch.mm(probs_t, side))
        theirs, ours = onednn + softmax + times_e + on_view, fused + on_rows
        print(
            f"[{rows} x {width}, D {dim}] scores: oneDNN {onednn:.2f} ms, kernel {product:.2f} "
            f"| torch's softmax {softmax:.2f} | softmax . E: oneDNN {times_e:.2f} | the "
            f"kernel's one pass (scores, softmax, transpose, softmax . E) {fused:.2f} | "
            f"softmax^T . (w q): on the transposed view {on_view:.2f}, on the kernel's "
            f"transpose {on_rows:.2f} | together {theirs:.2f} -> {ours:.2f} ms "
            f"(x{ours / theirs:.3f})",
            flush=True,
        )


def torch_block(queries: torch.Tensor, table: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The kernel's block in torch: ``queries [R, D]``, ``table [N, D]`` (bf16) -> the
    log-partition ``[R]`` (float32), ``softmax . E`` ``[R, D]`` and the softmax's transpose
    ``[N, R]`` (bf16)."""
    scores = (queries @ table.T).float()
    lse = torch.logsumexp(scores, 1)
    probs = torch.exp(scores - lse[:, None]).to(torch.bfloat16)
    return lse, (probs @ table).float(), probs.T.contiguous()


def compiled_vs_kernel(kernel, rows: int, width: int, dim: int) -> None:
    """``torch.compile`` (Inductor, CPU) of :func:`torch_block` against the kernel's block at
    ``[rows, width]``, with the largest difference of the log-partition beside the times."""
    queries = torch.randn(rows, dim).to(torch.bfloat16)
    table = (torch.randn(width, dim) * 0.3).to(torch.bfloat16)
    packed, paired = cpu_kernels.pack_items(table), cpu_kernels.pair_items(table)
    q_pairs = cpu_kernels.pairs(queries)
    stride = cpu_kernels.transpose_stride(rows)
    probs_t = torch.zeros(width, stride, dtype=torch.bfloat16)[:, :rows]
    lse, expected = torch.empty(rows), torch.empty(rows, dim)
    compiled = torch.compile(torch_block, dynamic=False)
    start = time.perf_counter()
    want = compiled(queries, table)
    compile_s = time.perf_counter() - start
    eager = median_ms(lambda: torch_block(queries, table))
    inductor = median_ms(lambda: compiled(queries, table))
    fused = median_ms(
        lambda: kernel.log_partition_block(q_pairs, packed, paired, probs_t, lse, expected)
    )
    gap = float((lse - want[0]).abs().max())
    print(
        f"[{rows} x {width}, D {dim}] the block (scores, log-partition, softmax . E, transpose): "
        f"eager torch {eager:.2f} ms, torch.compile {inductor:.2f} ms (compiled in "
        f"{compile_s:.0f} s), the kernel {fused:.2f} ms: compiled / kernel x{inductor / fused:.3f}"
        f"; log-partition max |kernel - compiled| {gap:.2e}",
        flush=True,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", required=True, help="prepared data dir (spark_jobs.prepare)")
    parser.add_argument("--config", default="configs/beauty.yaml")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    cfg = load_config(
        args.config,
        [f"data.dir={args.data}", "train.progress=false", "train.bf16=true",
         "train.cpu_kernel=true", f"train.threads={args.threads}",
         "train.run_dir=/tmp/cpu_kernel_bench_run"],
    )  # fmt: skip
    trainer = Trainer(build_run(cfg, init_distributed()))
    kernel = trainer.model.kernel
    if kernel is None:
        sys.exit("the CPU kernel is not loaded here (see the 'CPU kernel:' line above)")
    batches = trainer.step_batches(0)
    steps = [next(batches) for _ in range(args.steps)]
    for i, batch in enumerate(steps[:5]):  # warm-up: allocator, thread pools, buffers
        trainer.train_step(batch, i)
    seconds: dict[bool, list[float]] = {True: [], False: []}
    for round_ in range(args.rounds):
        for i, batch in enumerate(steps):
            for use in (True, False) if (round_ + i) % 2 else (False, True):
                trainer.model.kernel = kernel if use else None
                start = time.perf_counter()
                trainer.train_step(batch, i)
                trainer.loss_sums.sum().item()  # the step's work is done
                seconds[use].append(time.perf_counter() - start)
        trainer.model.kernel = kernel
        ours, theirs = (sum(seconds[u]) / len(seconds[u]) * 1e3 for u in (True, False))
        print(
            f"round {round_ + 1}: step with the kernel {ours:.1f} ms, without (oneDNN, torch) "
            f"{theirs:.1f} ms: x{ours / theirs:.3f} (mean over the rounds so far)",
            flush=True,
        )
    rows = int(steps[0].positions.shape[0])
    pieces(kernel, rows, trainer.users.num_items + 1, cfg.model.dim)
    compiled_vs_kernel(kernel, rows, trainer.users.num_items + 1, cfg.model.dim)
    done = len(steps[:5]) + len(seconds[True]) + len(seconds[False])  # warm-up and timed steps
    rec, kd = (trainer.loss_sums / done).tolist()
    ok, line = path_check(trainer.model, steps[:8], cfg.train.bf16, 5e-3, {"rec": rec, "kd": kd})
    print(line)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
