"""Epoch time of the paper's own TensorFlow code next to ours, measured in one run.

    python bench/vs_reference.py --ref-path /work/mqsa_ref --ref-python /work/tfenv/bin/python \
        [--events ../shared/data/beauty/events.parquet] [--data data/beauty] [--skip-ours]

``--ref-path`` is a checkout of the reference (github.com/zhuty16/MQSA-TED: main.py,
MQSA_TED.py, utils.py, evaluate.py); ``--ref-python`` a Python with TensorFlow, numpy and scipy.
The bench

1. turns ``--events`` (user_id, item_id, timestamp) into the reference's input, a pickled
   ``[train_dict, validate_dict, test_dict, num_user, num_item]`` in ``data/NAME/NAME.npy`` of a
   temporary directory: per user (>= 3 events) the events in time order, input order on ties,
   the last one for test, the one before for validation, the rest for training -- the same
   leave-one-out split as ``spark_jobs.prepare``; user and item ids are their rank among the
   sorted raw ids (the identity for the 0-based ids of the shared sets);
2. runs the reference's unmodified ``main.py --dataset NAME --num_epoch 1`` (``--ref-epochs``;
   every other flag at its defaults: batch 256, d 64, max_len 50, dropout 0.5, L 3, ...) in that
   directory. Its epoch time is the one it prints itself (``epoch: 1, X.XXs``: ``time.time()``
   around its training loop only); its evaluation after each epoch (validation + test ranking
   of every user) is timed here, from the arrival of its ``training loss`` line to that of its
   last ``HR@20`` line (stdout unbuffered). Under Keras 3 (TensorFlow >= 2.16)
   ``tf.compat.v1.layers`` needs the ``tf-keras`` package, selected with
   ``TF_USE_LEGACY_KERAS=1`` in the environment of that run; no file of the reference is changed
   or wrapped;
3. runs ours: the ``--ours`` command (default ``.venv/bin/python bench/train_speed.py --epochs 2
   --bf16 --baseline-steps 0``) with ``--data DATA`` appended, in ``--ours-cwd`` (default: this
   checkout, also put first on PYTHONPATH), and reads its ``ours: X s/epoch ...; full
   valid+test eval of N users: Y s`` line and its ``check:`` line (train_speed exits 1, and so
   the bench, when the timed loss is not finite or the timed path disagrees with torch's
   float32 path on the same batches and weights);
4. prints the machine, both sides' figures, each labelled with who measured it, and the ratios
   (derived: reference / ours). A fixed pure-Python loop is timed before and after each side:
   when its times differ (a shared host), the figures of that run are not comparable.

Exit status 0 when both sides ran, 1 when a run failed, 2 for a wrong path or a Python without
what it needs (one line on stderr).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REF_FILES = ("main.py", "MQSA_TED.py", "utils.py", "evaluate.py")
DEFAULT_OURS = ".venv/bin/python bench/train_speed.py --epochs 2 --bf16 --baseline-steps 0"
OURS_LINE = re.compile(r"ours: ([0-9.]+) s/epoch \((.*?)\).*eval of (\d+) users: ([0-9.]+) s")
REF_EPOCH = re.compile(r"^epoch: (\d+), ([0-9.]+)s$")
REF_SIZES = re.compile(r"^num_user: (\d+), num_item: (\d+)$")
EVAL_LINES_PER_EPOCH = 6  # evaluate() prints HR@K/NDCG@K for K = 5, 10, 20, validation then test

# Run with --ref-python: what it has, as one JSON line (no TensorFlow graph is built).
PROBE = r"""
import json, importlib.util, importlib.metadata as md
out = {}
for mod in ("tensorflow", "numpy", "scipy"):
    if importlib.util.find_spec(mod) is None:
        out["missing"] = mod
        break
def version(dist):
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None
out["keras"] = version("keras")
out["tf_keras"] = version("tf-keras") if importlib.util.find_spec("tf_keras") else None
if "missing" not in out:
    import numpy, scipy
    out["numpy"], out["scipy"] = numpy.__version__, scipy.__version__
    import tensorflow as tf
    out["tensorflow"] = tf.__version__
print(json.dumps(out))
"""

# Run with --ref-python: JSON split -> the reference's .npy (written by its own numpy).
WRITE_NPY = r"""
import json, sys
import numpy as np
src, dst = sys.argv[1], sys.argv[2]
with open(src) as f:
    d = json.load(f)
