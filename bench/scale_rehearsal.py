"""A scale rehearsal end to end: log -> Spark cluster -> catalogue training -> export -> serving.

    python bench/scale_rehearsal.py --events 2000000 --items 200000 --users 200000
        [--workdir /tmp/scale_rehearsal] [--steps 300] [--batch 512] [--target-recall 0.96]
        [--eval-users 10000] [--kcore 5] [--s3] [--local-spark] [--queries 1000]
        [--batch-users 4096] [--tune-users 2000]

One command for the production-shaped pipeline on this machine, each stage a process tree of its
own (timed, its processes' peak RSS read from ``/proc/PID/status`` ``VmHWM`` while it runs):

1. **synth**: a seeded event log with realistic skew, as Parquet (``spark_jobs.synth``'s
   ``latent`` kind: Zipf-Mandelbrot item popularity, taste clusters, heavy-tailed user lengths)
   reshaped here into sessions (bursts of events minutes apart, sessions days apart), with a
   share of repeats (an item of the user's own past) and of new items (a share of the
   catalogue that appears only late in the log); written to local storage, or with ``--s3`` to
   an S3 server on loopback (moto, ``tests/s3_server.py``; the prepared data goes there too);
2. **prepare** (``spark_jobs.prepare`` with ``configs/catalog.yaml``: 5-core filter, dedup,
   top-50 successors, streamed ``sequences/``) on a Spark standalone master with two workers
   (1 core each) on loopback, started as ``tests/test_cloud_cluster.py`` starts them
   (``--local-spark``: ``local[2]``);
3. **train**: catalogue mode (TorchRec row-wise table, sampled softmax + sparse TED, streamed
   users) on 2 processes (``mqsa-ted train --nproc 2``) for exactly ``--steps`` optimizer steps
   (``train.min_steps`` and ``train.max_steps``: an epoch of a huge log is cut), checkpoints
   every quarter of them, one evaluation at the end (of ``--eval-users`` users: ranking each
   against every item costs users x items);
4. **export** under torchrun on 2 ranks (each writes the item rows it holds: no gather) with an
   ANN index chosen for the size (HNSW up to 1 million items, IVF beyond) whose search
   parameter is tuned to ``--target-recall`` against exact search on ``--tune-users`` users'
   query vectors and recorded in the manifest (``mqsa-ted export --target-recall``; 0.96 on
   the tuning users, so that the held-out users served in stage 5 reach 0.95);
5. **recommend**: the ``Recommender`` (which sets the manifest's search parameter) answers
   ``--queries`` held-out users one at a time (k = 10: latency p50 / p99) and ``--batch-users``
   users in one call (throughput); recall@10 and @100 of what it served against an exact scan of
   the same queries (history excluded, as served).

Prints the stage table (markdown) and, last, ``recall@10 X recall@100 Y p99 Z ms``. Every
stage's figures are also kept in ``<workdir>/results.json``. The work directory is rebuilt on
every run. Internal: ``--stage synth|recommend`` runs one of the in-process stages.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIG = str(ROOT / "configs" / "catalog.yaml")
BUCKET = "rehearsal"
HNSW_UP_TO = 1_000_000  # items; beyond, IVF (HNSW's build grows faster: over 1.46M it took >10 min)
SMALL_PROCESS = 64 << 20  # processes that never reach this RSS are left out of the table
SPARK_ROLES = {
    "Master": "spark master",
    "Worker": "spark worker",
    "SparkSubmit": "spark driver (JVM)",
    "CoarseGrainedExecutorBackend": "spark executor",
}
MODULES = {  # the table's names of the pipeline's Python processes
    "spark_jobs.prepare": "prepare (Python driver)",
    "mqsa_ted.cli": "train",
    "mqsa_ted.export": "export",
    "mqsa_ted.torchrun": "torchrun",
}
# the reshaped log: shares of events and of the catalogue
P_NEW_SESSION = 0.15  # an event starts a new session (else it follows the previous by minutes)
P_REPEAT = 0.1  # an event repeats an item of the user's own past
NEW_ITEM_SHARE = 0.05  # of the catalogue: items launched in the last quarter of the log


# --- stage 1: the synthetic log ---------------------------------------------------------------


def reshape(table: pa.Table, items: int, rng: np.random.Generator) -> pa.Table:
    """One chunk of ``spark_jobs.synth`` events made production-shaped (whole users per chunk):
    each user's events regrouped into sessions (gaps of about a minute, and about two days
    between sessions, from the user's first event), a share ``P_REPEAT`` of them replaced by an
    earlier item of the same user, and the ``NEW_ITEM_SHARE`` of the catalogue with the highest
    ids (of random popularity) made new: each gets a launch time in the chunk's last quarter,
    and an event of it before then goes to the old item ``id mod launch cut`` instead."""
    table = table.sort_by([("user_id", "ascending"), ("timestamp", "ascending")])
    user = table.column("user_id").combine_chunks().dictionary_encode().indices.to_numpy()
    item = table.column("item_id").combine_chunks().indices.to_numpy().astype(np.int64)
    time_ = table.column("timestamp").to_numpy()
    n = len(item)
    first = np.r_[True, user[1:] != user[:-1]]
    start = np.maximum.accumulate(np.where(first, np.arange(n), 0))  # the user's first event
    position = np.arange(n) - start
    new_session = rng.random(n) < P_NEW_SESSION
    gaps = np.where(new_session, rng.exponential(2 * 86_400, n), rng.exponential(60, n)) + 1
    gaps[first] = 0
    cumulative = np.cumsum(gaps.astype(np.int64))
    time_ = time_[start] + cumulative - cumulative[start]
    repeat = (rng.random(n) < P_REPEAT) & (position > 0)
    earlier = start + (rng.random(n) * position).astype(np.int64)
    item = np.where(repeat, item[earlier], item)  # repeats of repeats: a past item all the same
    span_low, span_high = time_.min(), time_.max()
    launch_cut = int(items * (1 - NEW_ITEM_SHARE))
    launch = span_low + (span_high - span_low) * (0.75 + 0.25 * ((np.arange(items) * 0.618) % 1))
    early = (item >= launch_cut) & (time_ < launch[item])
    item[early] = item[early] % max(launch_cut, 1)  # an old item takes the event instead
    return pa.table(
        {
            "user_id": table.column("user_id"),
            "item_id": pa.DictionaryArray.from_arrays(
                pa.array(item.astype(np.int32)),
                table.column("item_id").combine_chunks().dictionary,
            ),
            "timestamp": pa.array(time_),
        }
    )


def synth_stage(args: argparse.Namespace) -> dict:
    """Write the reshaped log to ``args.events_url`` (Parquet, one file per synth chunk)."""
    from spark_jobs.io import staged_output
    from spark_jobs.synth import SynthSpec, chunks, write_chunk

    spec = SynthSpec(args.events, args.users, args.items, seed=0).resolved()
    written = 0
    with staged_output(args.events_url, "synthetic-events") as out:
        for index, table in enumerate(chunks(spec)):
            rng = np.random.default_rng([7, index])
            table = reshape(table, spec.items, rng)
            write_chunk(out, index, table, "parquet", False)
            written += table.num_rows
    return {"events": written, "repeats_share": P_REPEAT, "new_item_share": NEW_ITEM_SHARE,
            "items": spec.items, "users": spec.users}  # fmt: skip


# --- stage 5: serving -------------------------------------------------------------------------


def held_out_rows(data_dir: str, users: int, seed: int) -> list[np.ndarray]:
    """Train histories (item rows) of up to ``users`` users from the END of each
    ``sequences/`` file (the export tunes on the first rows of each file), shuffled."""
    from mqsa_core.prepared import SEQUENCES, dataset_files
    from mqsa_core.storage import url_to_fs

    files = dataset_files(data_dir, SEQUENCES)
    share = -(-users // len(files))
    rows: list[np.ndarray] = []
    for url in files:
        fs, path = url_to_fs(url)
        with fs.open(path, "rb") as f:
            reader = pq.ParquetFile(f)
            last = reader.read_row_group(reader.num_row_groups - 1, columns=["train_items"])
        histories = last.column(0).to_pylist()[-share:]
        rows += [np.asarray(h, np.int64) for h in histories if h]
    order = np.random.default_rng(seed).permutation(len(rows))
    return [rows[i] for i in order]


def recommend_stage(args: argparse.Namespace) -> dict:
    """Latency one query at a time, batch throughput and served recall@10/@100 vs exact."""
    import torch

    from mqsa_ted.recommend import Recommender

    start = time.perf_counter()
    rec = Recommender(args.export)
    load_s = time.perf_counter() - start
    rows = held_out_rows(args.data_dir, max(args.queries, args.batch_users), seed=1)
    histories = [rec.raw(r) for r in rows]
    queries = histories[: args.queries]
    for h in queries[:5]:  # warm-up
        rec.recommend([h], k=10)
    latencies: list[float] = []
    served: list[list] = []
    for h in queries:
        start = time.perf_counter()
        (result,) = rec.recommend([h], k=10)
        latencies.append(time.perf_counter() - start)
        served.append(result.items)
    batch = (histories * (-(-args.batch_users // len(histories))))[: args.batch_users]
    start = time.perf_counter()
    rec.recommend(batch, k=10)
    batch_s = time.perf_counter() - start
    deep = [r.items for r in rec.recommend(queries, k=100)]
    hits10 = hits100 = 0  # after the timing: the exact scans' threads would disturb it
    with torch.no_grad():
        vectors = rec.encode(rows[: len(queries)])
    for r, q, top10, top100 in zip(rows[: len(queries)], vectors, served, deep, strict=True):
        exact, _ = rec.exact_top(q, np.unique(r), 100)
        exact_ids = rec.raw(exact)
        hits10 += len(set(top10) & set(exact_ids[:10]))
        hits100 += len(set(top100) & set(exact_ids))
    ms = 1000 * np.array(latencies)
    return {
        "items": rec.count,
        "index": rec.manifest.faiss,
        "load_s": load_s,
        "queries": len(queries),
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "single_s": float(sum(latencies)),
        "batch_users": len(batch),
        "batch_s": batch_s,
        "recall@10": hits10 / (10 * len(queries)),
        "recall@100": hits100 / (100 * len(queries)),
    }


STAGES = {"synth": synth_stage, "recommend": recommend_stage}


# --- the driver: processes, their memory, the table --------------------------------------------


def process_label(pid: int) -> str:
    """A short name for a process of the pipeline: the Spark daemon's role, the Python module
    or script (with its rank under torchrun), else the program."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
        environ = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
    except OSError:
        return f"pid {pid}"
    for arg in argv:
        name = arg.rsplit(".", 1)[-1]
        if arg.startswith("org.apache.spark.") and name in SPARK_ROLES:
            return SPARK_ROLES[name]
    name = Path(argv[0]).name
    if name.startswith("python"):
        rest = argv[1:]
        name = rest[rest.index("-m") + 1] if "-m" in rest else Path(rest[0]).name if rest else name
        if name == Path(__file__).name and "--stage" in rest:
            name = rest[rest.index("--stage") + 1]
        found = re.search(r"(?:^|\0)RANK=(\d+)", environ)
        rank = f" rank {found[1]}" if found and "LOCAL_RANK=" in environ else ""
        name = f"{MODULES.get(name, name)}{rank}"
    return name


