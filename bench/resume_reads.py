"""Bytes each rank reads when a run resumes, at 2 and 4 processes (docs/scaling.md).

    python bench/resume_reads.py [--items 50000] [--dim 64] [--worlds 2 4] [--workdir DIR]

For each world: a 1-epoch catalogue-mode run (TorchRec row-wise table, fused row-wise Adagrad)
checkpoints at its end; the same command again resumes from that checkpoint (nothing is left to
train) and logs the bytes each rank read. Each rank reads the commit marker, the trainer state,
DeepSpeed's model states (the dense part, the same on every rank), its own RNG file and the DCP
shard files its part of the table needs: the reads per rank stay flat as the world grows while
the checkpoint's table is split further. Printed: the checkpoint's size (what every rank
downloaded before reads were per rank) and the largest read of a rank, with their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.synthetic import write_prepared  # noqa: E402

READS = re.compile(r"MiB read by rank: ([0-9., ]+)\)")


def run(cmd: list[str]) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout + proc.stderr


def measure(world: int, config: Path, run_dir: Path) -> tuple[int, list[float]]:
    """``(checkpoint bytes, MiB read by each rank on resume)`` at ``world`` processes."""
    cmd = [sys.executable, "-m", "mqsa_ted.torchrun", f"--nproc_per_node={world}",
           "--rdzv_backend=c10d", "--rdzv_endpoint=127.0.0.1:0", "-m", "trainer.train",
           str(config), f"train.run_dir={run_dir}"]  # fmt: skip
    run(cmd)
    (checkpoint,) = sorted((run_dir / "checkpoints").glob("step-*"))[-1:]
    files = json.loads((checkpoint / "COMPLETE").read_text())["files"]
    match = READS.search(run(cmd))
    if match is None:
        sys.exit("the resumed run logged no reads")
    return sum(files.values()), [float(x) for x in match[1].split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=50_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--workdir", default="")
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="resume-reads-"))
    data = write_prepared(work / "data", num_users=256, num_items=args.items)
    config = work / "catalogue.yaml"
    config.write_text(
        f"data:\n  dir: {data}\n  max_len: 12\nmodel:\n  dim: {args.dim}\n"
        "embeddings:\n  backend: torchrec\n  optimizer: rowwise_adagrad\n"
        "loss:\n  candidates: sampled\n"
        "train:\n  epochs: 1\n  batch_size: 64\n  progress: false\n  threads: 1\n"
    )
    print(f"{args.items} items x {args.dim}, checkpoint of a 1-epoch run, resumed")
    print("| processes | checkpoint MiB | MiB read by each rank | largest / checkpoint |")
    print("|---|---|---|---|")
    for world in args.worlds:
        total, reads = measure(world, config, work / f"run-{world}")
        mib = total / 2**20
        shown = ", ".join(f"{r:.2f}" for r in reads)
        print(f"| {world} | {mib:.2f} | {shown} | {max(reads) / mib:.2f} |", flush=True)


if __name__ == "__main__":
    main()
