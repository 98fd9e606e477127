"""Throughput of the prepare job on synthetic logs, with DuckDB doing the same work as baseline.

    python bench/prepare_throughput.py --events 1000000 10000000 [--workdir DIR]
        [--master local[2]] [--threads 2] [--num-files 8]

For each size: ``spark_jobs.synth`` writes a log (not timed); the whole Spark prepare job (read,
clean and count drops, vocab, sequences, transitions, stats.json, atomic commit) runs on
``--master`` in a session started and warmed up on a 3e5-event log beforehand (JVM start-up and
JIT compilation are not counted); then DuckDB does the same work in this process with
``--threads`` threads: the same drop counts, 3-event minimum, vocab order, time-ordered
sequences with the input-order tie-break, leave-one-out split, paper-mode transition counts,
Parquet outputs and stats.json.
Both results are compared (users, items, events, train events, edges). Printed per size:
seconds, events/s and CPU seconds for each engine and the Spark/DuckDB time ratio; then Spark's
seconds per event at the largest size over that at the smallest.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import duckdb
import psutil

from mqsa_core.config import DataConfig
from spark_jobs.prepare import prepare
from spark_jobs.progress import Progress
from spark_jobs.session import build_session
from spark_jobs.synth import SynthSpec, write_log

MAX_LEN = 50
WARMUP_EVENTS = 300_000  # JIT-compiles the hot paths before anything is timed
COMPARED = ("users", "items", "events", "train_events", "num_transitions")


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and its children (the Spark JVM)."""
    procs = [psutil.Process(), *psutil.Process().children(recursive=True)]
    total = 0.0
    for proc in procs:
        try:
            times = proc.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def timed(run: Callable[[], dict[str, Any]]) -> tuple[dict[str, Any], float, float]:
    """``run()``'s result, wall seconds and CPU seconds."""
    cpu, start = cpu_seconds(), time.perf_counter()
    result = run()
    return result, time.perf_counter() - start, cpu_seconds() - cpu


def duckdb_prepare(events: str, out: str, threads: int, max_len: int = MAX_LEN) -> dict[str, Any]:
    """The prepare job's work in DuckDB SQL; returns its stats (also written to stats.json)."""
    os.makedirs(out, exist_ok=True)
    con = duckdb.connect()
    con.execute(f"SET threads = {threads}")
    con.execute("SET preserve_insertion_order = false")
    con.execute("SET enable_progress_bar = false")
    pattern = f"{events}/*.parquet"
    con.execute(f"""
        CREATE TEMP TABLE raw AS
        WITH files AS (SELECT file, row_number() OVER (ORDER BY file) AS fid FROM glob('{pattern}'))
        SELECT user_id AS u, item_id::VARCHAR AS i, "timestamp" AS ts,
               (fid << 40) + file_row_number AS seq
        FROM read_parquet('{pattern}', filename = true, file_row_number = true) r
        JOIN files ON r.filename = files.file""")
    rows, null_user, null_item, null_ts = con.execute("""
        SELECT count(*), count_if(u IS NULL), count_if(u IS NOT NULL AND i IS NULL),
               count_if(u IS NOT NULL AND i IS NOT NULL AND ts IS NULL) FROM raw""").fetchone()
    con.execute("""
        CREATE TEMP TABLE ev AS
        WITH clean AS (SELECT * FROM raw WHERE u IS NOT NULL AND i IS NOT NULL AND ts IS NOT NULL),
             users AS (SELECT u FROM clean GROUP BY u HAVING count(*) >= 3)
        SELECT * FROM clean SEMI JOIN users USING (u)""")
    con.execute("""
        CREATE TEMP TABLE vocab AS
        SELECT i AS item_id, (row_number() OVER (ORDER BY count(*) DESC, i) - 1)::BIGINT AS index,
               count(*)::BIGINT AS count
        FROM ev GROUP BY i""")
    con.execute(f"COPY (FROM vocab ORDER BY index) TO '{out}/vocab.parquet' (FORMAT parquet)")
    con.execute("""
        CREATE TEMP TABLE seqs AS
        SELECT u, list_transform(list_sort(list({'ts': ts, 'seq': seq, 'idx': index})),
                                 x -> x.idx) AS items
        FROM ev JOIN vocab ON ev.i = vocab.item_id GROUP BY u""")
    con.execute(f"""
        COPY (SELECT u AS user_id, items[1:len(items) - 2] AS train_items,
                     items[-2] AS valid_item, items[-1] AS test_item FROM seqs)
        TO '{out}/sequences' (FORMAT parquet, PER_THREAD_OUTPUT true, OVERWRITE true)""")
    con.execute(f"""
        COPY (
            WITH cut AS (SELECT items[greatest(len(items) - 1 - {max_len}, 1):len(items) - 2] AS t
                         FROM seqs),
                 pairs AS (SELECT t[k] AS src, t[k + 1] AS dst
                           FROM (SELECT t, unnest(range(1, len(t))) AS k FROM cut))
            SELECT src, dst, count(*)::BIGINT AS count FROM pairs GROUP BY src, dst)
        TO '{out}/transitions.parquet' (FORMAT parquet)""")
    users, kept = con.execute("SELECT count(*), sum(len(items)) FROM seqs").fetchone()
    clean = rows - null_user - null_item - null_ts
    stats = {
        "users": users,
        "items": con.execute("SELECT count(*) FROM vocab").fetchone()[0],
        "events": int(kept),
        "train_events": int(kept) - 2 * users,
        "events_read": rows,
        "dropped": {
            "null_user": null_user,
            "null_item": null_item,
            "null_timestamp": null_ts,
            "short_user_events": clean - int(kept),
        },  # fmt: skip
        "num_transitions": con.execute(
            f"SELECT count(*) FROM '{out}/transitions.parquet'"
        ).fetchone()[0],
    }
    with open(f"{out}/stats.json", "w") as f:
        json.dump(stats, f)
    con.close()
    return stats


