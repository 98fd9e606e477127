"""Catalogue-mode training step at 10^5, 10^6 and 10^7 items: seconds per step, positions per
second per process, the step against its compute floor, peak RSS per rank.

    .venv/bin/python bench/catalog_scale.py [--sizes 1e5 1e6 1e7] [--steps 20] [--negatives 1024]

Launches one 2-process torchrun job (gloo, CPU, one thread per rank) per catalogue size. Each
job trains the real ``MQSAEncoder`` (ModelConfig defaults: d = 64, 1 block, TED on) in a
DeepSpeed engine against a row-wise sharded ``TorchRecItemTable`` (row-wise Adagrad with L2)
with the ``CatalogObjective`` step (the batch built inside the timed step): a global batch of
256 synthetic users x 50 positions, 1024 shared popularity-sampled negatives, a synthetic sparse
teacher with 4 successors per item. Sequences
and successors follow a Zipf-like popularity so that the popularity sampler, the log-Q
correction and the lookup de-duplication see realistic repeats.

The compute floor of a step is its floating-point work (counted by ``torch.utils.flop_counter``
on one extra forward and backward: the encoder, the sampled softmax, TED; the table's lookups
and fused update are memory work and count 0) divided by the rate of the step's largest product
(``[positions, D] x [D, negatives]``) timed alone in the same process, one thread: the time the
step would take if all of it ran at that product's speed. The ratio step / floor says how far
the step is from being compute-bound.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from embeddings.torchrec_table import TorchRecItemTable  # noqa: E402
from mqsa_core.config import load_config  # noqa: E402
from trainer.data.batches import BatchBuilder  # noqa: E402
from trainer.data.samplers import NegativeSampler  # noqa: E402
from trainer.data.sequences import rank_slice  # noqa: E402
from trainer.data.teacher import SparseTeacher  # noqa: E402
from trainer.model.encoder import MQSAEncoder  # noqa: E402
from trainer.model.objectives import CatalogObjective  # noqa: E402
from trainer.runtime.distributed import init_distributed, shutdown  # noqa: E402
from trainer.runtime.engine import DivergenceGuard, build_engine  # noqa: E402

SEQ = 50
DEGREE = 4  # successors per item of the synthetic teacher


def zipf_counts(num_items: int) -> torch.Tensor:
    """``[N]`` popularity ~ 1 / rank^0.8 (float64)."""
    return torch.arange(1, num_items + 1, dtype=torch.float64).pow(-0.8)


def synthetic_teacher(num_items: int, popular: NegativeSampler, tau: float) -> SparseTeacher:
    """CSR teacher with DEGREE popular successors per item, each with count 1 (logit 1/tau)."""
    dst = popular.popular(num_items * DEGREE, popular.generator())  # [N * DEGREE]
    z = (num_items - DEGREE) + DEGREE * torch.tensor(1.0 / tau).exp()
    base = torch.full((num_items,), float(1.0 / z))
    excess = torch.full((num_items * DEGREE,), float((torch.tensor(1.0 / tau).exp() - 1) / z))
    indptr = torch.arange(num_items + 1, dtype=torch.int64) * DEGREE
    log_count = torch.full_like(excess, float(torch.tensor(2.0).log()))  # count 1
    return SparseTeacher(indptr, dst, excess, base, log_count, torch.zeros_like(excess))


def product_rate(rows: int, dim: int, cols: int, repeats: int = 20) -> float:
    """FLOP/s of ``[rows, dim] x [dim, cols]`` in float32 on this thread (best of ``repeats``)."""
    a, b = torch.randn(rows, dim), torch.randn(dim, cols)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * rows * dim * cols / best


def step_flops(engine, batch) -> int:
    """Floating-point operations of one forward and backward of ``batch``, after the timed steps
    (the dense gradients are dropped; the table's fused update of this pass is of no
    consequence)."""
    with FlopCounterMode(display=False) as counter:
        engine(batch).total.backward()
    engine.zero_grad()
    return counter.get_total_flops()


def worker(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    env = init_distributed(timeout_s=600)
    cfg = load_config(
        None, [f"train.batch_size={args.batch}", f"loss.num_negatives={args.negatives}"]
    )
    num_items = int(float(args.items))
    t0 = time.perf_counter()
    counts = zipf_counts(num_items)
    sampler = NegativeSampler(args.sampler, num_items, args.negatives, counts=counts, seed=1)
    data = NegativeSampler("popularity", num_items, 0, counts=counts, seed=7)  # synthetic data
    teacher = synthetic_teacher(num_items, data, cfg.model.tau)
    table = TorchRecItemTable.from_config(
        cfg.embeddings, cfg.model, num_items, cfg.train.seed, env.device
    )
    torch.manual_seed(cfg.train.seed)
    encoder = MQSAEncoder(cfg.model, SEQ).to(env.device)
    objective = CatalogObjective(encoder, table, teacher.to(env.device), cfg.model, cfg.train)
    engine, optimizer = build_engine(objective, cfg.train, cfg.distributed, cfg.model.l2, env)
    guard = DivergenceGuard(optimizer, env.device)
    table.grad_gate = guard.gate
    batches = BatchBuilder(num_items, teacher, sampler)
    setup_s = time.perf_counter() - t0
    times = []
    for step in range(args.warmup + args.steps):
        train = data.popular(args.batch * (SEQ + 1), data.generator(step))
        users = rank_slice(torch.arange(args.batch), env.rank, env.world)
        dist.barrier()
        start = time.perf_counter()  # the batch is built inside the timed step (no prefetch)
        batch = batches(train.view(args.batch, SEQ + 1)[users], 0, step)
        losses = engine(batch)
        guard.observe(losses.total)
        engine.backward(losses.total)
        engine.step()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    positions = int(batch.positions.shape[0])  # this rank's real positions per step
    flops = step_flops(engine, batch)
    rate = product_rate(positions, cfg.model.dim, args.negatives)
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    step_s = sum(times) / len(times)
    mine = {"step_s": step_s, "peak_rss_gib": peak_gib, "positions": positions,
            "flops": flops, "floor_s": flops / rate, "gflops": rate / 1e9}  # fmt: skip
    report = [None] * env.world
    dist.all_gather_object(report, mine)
    if env.is_main:
        slowest = max(report, key=lambda r: r["step_s"])
        result = {
            "items": num_items,
            "setup_s": setup_s,
            "step_s": slowest["step_s"],
            "positions_per_s": [r["positions"] / slowest["step_s"] for r in report],
            "gflop_per_step": [r["flops"] / 1e9 for r in report],
            "product_gflops": [r["gflops"] for r in report],
            "floor_s": max(r["floor_s"] for r in report),
            "peak_rss_gib": [r["peak_rss_gib"] for r in report],
            "loss": [losses.rec.item(), losses.kd.item()],
        }
        print("RESULT " + json.dumps(result), flush=True)
    shutdown()


def launch(args: argparse.Namespace, items: str) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           "--master_port=0", "--rdzv_backend=c10d", "--rdzv_endpoint=127.0.0.1:0",
           __file__, "--worker", "--items", items, "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--negatives", str(args.negatives),
           "--batch", str(args.batch), "--sampler", args.sampler]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{items} items failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["1e5", "1e6", "1e7"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--negatives", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--sampler", default="popularity")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--items", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    results = []
    for items in args.sizes:
        result = launch(args, items)
        results.append(result)
        rss = ", ".join(f"{r:.2f}" for r in result["peak_rss_gib"])
        per_s = ", ".join(f"{p:,.0f}" for p in result["positions_per_s"])
        gflop = ", ".join(f"{g:.2f}" for g in result["gflop_per_step"])
        rate = ", ".join(f"{g:.1f}" for g in result["product_gflops"])
        print(
            f"{result['items']:>10,d} items: {result['step_s']:.3f} s/step | positions/s per "
            f"process [{per_s}] | {gflop} GFLOP/step per rank at {rate} GFLOP/s -> floor "
            f"{result['floor_s']:.3f} s, step/floor {result['step_s'] / result['floor_s']:.1f} | "
            f"peak RSS per rank [{rss}] GiB | setup {result['setup_s']:.1f} s | loss rec/kd "
            f"{result['loss'][0]:.3f}/{result['loss'][1]:.3f}",
            flush=True,
        )
    if len(results) > 1:
        first, last = results[0], results[-1]
        ratio = last["step_s"] / first["step_s"]
        excess = (last["step_s"] - last["floor_s"]) / (first["step_s"] - first["floor_s"])
        print(f"step({last['items']:.0e}) / step({first['items']:.0e}) = {ratio:.2f}; "
              f"time above the floor: x{excess:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