train_dict = {u: seq for u, seq in enumerate(d["train"])}
validate_dict = {u: i for u, i in enumerate(d["validate"])}
test_dict = {u: i for u, i in enumerate(d["test"])}
data = np.empty(5, dtype=object)
data[:] = [train_dict, validate_dict, test_dict, d["num_user"], d["num_item"]]
np.save(dst, data, allow_pickle=True)
"""


class UsageError(Exception):
    """A wrong path or a Python without what it needs: one line, exit 2."""


class RunError(Exception):
    """A run that failed: exit 1."""


def machine() -> str:
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{model}, {os.cpu_count()} cores ({usable} usable by this process)"


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


PROBES: list[float] = []


def cpu_probe() -> float:
    """Seconds for a fixed single-threaded pure-Python loop, best of 3 (~0.6 s in all).

    Taken before and after each side: on a shared host the same work can take twice as long
    from one minute to the next, and that shows here when it does.
    """
    best = float("inf")
    for _ in range(3):
        start, x = time.perf_counter(), 0
        for i in range(3_000_000):
            x += i * i % 7
        best = min(best, time.perf_counter() - start)
    PROBES.append(best)
    return best


def state(when: str) -> str:
    return (
        f"{when}: load average {load()}, cpu probe {cpu_probe():.3f} s "
        f"[measured here: fixed pure-Python loop, best of 3]"
    )


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def resolve(path: str, default: str) -> Path:
    """User paths are relative to the working directory, defaults to the repository root."""
    return Path(path).expanduser().resolve() if path != default else (ROOT / default).resolve()


def check_reference(ref_path: Path, ref_python: str) -> tuple[dict, dict[str, str]]:
    """What --ref-python has, and the environment the reference must run with."""
    if not ref_path.is_dir():
        raise UsageError(f"--ref-path {ref_path} is not a directory")
    missing = [f for f in REF_FILES if not (ref_path / f).is_file()]
    if missing:
        raise UsageError(f"--ref-path {ref_path} is not a MQSA-TED checkout (no {missing[0]})")
    try:
        probe = subprocess.run(
            [ref_python, "-c", PROBE], capture_output=True, text=True, timeout=300
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise UsageError(f"--ref-python {ref_python} does not run: {e}") from None
    try:
        info = json.loads(probe.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        last = (probe.stderr.strip().splitlines() or ["no output"])[-1]
        raise UsageError(f"--ref-python {ref_python} failed to import tensorflow: {last}") from None
    if "missing" in info:
        raise UsageError(f"--ref-python {ref_python} has no {info['missing']}")
    env = {}
    if info.get("keras") and int(info["keras"].split(".")[0]) >= 3:
        if not info.get("tf_keras"):
            tf_minor = ".".join(info["tensorflow"].split(".")[:2])
            raise UsageError(
                f"--ref-python has TensorFlow {info['tensorflow']} with Keras {info['keras']}, "
                f"where tf.compat.v1.layers (used by the reference) needs tf-keras: "
                f"{ref_python} -m pip install --no-deps 'tf-keras~={tf_minor}.0'"
            )
        env["TF_USE_LEGACY_KERAS"] = "1"
    return info, env


def leave_one_out(events: Path) -> dict:
    """The reference's input, from our event log: 0-based ids, users with >= 3 events."""
    try:
        import pyarrow.parquet as pq  # noqa: PLC0415 (heavy, only here)
    except ImportError:
        msg = f"{sys.executable} has no pyarrow: run the bench with .venv/bin/python"
        raise UsageError(msg) from None

    try:
        table = pq.read_table(events, columns=["user_id", "item_id", "timestamp"])
    except Exception as e:  # noqa: BLE001 (any reader failure is a bad --events)
        raise UsageError(f"--events {events} is not a readable event log: {e}") from None
    users = table.column("user_id").to_pylist()
    items = table.column("item_id").to_pylist()
    stamps = table.column("timestamp").to_pylist()
    rows: dict = {}
    for pos, (u, i, ts) in enumerate(zip(users, items, stamps, strict=True)):
        rows.setdefault(u, []).append((ts, pos, i))
    seqs = {}
    for u, evs in rows.items():
        if len(evs) >= 3:
            evs.sort(key=lambda e: (e[0], e[1]))
            seqs[u] = [e[2] for e in evs]
    item_index = {i: n for n, i in enumerate(sorted({i for s in seqs.values() for i in s}))}
    train, validate, test = [], [], []
    for u in sorted(seqs):
        s = [item_index[i] for i in seqs[u]]
        train.append(s[:-2])
        validate.append(s[-2])
        test.append(s[-1])
    return {
        "train": train,
        "validate": validate,
        "test": test,
        "num_user": len(train),
        "num_item": len(item_index),
    }


