"""Where catalogue mode loses against paper mode, variant by variant, same epochs and seed.

    .venv/bin/python bench/catalog_ablation.py --config configs/beauty.yaml --data data/beauty \\
        [--epochs 40] [--variants paper catalog ...] [--out runs/ablation]

Each variant is one real training run (``trainer.train``; TorchRec variants on 2 processes under
torchrun, one thread each; dense ones in 1 process, 2 threads) on the same prepared data; runs
that trained all epochs are read, not rerun; an interrupted one resumes from its newest
checkpoint (``train.resume=auto``: the same figures as an uninterrupted run). Prints test
NDCG@10 / HR@10 at the best validation epoch and the ratio against paper mode, with the command
of each run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CATALOG = ["embeddings.backend=torchrec", "loss.candidates=sampled", "loss.sampler=mixed",
           "loss.num_negatives=1024"]  # fmt: skip
VARIANTS = {
    "paper": ([], 1),
    "paper_torchrec": (["embeddings.backend=torchrec"], 2),
    "catalog": (CATALOG, 2),
    # the union of 2 ranks' 1,024 draws: every rank scores the 2,048 shared candidates
    "catalog_2048": ([*CATALOG, "loss.num_negatives=2048"], 2),
    "catalog_global_batch": ([*CATALOG, "loss.sampler=global_batch"], 2),
    "catalog_global_batch_2048": (
        [*CATALOG, "loss.sampler=global_batch", "loss.num_negatives=2048"],
        2,
    ),
    "catalog_uniform": ([*CATALOG, "loss.sampler=uniform"], 2),
    "catalog_popularity": ([*CATALOG, "loss.sampler=popularity"], 2),
    "catalog_table_lr_0.1": ([*CATALOG, "embeddings.lr=0.1"], 2),
    "catalog_table_lr_0.02": ([*CATALOG, "embeddings.lr=0.02"], 2),
    "paper_no_ted": (["model.lambda_kd=0"], 1),
    "catalog_no_ted": ([*CATALOG, "model.lambda_kd=0"], 2),
}


def command(config: str, data: str, run_dir: Path, epochs: int, overrides: list[str],
            world: int) -> list[str]:  # fmt: skip
    args = ["-m", "trainer.train", config, f"data.dir={data}", f"train.run_dir={run_dir}",
            f"train.epochs={epochs}", "train.eval_every=2", "train.patience=0",
            "train.progress=false", f"train.threads={2 // world}", *overrides]  # fmt: skip
    if world == 1:
        return [sys.executable, *args]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}",
            "--rdzv_backend=c10d", "--rdzv_endpoint=127.0.0.1:0", *args]  # fmt: skip


def finished(run_dir: Path, epochs: int) -> bool:
    """Whether ``run_dir`` holds a run that trained all ``epochs`` (``train.patience=0``)."""
    path = run_dir / "metrics.json"
    return path.exists() and len(json.loads(path.read_text()).get("epochs", [])) == epochs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/beauty.yaml")
    parser.add_argument("--data", required=True)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--out", default="runs/ablation")
    parser.add_argument("--set", nargs="*", default=[], help="overrides for every variant")
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    rows = {}
    for name in args.variants:
        overrides, world = VARIANTS[name]
        run_dir = Path(args.out) / name
        cmd = command(args.config, args.data, run_dir, args.epochs, [*overrides, *args.set],
                      world)  # fmt: skip
        if not finished(run_dir, args.epochs):
            if (run_dir / "checkpoints").exists():  # an interrupted run goes on where it stopped
                cmd.append("train.resume=auto")
            start = time.perf_counter()
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"{name}: FAILED\n{proc.stderr[-2000:]}", flush=True)
                continue
            print(f"{name}: {time.perf_counter() - start:.0f} s", flush=True)
        metrics = json.loads((run_dir / "metrics.json").read_text())
        rows[name] = (metrics["test"], metrics["best_epoch"], " ".join(cmd[1:]))
    paper = rows.get("paper", (None,))[0]
    print("\n| variant | best epoch | test HR@10 | test NDCG@10 | vs paper (NDCG@10) |")
    print("|---|---|---|---|---|")
    for name, (test, best, _) in rows.items():
        ratio = f"{test['NDCG@10'] / paper['NDCG@10']:.1%}" if paper else ""
        print(f"| {name} | {best} | {test['HR@10']:.4f} | {test['NDCG@10']:.4f} | {ratio} |")
    print()
    for name, (_, _, cmd) in rows.items():
        print(f"{name}: python {cmd}")


if __name__ == "__main__":
    main()
