"""Memory of a rank's user data when streaming ``sequences/`` against holding it all.

    .venv/bin/python bench/stream_memory.py [--users 200000 2000000] [--workdir /tmp/stream_memory]

Writes a synthetic prepared ``sequences/`` per size (train lengths 3..200, uniform random
items, 16 files in row groups of 16,384 users: the same row-group size at every dataset size),
then, each in a fresh process, runs one epoch of training batches and one pass of evaluation
batches as rank 0 of 2 with ``data.stream=true`` and with the in-memory source (the baseline),
and prints the peak resident memory and the users per second of each. Streaming memory should
stay flat as the dataset grows.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

NUM_ITEMS = 100_000
MAX_LEN = 50
NUM_FILES = 16
ROW_GROUP_USERS = 16_384  # a reader holds whole row groups: keep their size fixed


def write_sequences(root: Path, num_users: int, seed: int = 0) -> None:
    """A prepared-data directory holding only what the user sources read."""
    if (root / "_COMPLETE").exists():
        return
    rng = np.random.default_rng(seed)
    (root / "sequences").mkdir(parents=True, exist_ok=True)
    for f, users in enumerate(np.array_split(np.arange(num_users), NUM_FILES)):
        lengths = rng.integers(3, 200, len(users))
        items = rng.integers(0, NUM_ITEMS, int(lengths.sum()) + 2 * len(users))
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        table = pa.table(
            {
                "user_id": pa.array([f"u{u}" for u in users]),
                "train_items": pa.ListArray.from_arrays(offsets, items[: offsets[-1]]),
                "valid_item": items[offsets[-1] :: 2][: len(users)],
                "test_item": items[offsets[-1] + 1 :: 2][: len(users)],
            }
        )
        pq.write_table(
            table, root / "sequences" / f"part-{f:05d}.parquet", row_group_size=ROW_GROUP_USERS
        )
    stats = {"users": num_users, "items": NUM_ITEMS, "max_len": MAX_LEN}
    (root / "stats.json").write_text(json.dumps(stats))
    (root / "_COMPLETE").write_text("")


def measure(data_dir: str, stream: bool) -> None:
    """One epoch of training batches and one evaluation pass as rank 0 of 2; prints JSON."""
    from mqsa_core.config import load_config
    from trainer.data.user_source import build_user_source

    cfg = load_config(
        None,
        [f"data.dir={data_dir}", f"data.max_len={MAX_LEN}", f"data.stream={stream}",
         "train.batch_size=4096"],
    )  # fmt: skip
    start = time.perf_counter()
    users = build_user_source(cfg.data, cfg.train, rank=0, world=2)
    trained = sum(b.items.shape[0] for b in users.train_batches(epoch=1))
    _, batches = users.eval_batches(batch_size=1024)
    evaluated = sum(b.num_users for b in batches)
    seconds = time.perf_counter() - start
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"trained": trained, "evaluated": evaluated, "seconds": seconds,
                      "peak_mib": peak_mib}))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--users", type=float, nargs="+", default=[2e5, 2e6])
    parser.add_argument("--workdir", default="/tmp/stream_memory")
    parser.add_argument("--measure", nargs=2, help=argparse.SUPPRESS)  # DATA_DIR STREAM (child)
    args = parser.parse_args()
    if args.measure:
        measure(args.measure[0], args.measure[1] == "true")
        return
    base = None
    print(f"{'users':>10} {'source':>9} {'peak RSS':>10} {'seconds':>8} {'users/s':>10}")
    for num_users in (int(u) for u in args.users):
        data_dir = Path(args.workdir) / f"users{num_users}"
        write_sequences(data_dir, num_users)
        for stream in ("true", "false"):
            cmd = [sys.executable, __file__, "--measure", str(data_dir), stream]
            out = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
            source = "stream" if stream == "true" else "in-memory"
            rate = (out["trained"] + out["evaluated"]) / out["seconds"]
            print(f"{num_users:>10} {source:>9} {out['peak_mib']:>7.0f} MiB "
                  f"{out['seconds']:>8.1f} {rate:>10,.0f}")  # fmt: skip
            if stream == "true":
                base = base or out["peak_mib"]
                growth = out["peak_mib"] / base
        print(f"{'':>10} streaming peak RSS / at the smallest size: {growth:.2f}x")


if __name__ == "__main__":
    main()