def run_lines(cmd: list[str], cwd: Path, env: dict, timeout: float, stderr_path: Path):
    """Run ``cmd``, yield (arrival time, stdout line); kill its process group on timeout."""
    with open(stderr_path, "w") as err:
        proc = subprocess.Popen(
            cmd,
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            bufsize=1,
            start_new_session=True,
        )
        timed_out = threading.Event()

        def kill():
            timed_out.set()
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

        timer = threading.Timer(timeout, kill)
        timer.start()
        try:
            for line in iter(proc.stdout.readline, ""):
                yield time.perf_counter(), line.rstrip("\n")
            proc.wait()
        finally:
            timer.cancel()
            if proc.poll() is None:
                kill()
                proc.wait()
    if timed_out.is_set():
        raise RunError(f"{shlex.join(cmd[:3])} ... killed after --timeout {timeout:.0f} s")
    if proc.returncode != 0:
        tail = stderr_path.read_text().strip().splitlines()[-15:]
        raise RunError(
            f"{shlex.join(cmd)} exited {proc.returncode}; stderr ends:\n  " + "\n  ".join(tail)
        )


def run_reference(args, ref_path: Path, ref_env: dict, tmp: Path, name: str) -> dict:
    cmd = [
        args.ref_python,
        "-u",
        str(ref_path / "main.py"),
        "--dataset",
        name,
        "--num_epoch",
        str(args.ref_epochs),
    ]
    env = dict(os.environ, PYTHONUNBUFFERED="1", **ref_env)
    print(
        f"reference run: cd {tmp} && {' '.join(f'{k}={v}' for k, v in ref_env.items())}"
        f"{' ' if ref_env else ''}{shlex.join(cmd)}",
        flush=True,
    )
    start = time.perf_counter()
    res = {"epochs": [], "eval": [], "lines": []}
    t_train = t_loss = None
    eval_seen = 0
    for t, line in run_lines(cmd, tmp, env, args.timeout, tmp / "reference.stderr"):
        if args.verbose:
            print(f"  | {line}", flush=True)
        if m := REF_SIZES.match(line):
            res["num_user"], res["num_item"] = int(m[1]), int(m[2])
        elif line == "Model training...":
            t_train = t
            res["setup_s"] = t - start
        elif m := REF_EPOCH.match(line):
            res["epochs"].append(float(m[2]))
            res.setdefault("epoch_lines_s", []).append(t - t_train if t_train else float("nan"))
            t_train = None
        elif line.startswith("training loss:"):
            t_loss, eval_seen = t, 0
            res["lines"].append(line)
        elif line.startswith("HR@") and t_loss is not None:
            eval_seen += 1
            res["lines"].append(line)
            if eval_seen == EVAL_LINES_PER_EPOCH:
                res["eval"].append(t - t_loss)
                t_loss, t_train = None, t
    res["total_s"] = time.perf_counter() - start
    if len(res["epochs"]) != args.ref_epochs or len(res["eval"]) != args.ref_epochs:
        raise RunError(
            f"reference printed {len(res['epochs'])} epoch and {len(res['eval'])} "
            f"evaluation results, expected {args.ref_epochs}"
        )
    return res


def run_ours(args, data: Path, cwd: Path, tmp: Path) -> dict:
    cmd = shlex.split(args.ours) + ["--data", str(data)]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(cwd), env.get("PYTHONPATH")]))
    print(f"ours run: cd {cwd} && PYTHONPATH={cwd} {shlex.join(cmd)}", flush=True)
    found, check = None, ""
    for _, line in run_lines(cmd, cwd, env, args.timeout, tmp / "ours.stderr"):
        if args.verbose:
            print(f"  | {line}", flush=True)
        if line.startswith("check: "):
            check = line
        if m := OURS_LINE.search(line):
            found = {
                "epoch_s": float(m[1]),
                "detail": m[2],
                "users": int(m[3]),
                "eval_s": float(m[4]),
                "line": line,
            }
    if found is None:
        raise RunError(f"{shlex.join(cmd)} printed no 'ours: X s/epoch ... eval ...: Y s' line")
    found["check"] = check  # train_speed's correctness line (it exits 1 when it fails)
    return found


