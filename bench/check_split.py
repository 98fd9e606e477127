"""Check a prepare output against an independent pandas split and a brute-force graph count.

    python bench/check_split.py --events ../shared/data/beauty/events.parquet \
        --expected ../shared/data/beauty/stats.json [--data-dir DIR] [--master local[2]]

Without ``--data-dir`` the prepare job first runs (paper mode, max_len 50, time_span 1) into a
temporary directory. Then, for every user, the train sequence, validation and test items (mapped
back to raw ids through vocab/) must equal a pandas leave-one-out split of the raw events
(stable sort by timestamp, input order on ties); transitions/ must equal a brute-force count
over the cut train sequences; users/items/events/train_events must equal ``--expected``.
Exit status 0 when everything matches.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time

import pandas as pd
import pyarrow.parquet as pq

from mqsa_core.config import DataConfig
from mqsa_core.prepared import dataset_files, read_stats
from spark_jobs.prepare import prepare
from spark_jobs.session import build_session
from tests.reference import reference_transitions

KEYS = ("users", "items", "events", "train_events")


def read_dataset(data_dir: str, name: str) -> pd.DataFrame:
    """A committed dataset as one pandas frame."""
    return pd.concat(pq.read_table(f).to_pandas() for f in dataset_files(data_dir, name))


def pandas_split(events: str, user: str, item: str, time_col: str) -> pd.DataFrame:
    """user -> items (time order, input order on ties) for users with >= 3 events."""
    df = pq.read_table(events, columns=[user, item, time_col]).to_pandas()
    df = df.dropna().sort_values([user, time_col], kind="stable")
    seqs = df.groupby(user, sort=False)[item].agg(list)
    return seqs[seqs.map(len) >= 3]


def check(args: argparse.Namespace, data_dir: str) -> list[str]:
    """All mismatches found (empty when the output is right)."""
    problems = []
    stats = read_stats(data_dir)
    expected = json.load(open(args.expected)) if args.expected else {}
    for key in KEYS:
        if key in expected and stats[key] != expected[key]:
            problems.append(f"stats {key}: {stats[key]} != expected {expected[key]}")
    vocab = read_dataset(data_dir, "vocab").sort_values("index")
    raw = vocab["item_id"].to_numpy()
    seqs = read_dataset(data_dir, "sequences").set_index("user_id")
    ref = pandas_split(args.events, args.user_col, args.item_col, args.time_col)
    if set(seqs.index) != set(ref.index):
        problems.append(f"user sets differ: {len(seqs)} prepared vs {len(ref)} reference")
    bad_users = 0
    for user, items in ref.items():
        if user not in seqs.index:
            continue
        row = seqs.loc[user]
        got = [*raw[row["train_items"]], raw[row["valid_item"]], raw[row["test_item"]]]
        bad_users += got != list(items)
    if bad_users:
        problems.append(f"{bad_users} users with a different split")
    index = {item: i for i, item in enumerate(raw)}
    trains = [([index[i] for i in items[:-2]], list(range(len(items) - 2))) for items in ref]
    expected_edges = reference_transitions(trains, args.time_span, args.max_len)
    edges = read_dataset(data_dir, "transitions")
    got_edges = dict(zip(zip(edges["src"], edges["dst"], strict=True), edges["count"], strict=True))
    if got_edges != dict(expected_edges):
        problems.append(f"transitions differ: {len(got_edges)} vs {len(expected_edges)} edges")
    print(
        f"[check] users={len(ref)} checked, split mismatches={bad_users}; "
        f"edges={len(got_edges)} (brute force {len(expected_edges)}, total count "
        f"{sum(expected_edges.values())}); stats "
        + ", ".join(
            f"{k}={stats[k]}" + (f" (expected {expected[k]})" if k in expected else "")
            for k in KEYS
        )  # fmt: skip
    )
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", required=True, help="raw events (Parquet)")
    parser.add_argument("--expected", help="stats.json with the expected counts")
    parser.add_argument("--data-dir", help="an existing prepare output (default: run prepare)")
    parser.add_argument("--master", default="local[2]")
    parser.add_argument("--max-len", type=int, default=50)
    parser.add_argument("--time-span", type=int, default=1)
    parser.add_argument("--user-col", default="user_id")
    parser.add_argument("--item-col", default="item_id")
    parser.add_argument("--time-col", default="timestamp")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="check-split-") as tmp:
        data_dir = args.data_dir
        if data_dir is None:
            data_dir = f"{tmp}/prepared"
            cfg = DataConfig(
                events=args.events, dir=data_dir, max_len=args.max_len,
                time_span=args.time_span, user_col=args.user_col, item_col=args.item_col,
                time_col=args.time_col, spark_master=args.master,
            )  # fmt: skip
            start = time.perf_counter()
            prepare(cfg, build_session(args.master))
            print(f"[check] prepare took {time.perf_counter() - start:.1f}s")
        problems = check(args, data_dir)
    for problem in problems:
        print(f"[check] MISMATCH: {problem}")
    print("[check] OK" if not problems else f"[check] FAILED ({len(problems)} problems)")
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
