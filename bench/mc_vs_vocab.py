"""Stable item rows across days: TorchRec's managed-collision module against our vocabulary.

    .venv/bin/python bench/mc_vs_vocab.py --events ../shared/data/beauty/events.parquet \\
        [--days 0.8 1.0] [--capacity 0.9 1.0 1.25] [--batch 4096] [--eviction-interval 1]

The days are cut as in ``bench/day_two.py`` (each user's events in time order, cut at the
``--days`` fractions). The item ids, as arbitrary int64 raw ids, are streamed day by day in
batches of ``--batch`` events through ``torchrec.modules.mc_modules.MCHManagedCollisionModule``
(LFU eviction every ``--eviction-interval`` batches), sized at each ``--capacity`` times the
final catalogue. After each day every item seen so far is remapped, and the bench prints: items
without a row of their own (they all share the module's miss row), items seen before whose row
changed since the previous day (their trained row now serves another item), and the remap
throughput. Our vocabulary (``data.base_dir``) gives every item its own row and never moves one
by construction: the table grows instead (``tests/test_day_two.py`` checks ids keep their rows).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from torchrec.modules.mc_modules import LFU_EvictionPolicy, MCHManagedCollisionModule
from torchrec.sparse.jagged_tensor import JaggedTensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.day_two import split_days  # noqa: E402


def raw_ids(items: np.ndarray, catalogue: np.ndarray) -> torch.Tensor:
    """``items`` as arbitrary positive int64 ids (their code times a large odd number)."""
    codes = np.searchsorted(catalogue, items).astype(np.int64)
    return torch.from_numpy((codes * 0x9E3779B97 % (1 << 62)) + 1)


def feed(module: MCHManagedCollisionModule, ids: torch.Tensor, batch: int) -> float:
    """Stream ``ids`` through the module in training mode; seconds spent."""
    module.train()
    start = time.perf_counter()
    for chunk in ids.split(batch):
        module({"item": JaggedTensor(values=chunk, lengths=torch.tensor([chunk.numel()]))})
    return time.perf_counter() - start


def rows_of(module: MCHManagedCollisionModule, ids: torch.Tensor) -> torch.Tensor:
    """The row each of ``ids`` maps to now (no profiling)."""
    module.eval()
    out = module.remap({"item": JaggedTensor(values=ids, lengths=torch.tensor([ids.numel()]))})
    return out["item"].values()


def run(days: list[np.ndarray], catalogue: np.ndarray, capacity: int, args) -> None:
    module = MCHManagedCollisionModule(
        zch_size=capacity, device=torch.device("cpu"), eviction_policy=LFU_EvictionPolicy(),
        eviction_interval=args.eviction_interval,
    )  # fmt: skip
    miss_row = capacity - 1
    seen, before = torch.empty(0, dtype=torch.int64), None
    for d, items in enumerate(days, start=1):
        ids = raw_ids(items, catalogue)
        seconds = feed(module, ids, args.batch)
        seen = torch.cat([seen, ids]).unique()
        rows = rows_of(module, seen)
        missing = int((rows == miss_row).sum())
        moved = 0
        if before is not None:
            old_ids, old_rows = before
            now = rows[torch.searchsorted(seen, old_ids)]
            moved = int(((now != old_rows) & (old_rows != miss_row)).sum())
        print(f"  capacity {capacity:>6} | day {d}: {len(items):>7} events, {seen.numel():>6} "
              f"items seen | without a row: {missing:>6} ({missing / seen.numel():6.1%}) | "
              f"rows moved since day {d - 1}: {moved:>5} | remap "
              f"{len(items) / seconds / 1e6:.2f}M ids/s", flush=True)  # fmt: skip
        before = (seen, rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--events", required=True, help="Parquet: user_id, item_id, timestamp")
    p.add_argument("--days", type=float, nargs="+", default=[0.8, 1.0])
    p.add_argument("--capacity", type=float, nargs="+", default=[0.9, 1.0, 1.25],
                   help="table rows as multiples of the final catalogue")  # fmt: skip
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--eviction-interval", type=int, default=1)
    args = p.parse_args(argv)
    table = pq.read_table(args.events, columns=["user_id", "item_id", "timestamp"])
    parts = split_days(table, args.days, 0.0, 0)
    days = []
    for part in parts:  # each day's events in time order
        order = np.argsort(part.column("timestamp").to_numpy(), kind="stable")
        days.append(part.column("item_id").to_numpy(zero_copy_only=False)[order])
    catalogue = np.unique(np.concatenate(days))
    print(
        f"{len(catalogue)} items, days of {', '.join(str(len(d)) for d in days)} events; "
        f"our vocabulary: every item its own row, 0 moved (the table grows)"
    )
    for share in args.capacity:
        run(days, catalogue, int(share * len(catalogue)) + 1, args)  # + the miss row
    return 0


if __name__ == "__main__":
    sys.exit(main())
