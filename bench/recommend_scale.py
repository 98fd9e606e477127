"""Recommender load time and per-query latency at 10^4, 10^5, 10^6 items x 64.

    nice -n 10 .venv/bin/python bench/recommend_scale.py [--sizes 1e4,1e5,1e6]
        [--workdir /tmp/recommend_scale] [--queries 200] [--history 20] [--faiss auto]
        [--rebuild]

For each size, a synthetic export in our format: a vocab (``export_scale.write_vocab``: raw ids
``item<index>``), random unit vectors ``[N, 64]`` and a freshly initialised encoder, written by
``mqsa_ted.export.export_vectors`` with ``--faiss`` (default ``auto``, the index export builds:
exact flat up to 200k items, IVF above); an existing export of that size and kind is reused
unless ``--rebuild`` (its build is export time, not load time). Then, in this process: the
``Recommender`` load time (wall and CPU seconds), and ``--queries`` single-history queries
(``--history`` random items each, k=10) timed one by one (p50/p99 of wall and of CPU time:
the CPU time leaves out waiting for a core), with the recall@10 of what
was served against an exact scan of the same query. Each size's figures are kept in
``<workdir>/results.json``, so sizes can be run one at a time; the load-time growth per 10x
items is printed over all sizes measured so far. Each line shows the machine's load average: on
a shared machine, latency percentiles measure the neighbours too.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DIM = 64


def build_export(workdir: Path, num_items: int, faiss: str, rebuild: bool) -> str:
    """The synthetic export of ``num_items`` items under ``workdir`` (built unless present)."""
    import torch
    from export_scale import write_vocab

    from core.config import ModelConfig
    from mqsa_ted.export import export_vectors
    from trainer.model import MQSAEncoder

    out = workdir / f"export-{faiss}"
    if (out / "CURRENT").exists() and not rebuild:
        print(f"{num_items:,d} items: reusing {out}")
        return str(out)
    start = time.perf_counter()
    if not (workdir / "_COMPLETE").exists():
        write_vocab(workdir, num_items)
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((num_items, DIM), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    model = ModelConfig(dim=DIM, dropout=0.0)
    torch.manual_seed(0)
    encoder = MQSAEncoder(model, 50)
    manifest = export_vectors(str(out), str(workdir), vectors, encoder, model, faiss_kind=faiss)
    print(f"{num_items:,d} items: export ({manifest.faiss['kind']}) written in "
          f"{time.perf_counter() - start:.1f} s")  # fmt: skip
    return str(out)


def measure(export: str, num_items: int, queries: int, history: int) -> dict:
    """Load time, per-query latency and served recall@10 for one export."""
    from mqsa_ted.recommend import Recommender

    start, cpu = time.perf_counter(), time.process_time()
    rec = Recommender(export)
    load_s, load_cpu_s = time.perf_counter() - start, time.process_time() - cpu
    rng = np.random.default_rng(1)
    histories = [[f"item{i}" for i in rng.choice(num_items, history, replace=False)]
                 for _ in range(queries + 5)]  # fmt: skip
    latencies, cpu_times, served = [], [], []
    for h in histories[:5]:  # warm-up
        rec.recommend([h], k=10)
    for h in histories[5:]:
        start, cpu = time.perf_counter(), time.process_time()
        (result,) = rec.recommend([h], k=10)
        latencies.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu)
        served.append(result.items)
    hits = 0  # after the timing: the exact scans' BLAS threads would disturb it
    for h, items in zip(histories[5:], served, strict=True):
        rows, _ = rec.rows_of([h])
        exact, _ = rec.exact_top(rec.encode(rows)[0], np.unique(rows[0]), 10)
        hits += len(set(items) & set(rec.raw(exact)))
    ms, cpu_ms = 1000 * np.array(latencies), 1000 * np.array(cpu_times)
    return {
        "items": num_items,
        "index": rec.manifest.faiss["kind"],
        "load_s": load_s,
        "load_cpu_s": load_cpu_s,  # this process's CPU time (all threads): what contention hides
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "cpu_p50_ms": float(np.percentile(cpu_ms, 50)),  # CPU time per query: no waiting
        "cpu_p99_ms": float(np.percentile(cpu_ms, 99)),
        "recall@10": hits / (10 * queries),
        "load_average": os.getloadavg()[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1e4,1e5,1e6", help="comma-separated item counts")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/recommend_scale"))
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--history", type=int, default=20)
    parser.add_argument("--faiss", default="auto", choices=["auto", "flat", "ivf", "hnsw", "none"])
    parser.add_argument("--rebuild", action="store_true", help="rewrite existing exports")
    args = parser.parse_args()
    results_file = args.workdir / "results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    for num_items in (int(float(s)) for s in args.sizes.split(",")):
        export = build_export(args.workdir / str(num_items), num_items, args.faiss, args.rebuild)
        r = measure(export, num_items, args.queries, args.history)
        results[f"{num_items}-{args.faiss}"] = r
        results_file.write_text(json.dumps(results, indent=2))
        print(f"{num_items:>9,d} items x {DIM} ({r['index']}): load {r['load_s']:.2f} s "
              f"({r['load_cpu_s']:.2f} s CPU), "
              f"query p50 {r['p50_ms']:.2f} ms p99 {r['p99_ms']:.2f} ms "
              f"(CPU p50 {r['cpu_p50_ms']:.2f} ms p99 {r['cpu_p99_ms']:.2f} ms), "
              f"recall@10 vs exact {r['recall@10']:.3f} (load average {r['load_average']:.1f})",
              flush=True)  # fmt: skip
    sizes = sorted((r for k, r in results.items() if k.endswith(f"-{args.faiss}")),
                   key=lambda r: r["items"])  # fmt: skip
    for a, b in zip(sizes, sizes[1:], strict=False):
        per_10x = (b["load_s"] / a["load_s"]) ** (1 / np.log10(b["items"] / a["items"]))
        print(f"load growth {a['items']:,d} -> {b['items']:,d}: {b['load_s'] / a['load_s']:.1f}x "
              f"({per_10x:.1f}x per 10x items)")  # fmt: skip


if __name__ == "__main__":
    main()