def report_reference(ref: dict, info: dict, epochs: int) -> None:
    row = "  {:<24} {:8.2f} s  [{}]".format
    print()
    print(
        f"reference (TensorFlow {info['tensorflow']}, its defaults: batch 256, d 64, max_len 50;"
        f" {ref['num_user']} users, {ref['num_item']} items)"
    )
    print(
        row(
            "setup before training",
            ref["setup_s"],
            "measured here: process start to its 'Model training...' line; not compared",
        )
    )
    print(
        row(
            "epoch 1 training",
            ref["epochs"][0],
            "measured by the reference: its own 'epoch: 1, X.XXs', time.time() around its "
            "training loop only",
        )
    )
    print(
        row(
            "  (cross-check)",
            ref["epoch_lines_s"][0],
            "measured here: 'Model training...' line to 'epoch: 1' line",
        )
    )
    print(
        row(
            "epoch 1 evaluation",
            ref["eval"][0],
            "measured here: 'training loss' line to its last 'HR@20' line = validation + "
            "test ranking of all users, not in its epoch time",
        )
    )
    if epochs > 1:
        later, later_eval = ref["epochs"][1:], ref["eval"][1:]
        print(
            row(
                f"epochs 2..{epochs} training",
                sum(later) / len(later),
                "mean of the reference's own prints",
            )
        )
        print(
            row(
                f"epochs 2..{epochs} evaluation",
                sum(later_eval) / len(later_eval),
                "mean, measured here",
            )
        )
    print(row("whole process", ref["total_s"], "measured here"))
    print(f"  after epoch 1: {ref['lines'][0]}")
    print(f"  validation {ref['lines'][3]}; test {ref['lines'][EVAL_LINES_PER_EPOCH]}", flush=True)