def spark_prepare(spark: Any, events: str, out: str, num_files: int) -> dict[str, Any]:
    """The Spark prepare job (paper mode defaults) on ``events`` into ``out``."""
    cfg = DataConfig(events=events, dir=out, num_files=num_files, max_len=MAX_LEN)
    return prepare(cfg, spark, Progress(tag="spark"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--workdir", help="scratch directory (default: a temporary one)")
    parser.add_argument("--master", default="local[2]")
    parser.add_argument("--threads", type=int, default=2, help="DuckDB threads")
    parser.add_argument("--num-files", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    workdir = args.workdir or tempfile.mkdtemp(prefix="prepare-bench-")
    spark = build_session(args.master, app_name="prepare-throughput")
    warm = f"{workdir}/warmup"
    write_log(f"{warm}/events", SynthSpec(events=WARMUP_EVENTS, seed=args.seed))
    spark_prepare(spark, f"{warm}/events", f"{warm}/out", args.num_files)
    results = []
    for n in args.events:
        base = f"{workdir}/n{n}"
        write_log(f"{base}/events", SynthSpec(events=n, seed=args.seed))
        s_stats, s_wall, s_cpu = timed(
            lambda b=base: spark_prepare(spark, f"{b}/events", f"{b}/spark", args.num_files)
        )
        d_stats, d_wall, d_cpu = timed(
            lambda b=base: duckdb_prepare(f"{b}/events", f"{b}/duckdb", args.threads)
        )
        differ = {k: (s_stats[k], d_stats[k]) for k in COMPARED if s_stats[k] != d_stats[k]}
        agree = not differ
        results.append({"events": n, "spark_s": s_wall, "spark_cpu_s": s_cpu,
                        "duckdb_s": d_wall, "duckdb_cpu_s": d_cpu, "agree": agree})  # fmt: skip
        print(
            f"[bench] events={n:,}: spark {s_wall:.1f}s ({n / s_wall:,.0f} ev/s, cpu {s_cpu:.1f}s)"
            f" | duckdb {d_wall:.1f}s ({n / d_wall:,.0f} ev/s, cpu {d_cpu:.1f}s)"
            f" | spark/duckdb {s_wall / d_wall:.2f}x (cpu {s_cpu / d_cpu:.2f}x)"
            f" | outputs agree: {agree}" + (f" (spark, duckdb: {differ})" if differ else ""),
            flush=True,
        )
        shutil.rmtree(base, ignore_errors=True)
    if len(results) > 1:
        small, large = results[0], results[-1]
        per_event = (large["spark_s"] / large["events"]) / (small["spark_s"] / small["events"])
        cpu_ratio = (large["spark_cpu_s"] / large["events"]) / (
            small["spark_cpu_s"] / small["events"]
        )
        print(
            f"[bench] spark seconds/event at {large['events']:,} vs {small['events']:,}: "
            f"{per_event:.2f}x (cpu {cpu_ratio:.2f}x)"
        )
    print(f"[bench] load average during run: {os.getloadavg()[0]:.1f} (cores {os.cpu_count()})")
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    spark.stop()
    return 0 if all(r["agree"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
