"""Export of a sharded 10^7 x 64 item table from 2 ranks, then a FAISS index over it.

    .venv/bin/python bench/export_scale.py [--items 1e7] [--workdir /tmp/export_scale] [--faiss ivf]

Builds a row-wise sharded ``TorchRecItemTable`` on 2 torchrun ranks (gloo, CPU) and runs the
export's per-rank path (``local_rows`` -> raw ids for those rows only -> one Parquet part per
rank), timing it and reading each rank's peak RSS. Rank 0 then reads the export back, builds
the FAISS index (``auto`` picks IVF above 200k items) and prints its build time and recall@10
against exact inner-product search on 1,000 queries.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.synthetic import write_vocab  # noqa: E402


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    from embeddings.torchrec_table import TorchRecItemTable
    from mqsa_ted.export import (
        build_faiss,
        faiss_recall_at_10,
        read_vectors,
        write_item_rows,
    )
    from trainer.runtime.distributed import init_distributed

    torch.set_num_threads(1)
    env = init_distributed()
    start = time.perf_counter()
    table = TorchRecItemTable(args.items, 64, "row_wise", "sgd", 0.0, 0.0, seed=0)
    setup_s = time.perf_counter() - start
    dist.barrier()
    start = time.perf_counter()
    first_id, rows = table.local_rows()
    write_item_rows(f"{args.workdir}/export/items/part-{env.rank:05d}.parquet",
                    str(args.workdir), first_id, rows.numpy())  # fmt: skip
    export_s = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    report = [None] * env.world
    dist.all_gather_object(report, {"rows": rows.shape[0], "export_s": export_s, "peak_gib": peak})
    dist.barrier()
    if not env.is_main:
        return
    for rank, r in enumerate(report):
        print(f"rank {rank}: {r['rows']:,d} rows exported in {r['export_s']:.1f} s, "
              f"peak RSS {r['peak_gib']:.2f} GiB (table set-up {setup_s:.1f} s)")  # fmt: skip
    torch.set_num_threads(os.cpu_count() or 1)
    vectors = read_vectors(f"{args.workdir}/export/items", 64)
    start = time.perf_counter()
    index, kind = build_faiss(vectors, args.faiss)
    build_s = time.perf_counter() - start
    queries = vectors[np.random.default_rng(1).choice(len(vectors), 1000, replace=False)]
    recall = faiss_recall_at_10(index, vectors, queries)
    print(f"faiss {kind}: build {build_s:.1f} s, recall@10 vs exact {recall:.4f} (1,000 queries)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=float, default=1e7)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/export_scale"))
    parser.add_argument("--faiss", default="auto", choices=["auto", "flat", "ivf", "hnsw"])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.items = int(args.items)
    if args.worker:
        worker(args)
        return
    start = time.perf_counter()
    write_vocab(args.workdir, args.items)
    vocab_s = time.perf_counter() - start
    print(f"{args.items:,d} x 64 table, 2 ranks; synthetic vocab in {vocab_s:.1f} s")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           "--rdzv_backend=c10d", "--rdzv_endpoint=127.0.0.1:0", __file__, "--worker",
           "--items", str(args.items), "--workdir", str(args.workdir),
           "--faiss", args.faiss]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    subprocess.run(cmd, env=env, check=True)


if __name__ == "__main__":
    main()