def report_ours(ours: dict, ref: dict, args: argparse.Namespace) -> None:
    row = "  {:<24} {:8.2f} s  [{}]".format
    who = "bench/train_speed.py" if args.ours == DEFAULT_OURS else "the --ours command"
    print()
    print(f"ours ({ours['detail']}; {ours['users']} users)")
    print(
        row(
            "epoch training",
            ours["epoch_s"],
            f"measured by {who}: mean of its timed epochs (train_speed: after a warm-up epoch)",
        )
    )
    print(row("evaluation", ours["eval_s"], f"measured by {who}: validation + test, all users"))
    if ours["check"]:
        print(f"  {ours['check']}")
    print()
    print("ratios [derived: reference / ours]")
    ratio = "  {:<40} x{:.2f}".format
    print(ratio("training, reference epoch 1 / ours", ref["epochs"][0] / ours["epoch_s"]))
    if args.ref_epochs > 1:
        later = sum(ref["epochs"][1:]) / len(ref["epochs"][1:])
        print(
            ratio(
                f"training, reference epochs 2..{args.ref_epochs} / ours", later / ours["epoch_s"]
            )
        )
    print(ratio("evaluation, reference epoch 1 / ours", ref["eval"][0] / ours["eval_s"]))
    if args.ref_epochs == 1:
        print(
            "  (the reference's epoch 1 includes its one-off TensorFlow warm-up, ours is timed "
            "after a warm-up epoch; --ref-epochs 2 also times its second epoch)"
        )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--events",
        default="../shared/data/beauty/events.parquet",
        help="event log (user_id, item_id, timestamp); default relative to the repo",
    )
    p.add_argument(
        "--data",
        default="data/beauty",
        help="our prepared data dir for --ours (spark_jobs.prepare output)",
    )
    p.add_argument("--ref-path", required=True, help="checkout of zhuty16/MQSA-TED")
    p.add_argument("--ref-python", required=True, help="a Python with tensorflow, numpy, scipy")
    p.add_argument(
        "--ref-epochs",
        type=int,
        default=1,
        help="epochs of the reference (default 1); it evaluates after each",
    )
    p.add_argument(
        "--ours",
        default=DEFAULT_OURS,
        help=f"command prefix for our timing, run from the repo root with --data DATA "
        f"appended (default: {DEFAULT_OURS})",
    )
    p.add_argument(
        "--ours-cwd",
        default=str(ROOT),
        help="directory --ours runs in, put first on PYTHONPATH (default: this checkout); e.g. a "
        "`git archive` of a commit while the working tree is mid-change",
    )
    p.add_argument("--skip-ours", action="store_true", help="time the reference only")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per run (default 3600)")
    p.add_argument("--keep-tmp", action="store_true", help="keep the temporary directory")
    p.add_argument("-v", "--verbose", action="store_true", help="echo both runs' stdout")
    args = p.parse_args()

    try:
        events = resolve(args.events, p.get_default("events"))
        data = resolve(args.data, p.get_default("data"))
        ref_path = Path(args.ref_path).expanduser().resolve()
        if args.ref_epochs < 1:
            raise UsageError("--ref-epochs must be >= 1")
        if not events.exists():
            raise UsageError(f"--events {events} does not exist")
        if not args.skip_ours:
            if not (data / "_COMPLETE").is_file():
                raise UsageError(
                    f"--data {data} is not a prepared data dir (no _COMPLETE); "
                    f"run: PYTHONPATH=. .venv/bin/python -m spark_jobs.prepare "
                    f"configs/beauty.yaml"
                )
            ours_cwd = Path(args.ours_cwd).expanduser().resolve()
            if not ours_cwd.is_dir():
                raise UsageError(f"--ours-cwd {ours_cwd} is not a directory")
            exe = shlex.split(args.ours)[0] if args.ours.strip() else ""
            if not exe or (os.sep in exe and not (ours_cwd / exe).exists()):
                raise UsageError(f"--ours: {exe or 'empty command'} does not exist")
        info, ref_env = check_reference(ref_path, args.ref_python)
    except UsageError as e:
        print(f"vs_reference: {e}", file=sys.stderr)
        return 2

    name = re.sub(r"[^A-Za-z0-9_]", "_", events.parent.name) or "data"
    print(f"machine: {machine()}")
    print(
        f"reference: {ref_path} (sha256[:12] main.py {sha(ref_path / 'main.py')}, "
        f"MQSA_TED.py {sha(ref_path / 'MQSA_TED.py')}, utils.py {sha(ref_path / 'utils.py')})"
    )
    print(
        f"reference python: {args.ref_python}: tensorflow {info['tensorflow']}, numpy "
        f"{info['numpy']}, scipy {info['scipy']}, keras {info.get('keras')}, "
        f"tf-keras {info.get('tf_keras')}"
    )

    t0 = time.perf_counter()
    try:
        split = leave_one_out(events)
    except UsageError as e:
        print(f"vs_reference: {e}", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="vs_reference_"))
    try:
        (tmp / "data" / name).mkdir(parents=True)
        (tmp / "split.json").write_text(json.dumps(split))
        conv = subprocess.run(
            [
                args.ref_python,
                "-c",
                WRITE_NPY,
                str(tmp / "split.json"),
                str(tmp / "data" / name / f"{name}.npy"),
            ],
            capture_output=True,
            text=True,
        )
        if conv.returncode != 0:
            print(
                f"vs_reference: writing the reference input failed: {conv.stderr.strip()}",
                file=sys.stderr,
            )
            return 1
        n_train = sum(map(len, split["train"]))
        print(
            f"data: {events} -> {split['num_user']} users, {split['num_item']} items, "
            f"{n_train} train events (leave-one-out), written to "
            f"{tmp / 'data' / name / (name + '.npy')} in {time.perf_counter() - t0:.1f} s"
        )
        stats_path = data / "stats.json"
        if not args.skip_ours and stats_path.is_file():
            stats = json.loads(stats_path.read_text())
            source = stats.get("source")
            src = (ROOT / source).resolve() if source and "://" not in source else None
            if src is not None and src != events:
                print(f"  --data {data} was prepared from {source}, not from --events")
            else:
                theirs = (stats.get("users"), stats.get("items"), stats.get("train_events"))
                same = theirs == (split["num_user"], split["num_item"], n_train)
                print(
                    f"  {'same' if same else 'DIFFERENT'} users/items/train events as "
                    f"{stats_path} ({theirs[0]}/{theirs[1]}/{theirs[2]})"
                )
        del split

        print(state("before the reference"), flush=True)
        ref = run_reference(args, ref_path, ref_env, tmp, name)
        print(state("after the reference"), flush=True)
        report_reference(ref, info, args.ref_epochs)
        if args.skip_ours:
            print("ours: skipped (--skip-ours)")
        else:
            ours = run_ours(args, data, ours_cwd, tmp)
            print(state("after ours"), flush=True)
            report_ours(ours, ref, args)
    except RunError as e:
        print(f"vs_reference: {e}", file=sys.stderr)
        print(f"vs_reference: temporary directory kept: {tmp}", file=sys.stderr)
        return 1
    spread = max(PROBES) / min(PROBES)
    verdict = "steady" if spread < 1.15 else "NOT steady: the figures are not comparable, rerun"
    print(f"machine speed over the run: cpu probe max/min x{spread:.2f} ({verdict})")
    if args.keep_tmp:
        print(f"temporary directory kept: {tmp}")
    else:
        import shutil  # noqa: PLC0415

        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