def descendants(roots: set[int]) -> set[int]:
    """``roots`` and every process below them (from ``/proc/PID/stat``'s parent ids)."""
    parent: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parent[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    found = set(roots)
    while True:
        more = {p for p, pp in parent.items() if pp in found} - found
        if not more:
            return found
        found |= more


class PeakMemory(threading.Thread):
    """Polls the processes below ``roots`` (and the roots) for their peak RSS (``VmHWM``); a
    child whose command line is its parent's (a JVM's fork before it runs a helper program) is
    left out: it reports the parent's pages."""

    def __init__(self, roots: list[int], every_s: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.roots, self.every_s = set(roots), every_s
        self.peaks: dict[int, int] = {}
        self.labels: dict[int, str] = {}
        self.done = threading.Event()

    def sample(self) -> None:
        for pid in descendants(self.roots):
            try:
                status = Path(f"/proc/{pid}/status").read_text()
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                parent = re.search(r"PPid:\s+(\d+)", status)[1]
                forked = cmdline == Path(f"/proc/{parent}/cmdline").read_bytes()
            except OSError:
                continue
            found = re.search(r"VmHWM:\s+(\d+) kB", status)
            if found and not forked:  # a fork before its exec reports its parent's memory
                if pid not in self.labels:
                    self.labels[pid] = process_label(pid)
                self.peaks[pid] = max(self.peaks.get(pid, 0), int(found[1]) << 10)

    def run(self) -> None:
        while not self.done.is_set():
            self.sample()
            self.done.wait(self.every_s)

    def stop(self) -> list[tuple[str, int]]:
        """``(label, peak bytes)`` of every process that reached ``SMALL_PROCESS``, largest
        first."""
        self.done.set()
        self.join()
        peaks = [(self.labels[p], b) for p, b in self.peaks.items() if b >= SMALL_PROCESS]
        return sorted(peaks, key=lambda lb: (-lb[1], lb[0]))


@dataclass
class Stage:
    name: str
    seconds: float
    throughput: str
    peaks: list[tuple[str, int]] = field(default_factory=list)
    figures: dict = field(default_factory=dict)


def run_stage(
    name: str, command: list[str], log: Path, env: dict[str, str], daemons: list[int] = ()
) -> tuple[float, list[tuple[str, int]]]:
    """Run ``command`` (its output to ``log``), polling its process tree and ``daemons`` (the
    Spark master and workers, whose executors work for the stage) for peak RSS. Raises
    :class:`RuntimeError` with the log's end when it fails."""
    print(f"[rehearsal] {name}: {' '.join(command)}", flush=True)
    start = time.perf_counter()
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        poller = PeakMemory([proc.pid, *daemons])
        poller.start()
        code = proc.wait()
    seconds = time.perf_counter() - start
    peaks = poller.stop()
    if code != 0:
        raise RuntimeError(
            f"{name} failed (exit {code}):\n{log.read_text(errors='replace')[-4000:]}"
        )
    return seconds, peaks


def stage_figures(workdir: Path, name: str) -> dict:
    """What an in-process stage wrote (``--stage``)."""
    return json.loads((workdir / f"{name}.json").read_text())


def spark_cluster(stack: ExitStack, workdir: Path, executor_memory: str) -> tuple[str, list[int]]:
    """A standalone master and two 1-core workers on loopback (stopped when ``stack`` closes):
    ``(master URL, their pids)``."""
    from tests.test_cloud_cluster import daemon

    logs = workdir / "spark"
    logs.mkdir()
    master = daemon(stack, logs / "master.log", "org.apache.spark.deploy.master.Master",
                    "--host", "127.0.0.1", "--port", "0", "--webui-port", "0",
                    ready=r"Starting Spark master at (spark://\S+)")[1]  # fmt: skip
    memory = f"{int(executor_memory.rstrip('g')) + 1}g"
    for worker in (1, 2):
        daemon(stack, logs / f"worker{worker}.log", "org.apache.spark.deploy.worker.Worker",
               master, "--host", "127.0.0.1", "--cores", "1", "--memory", memory,
               "--webui-port", "0", "--work-dir", str(logs / f"work{worker}"),
               ready="Successfully registered with master")  # fmt: skip
    # this process's only children now are the daemons (stages have ended, S3 is a thread)
    return master, sorted(descendants({os.getpid()}) - {os.getpid()})


def human(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def table(stages: list[Stage]) -> str:
    """The stage table (markdown)."""
    lines = ["| stage | time | throughput | peak RSS per process (GiB) |", "|---|---|---|---|"]
    for s in stages:
        peaks = ", ".join(f"{label} {b / 2**30:.2f}" if b else label for label, b in s.peaks)
        lines.append(f"| {s.name} | {human(s.seconds)} | {s.throughput} | {peaks} |")
    return "\n".join(lines)


def train_overrides(args: argparse.Namespace, data_dir: str, master: str) -> list[str]:
    """``configs/catalog.yaml`` sized for this machine and the step budget."""
    return [
        f"data.events={args.events_url}", f"data.dir={data_dir}", f"data.spark_master={master}",
        f"data.num_files={args.files}", f"data.kcore={args.kcore}",
        f"train.run_dir={args.workdir / 'run'}",
        f"train.batch_size={args.batch}", "train.epochs=1", f"train.min_steps={args.steps}",
        f"train.max_steps={args.steps}",
        "train.eval_every=1000000", "train.patience=0", "train.bf16=false",
        f"train.eval_users={args.eval_users}",
        "train.resume=fresh", "train.log_every=10", "distributed.nproc_per_node=2",
        f"checkpoint.every={max(1, args.steps // 4)}", f"export.out={args.export}",
    ]  # fmt: skip


def rehearse(args: argparse.Namespace) -> list[Stage]:
    """Run the five stages; returns their figures."""
    workdir: Path = args.workdir
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu",
           "SPARK_LOCAL_IP": "127.0.0.1", "MQSA_SPARK_DRIVER_MEMORY": args.driver_memory,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}  # fmt: skip
    me = [sys.executable, str(Path(__file__).resolve())]
    stages: list[Stage] = []
    with ExitStack() as stack:
        base = str(workdir)
        if args.s3:
            from tests.s3_server import S3Server

            server = S3Server().start()
            stack.callback(server.stop)
            env.update(server.environ())
            os.environ.update(server.environ())
            import s3fs

            s3fs.S3FileSystem().mkdir(BUCKET)
            base = f"s3://{BUCKET}"
        args.events_url, data_dir = f"{base}/events", f"{base}/prepared"
        args.export = str(workdir / "export")
        passed = ["--workdir", str(workdir), "--events", str(args.events),
                  "--items", str(args.items), "--users", str(args.users)]  # fmt: skip

        synth_cmd = [*me, "--stage", "synth", *passed, *(["--s3"] * args.s3)]
        seconds, peaks = run_stage("synth", synth_cmd, workdir / "synth.log", env)
        synth = stage_figures(workdir, "synth")
        rate = f"{synth['events'] / seconds:,.0f} events/s"
        stages.append(Stage("synth (log to Parquet)", seconds, rate, peaks, synth))

        start = time.perf_counter()
        master, daemons = "local[2]", []
        if not args.local_spark:
            master, daemons = spark_cluster(stack, workdir, args.executor_memory)
            env["PYSPARK_SUBMIT_ARGS"] = (
                f"--conf spark.executor.memory={args.executor_memory} pyspark-shell"
            )
        cluster_s = time.perf_counter() - start
        overrides = train_overrides(args, data_dir, master)
        seconds, peaks = run_stage(
            "prepare", [sys.executable, "-m", "spark_jobs.prepare", CONFIG, *overrides],
            workdir / "prepare.log", env, daemons,
        )  # fmt: skip
        from mqsa_core.prepared import read_stats

        stats = read_stats(data_dir)
        where = "local[2]"
        if not args.local_spark:
            where = f"standalone, 2 workers; +{cluster_s:.0f} s to start them"
        stages.append(Stage(f"prepare (Spark {where})", seconds,
                            f"{synth['events'] / seconds:,.0f} events/s", peaks,
                            {"users": stats["users"], "items": stats["items"]}))  # fmt: skip

        seconds, peaks = run_stage(
            "train", [sys.executable, "-m", "mqsa_ted.cli", "train", CONFIG, *overrides,
                      "--nproc", "2"], workdir / "train.log", env,
        )  # fmt: skip
        steps = steps_taken(workdir / "run")
        log = (workdir / "train.log").read_text(errors="replace")
        # every epoch line's training seconds (only the last epoch is evaluated)
        loop_s = sum(float(t) for t in re.findall(r"(?m)^epoch +\d+ \|[^|]*\| ([\d.]+) s", log))
        eval_s = sum(float(t) for t in re.findall(r"\| eval ([\d.]+) s", log))
        stages.append(Stage("train (TorchRec row-wise, 2 processes, + final evaluation)", seconds,
                            f"{steps} steps in {loop_s:.1f} s ({steps / max(loop_s, 1e-9):.1f} "
                            f"steps/s, {steps * args.batch / max(loop_s, 1e-9):,.0f} users/s); "
                            f"evaluation {eval_s:.1f} s", peaks,
                            {"steps": steps, "loop_s": loop_s, "eval_s": eval_s}))  # fmt: skip

        kind = "hnsw" if int(stats["items"]) <= HNSW_UP_TO else "ivf"
        seconds, peaks = run_stage(
            "export", [sys.executable, "-m", "mqsa_ted.torchrun", "--nproc_per_node=2",
                       "--rdzv_backend=c10d", "--rdzv_endpoint=127.0.0.1:0", "-m",
                       "mqsa_ted.export", str(workdir / "run"), "--out", args.export,
                       "--faiss", kind, "--target-recall", str(args.target_recall),
                       "--tune-users", str(args.tune_users)], workdir / "export.log", env,
        )  # fmt: skip
        manifest = json.loads(Path(latest_manifest(args.export)).read_text())
        faiss_info = manifest["faiss"]
        stages.append(Stage(f"export (2 ranks, {kind} {faiss_info['search']}: recall@10 "
                            f"{faiss_info['recall@10']:.3f}, @100 {faiss_info['recall@100']:.3f} "
                            f"on {faiss_info['tune_queries']} users)", seconds,
                            f"{manifest['count'] / seconds:,.0f} items/s", peaks,
                            faiss_info))  # fmt: skip

        seconds, peaks = run_stage(
            "recommend", [*me, "--stage", "recommend", *passed, "--export", args.export,
                          "--data-dir", data_dir, "--queries", str(args.queries),
                          "--batch-users", str(args.batch_users)],
            workdir / "recommend.log", env,
        )  # fmt: skip
        served = stage_figures(workdir, "recommend")
        stages.append(Stage(f"recommend: one query at a time, k=10 (load {served['load_s']:.1f} s)",
                            served["single_s"],
                            f"p50 {served['p50_ms']:.2f} ms, p99 {served['p99_ms']:.2f} ms",
                            peaks, served))  # fmt: skip
        rate = f"{served['batch_users'] / served['batch_s']:,.0f} users/s"
        batch_name = f"recommend: batch of {served['batch_users']:,d} users per call"
        stages.append(Stage(batch_name, served["batch_s"], rate, [("(the process above)", 0)]))
    return stages


def steps_taken(run_dir: Path) -> int:
    """Optimizer steps the run took: the step of its newest checkpoint (``step-NNNNNNNNN``; the
    last one is written when training ends)."""
    steps = [int(p.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("step-*")]
    return max(steps, default=0)


def latest_manifest(export: str) -> str:
    """The manifest path of the committed version of a local export."""
    version = json.loads(Path(export, "CURRENT").read_text())["version"]
    return str(Path(export, "versions", version, "manifest.json"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, required=True)
    parser.add_argument("--items", type=int, required=True)
    parser.add_argument("--users", type=int, required=True)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/scale_rehearsal"))
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps (cut mid-epoch)")
    parser.add_argument("--batch", type=int, default=512, help="users per step over both ranks")
    parser.add_argument("--files", type=int, default=8, help="Parquet files of sequences/")
    parser.add_argument("--kcore", type=int, default=5, help="data.kcore (0: no k-core)")
    parser.add_argument(
        "--eval-users",
        type=int,
        default=10000,
        help="users of the final evaluation (train.eval_users; 0: all)",
    )
    parser.add_argument("--target-recall", type=float, default=0.96, help="on the tuning users")
    parser.add_argument("--tune-users", type=int, default=2000)
    parser.add_argument("--queries", type=int, default=1000, help="single queries timed")
    parser.add_argument("--batch-users", type=int, default=4096, help="users in the batch call")
    parser.add_argument("--s3", action="store_true", help="log and prepared data on S3 (moto)")
    parser.add_argument("--local-spark", action="store_true", help="local[2], no cluster")
    parser.add_argument("--executor-memory", default="2g")
    parser.add_argument("--driver-memory", default="2g")
    parser.add_argument("--stage", choices=sorted(STAGES), help=argparse.SUPPRESS)
    parser.add_argument("--export", help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.stage:
        if args.stage == "synth":
            args.events_url = f"s3://{BUCKET}/events" if args.s3 else f"{args.workdir}/events"
        figures = STAGES[args.stage](args)
        (args.workdir / f"{args.stage}.json").write_text(json.dumps(figures, indent=2))
        return 0
    start = time.perf_counter()
    stages = rehearse(args)
    total = time.perf_counter() - start
    results = {"args": {k: str(v) for k, v in vars(args).items()}, "total_s": total,
               "stages": [s.__dict__ for s in stages]}  # fmt: skip
    (args.workdir / "results.json").write_text(json.dumps(results, indent=2, default=str))
    served = stages[-2].figures
    print(table(stages))
    print(f"total {human(total)}")
    print(f"recall@10 {served['recall@10']:.4f} recall@100 {served['recall@100']:.4f} "
          f"p99 {served['p99_ms']:.2f} ms")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
