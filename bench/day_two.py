"""Day two: a warm start plus a few epochs against a from-scratch retrain on the same final data.

    # Beauty split in time: each user's first 80% of events is day one, the rest day two
    .venv/bin/python bench/day_two.py --events ../shared/data/beauty/events.parquet \\
        --config configs/beauty.yaml --workdir runs/day_two/beauty --days 0.8 1.0 \\
        --scratch-epochs 30 --warm-epochs 6 --warm train.new_target_weight=3 \\
        --warm train.lr=2e-3 --warm train.lr_schedule=linear train.eval_every=2
    # a synthetic stream: three days, a share of the items launched on each later day
    .venv/bin/python bench/day_two.py --synthetic series --config configs/demo.yaml \\
        --workdir runs/day_two/series --days 0.6 0.8 1.0 --launch 0.05 --warm-epochs 6 \\
        --warm train.lr_schedule=linear --warm train.warmup_steps=0

Each user's events (in time order) are cut at the ``--days`` fractions of their count: day ``d``
holds the events between cut ``d-1`` and cut ``d``. With ``--launch S`` a share ``S`` of the
items (drawn with ``--seed``) is launched on each later day: their events before that day are
removed (counted), so every later day brings new items. Then, with real jobs (``spark_jobs
.prepare`` and ``mqsa-ted train`` in subprocesses, the config's process count):

- day one: a full prepare and ``--scratch-epochs`` of training;
- each later day: a prepare against the previous day's output (``data.base_dir``, only that
  day's events) and ``--warm-epochs`` of training from the previous day's run
  (``train.init_from``, ``train.min_steps=0``, and the ``--warm`` overrides);
- the scratch retrain: a full prepare of all the days' events and ``--scratch-epochs`` of
  training from random weights.

Prints one row per run (events, new items, prepare and train seconds, test NDCG@10 at the best
validation epoch, training CPU seconds, the machine's 5-minute load average when it ended) and
the last day's warm start against the scratch retrain: the NDCG@10 ratio and the time ratios
(training wall and CPU time; prepare + training). Trailing ``section.key=value`` overrides
apply to every prepare and training run.

``--prepare-only`` runs the days' prepares alone and prints, per later day, how much of its
events' items and users its base holds (what ``data.base_min_overlap`` compares) and the
events not added (held by the base, late, short new users).
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

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mqsa_core.prepared import read_stats

ROOT = Path(__file__).resolve().parents[1]
METRIC = "NDCG@10"


def read_events(args: argparse.Namespace, workdir: Path) -> pa.Table:
    """The whole log: ``--events`` (user_id, item_id, timestamp) or a ``--synthetic`` one."""
    if args.events:
        return pq.read_table(args.events, columns=["user_id", "item_id", "timestamp"])
    from spark_jobs.synth import SynthSpec, write_log

    out = workdir / "synthetic"
    if not out.exists():
        write_log(str(out), SynthSpec(args.size, args.users, args.items, args.seed, args.synthetic))
    return pq.read_table(out, columns=["user_id", "item_id", "timestamp"])


def split_days(table: pa.Table, days: list[float], launch: float, seed: int) -> list[pa.Table]:
    """The new events of each day: each user's events in time order cut at ``days`` fractions
    (rounded up); with ``launch`` > 0, that share of the items is launched on each later day
    and its earlier events are removed (printed)."""
    raw_users = table.column("user_id").to_numpy(zero_copy_only=False)
    users = np.unique(raw_users, return_inverse=True)[1]  # [E] user codes
    order = np.lexsort((np.arange(len(users)), table.column("timestamp").to_numpy(), users))
    table = table.take(pa.array(order))
    users = users[order]
    starts = np.r_[0, np.flatnonzero(users[1:] != users[:-1]) + 1]
    counts = np.diff(np.r_[starts, len(users)])
    rank = np.arange(len(users)) - np.repeat(starts, counts)  # position in the user's history
    size = np.repeat(counts, counts)
    day = np.zeros(len(users), dtype=np.int64)
    for d, share in enumerate(days[:-1], start=1):
        day[rank >= np.ceil(share * size)] = d
    keep = np.ones(len(users), dtype=bool)
    if launch > 0:
        items = table.column("item_id").to_numpy(zero_copy_only=False)
        catalogue = np.unique(items)
        draw = np.random.default_rng(seed).random(len(catalogue))
        launch_day = np.zeros(len(catalogue), dtype=np.int64)
        for d in range(1, len(days)):  # shares [(d-1)*launch, d*launch) launch on day d
            launch_day[(draw >= (d - 1) * launch) & (draw < d * launch)] = d
        keep = day >= launch_day[np.searchsorted(catalogue, items)]
        print(f"launch: {int((launch_day > 0).sum())} items start later; "
              f"{int((~keep).sum())} of their earlier events removed", flush=True)  # fmt: skip
    return [table.filter(pa.array(keep & (day == d))) for d in range(len(days))]


def run(cmd: list[str], log: Path) -> tuple[float, float]:
    """Run ``cmd`` from the repository root, output to ``log``; its wall seconds and the CPU
    seconds (user + system) of it and its children (less sensitive to other jobs' load)."""
    start, used = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(log, "w") as out:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    if proc.returncode:
        raise SystemExit(f"failed (exit {proc.returncode}): {' '.join(cmd)}; see {log}")
    now = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = now.ru_utime - used.ru_utime + now.ru_stime - used.ru_stime
    return time.perf_counter() - start, cpu


def prepare_day(name: str, events: Path, base: Path | None, args: argparse.Namespace,
                workdir: Path) -> tuple[Path, float, float]:  # fmt: skip
    """Prepare ``events`` (against ``base`` when given) into ``prepared/<name>``; the output,
    its wall and CPU seconds."""
    data = workdir / "prepared" / name
    (workdir / name).mkdir(exist_ok=True)
    prepare = [f"data.events={events}", f"data.dir={data}", *args.overrides]
    prepare += [f"data.base_dir={base}"] if base else []
    seconds, cpu = run([sys.executable, "-m", "spark_jobs.prepare", args.config, *prepare],
                       workdir / name / "prepare.log")  # fmt: skip
    return data, seconds, cpu


def overlap_row(name: str, data: Path, seconds: float) -> dict:
    """What a prepared day's ``stats.json`` says about its base: shares and events not added."""
    stats = read_stats(str(data))
    overlap, dropped = stats.get("overlap"), stats["dropped"]
    row = {"day": name, "events_read": stats["events_read"], "items": stats["items"],
           "new_items": stats.get("new_items"), "prepare_s": round(seconds, 1)}  # fmt: skip
    if overlap:
        for kind in ("items", "users"):
            row[f"{kind}_held"] = round(overlap[f"known_{kind}"] / max(overlap[kind], 1), 4)
        for key in ("base_duplicate_events", "late_events", "short_user_events"):
            row[key] = dropped[key]
    print(json.dumps(row), flush=True)
    return row


def stage(name: str, events: Path, base: Path | None, init_from: Path | None, epochs: int,
          args: argparse.Namespace, workdir: Path) -> dict:  # fmt: skip
    """Prepare ``events`` (against ``base`` when given), then train (from ``init_from`` when
    given) for ``epochs``; the row of the table."""
    data, prep_s, prep_cpu = prepare_day(name, events, base, args, workdir)
    run_dir = workdir / "runs" / name
    train = [f"data.dir={data}", *args.overrides, f"train.run_dir={run_dir}",
             f"train.epochs={epochs}", "train.progress=false"]  # fmt: skip
    if init_from:
        train += [f"train.init_from={init_from}", "train.min_steps=0", *args.warm]
    train_s, train_cpu = run([sys.executable, "-m", "mqsa_ted.cli", "train", args.config, *train],
                             workdir / name / "train.log")  # fmt: skip
    stats = read_stats(str(data))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    row = {
        "run": name, "users": stats["users"], "items": stats["items"],
        "new_items": stats.get("new_items", stats["items"]), "epochs_run": len(metrics["epochs"]),
        "prepare_s": round(prep_s, 1), "train_s": round(train_s, 1),
        "prepare_cpu_s": round(prep_cpu, 1), "train_cpu_s": round(train_cpu, 1),
        METRIC: metrics["test"][METRIC], "best_epoch": metrics["best_epoch"],
        "load_after": round(os.getloadavg()[1], 1),  # 5-minute load: other jobs on the machine
    }  # fmt: skip
    print(json.dumps(row), flush=True)
    return row


def write_day(table: pa.Table, path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path / "events.parquet")
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--events", help="an event log (Parquet: user_id, item_id, timestamp)")
    source.add_argument("--synthetic", help="a spark_jobs.synth kind (series, mixture, ...)")
    p.add_argument("--size", type=int, default=200_000, help="--synthetic: events")
    p.add_argument("--users", type=int, default=10_000, help="--synthetic: users")
    p.add_argument("--items", type=int, default=2_000, help="--synthetic: items")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--config", required=True)
    p.add_argument("--workdir", required=True)
    p.add_argument("--days", type=float, nargs="+", default=[0.8, 1.0],
                   help="each day's end: cumulative share of each user's events")  # fmt: skip
    p.add_argument("--launch", type=float, default=0.0, help="share of items launched per day")
    p.add_argument("--scratch-epochs", type=int, default=40)
    p.add_argument("--warm-epochs", type=int, default=8)
    p.add_argument("--warm", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="an override for the warm-start runs only (repeatable), e.g. "
                   "train.new_target_weight=3")  # fmt: skip
    p.add_argument("--prepare-only", action="store_true",
                   help="only the prepares: each later day's overlap with its base")  # fmt: skip
    p.add_argument("overrides", nargs="*", help="section.key=value for every run")
    args = p.parse_args(argv)
    if len(args.days) < 2 or args.days[-1] != 1.0 or sorted(args.days) != args.days:
        p.error("--days: increasing shares ending with 1.0, at least two days")
    if not 0 <= args.launch * (len(args.days) - 1) < 1:
        p.error("--launch: the launched shares must leave items for day one")
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)

    days = split_days(read_events(args, workdir), args.days, args.launch, args.seed)
    paths = [write_day(t, workdir / "events" / f"day{d + 1}") for d, t in enumerate(days)]
    everything = write_day(pa.concat_tables(days), workdir / "events" / "all")
    print("events per day: " + ", ".join(str(t.num_rows) for t in days), flush=True)
    if args.prepare_only:
        base = None
        for d, path in enumerate(paths, start=1):
            base, seconds, _ = prepare_day(f"day{d}", path, base, args, workdir)
            overlap_row(f"day{d}", base, seconds)
        return 0

    rows = [stage("day1", paths[0], None, None, args.scratch_epochs, args, workdir)]
    for d in range(1, len(days)):
        prev = f"day{d}"
        rows.append(stage(f"day{d + 1}", paths[d], workdir / "prepared" / prev,
                          workdir / "runs" / prev, args.warm_epochs, args, workdir))  # fmt: skip
    scratch = stage("scratch", everything, None, None, args.scratch_epochs, args, workdir)
    warm = rows[-1]
    summary = {
        "rows": [*rows, scratch],
        "ndcg_ratio": warm[METRIC] / scratch[METRIC],
        "train_time_ratio": warm["train_s"] / scratch["train_s"],
        "train_cpu_ratio": warm["train_cpu_s"] / scratch["train_cpu_s"],
        "total_time_ratio": (warm["prepare_s"] + warm["train_s"])
        / (scratch["prepare_s"] + scratch["train_s"]),
    }
    (workdir / "results.json").write_text(json.dumps(summary, indent=2))
    print(
        "\n| run | users | items | new items | epochs | prepare (s) | train (s) | test "
        f"{METRIC} | train CPU (s) | load |\n|---|---|---|---|---|---|---|---|---|---|"
    )
    for r in summary["rows"]:
        print(
            f"| {r['run']} | {r['users']} | {r['items']} | {r['new_items']} | {r['epochs_run']}"
            f" | {r['prepare_s']:.0f} | {r['train_s']:.0f} | {r[METRIC]:.4f}"
            f" | {r['train_cpu_s']:.0f} | {r['load_after']} |"
        )
    print(
        f"\n{warm['run']} (warm start) / scratch: {METRIC} {summary['ndcg_ratio']:.1%}, "
        f"training time {summary['train_time_ratio']:.1%} (CPU time "
        f"{summary['train_cpu_ratio']:.1%}), prepare + training "
        f"{summary['total_time_ratio']:.1%}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
