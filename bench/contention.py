"""Two trainings on the same cores: each one's epoch time beside the other against its time alone.

    .venv/bin/python bench/contention.py --data data/taste [--config configs/demo.yaml]
        [--spin default 3000 0] [--epochs 4] [--threads 2] [--set KEY=VALUE ...]

For each OpenMP spin setting (``GOMP_SPINCOUNT``: how long an idle pool thread spins before it
sleeps; ``default`` leaves what the trainer sets, ``libgomp`` is libgomp's own 300,000) it runs
one training alone, then two at once, each ``mqsa-ted train --nproc 1`` with ``--threads``
threads, and prints the mean epoch time (epochs 2 on: the first one warms up) alone and beside
the other, and their ratio. Correctness beside it: the two runs beside each other print the same
per-epoch losses as the one alone (same seed, same data), else the bench exits 1.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EPOCH = re.compile(r"^epoch\s+(\d+) \| loss (\S+) .*\| ([0-9.]+) s", re.M)


def command(args: argparse.Namespace, run_dir: str) -> list[str]:
    return [
        sys.executable, "-m", "mqsa_ted.cli", "train", "--nproc", "1", args.config,
        f"data.dir={args.data}", f"train.run_dir={run_dir}", f"train.epochs={args.epochs}",
        "train.min_steps=0", "train.patience=0", "train.eval_every=1000", "train.progress=false",
        f"train.threads={args.threads}", *args.set,
    ]  # fmt: skip


def environment(spin: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("GOMP_SPINCOUNT", None)
    if spin == "libgomp":
        env["GOMP_SPINCOUNT"] = "300000"
    elif spin != "default":
        env["GOMP_SPINCOUNT"] = spin
    return env


def epochs(output: str) -> list[tuple[str, float]]:
    """``[(loss, seconds)]`` of each epoch line."""
    return [(loss, float(seconds)) for _, loss, seconds in EPOCH.findall(output)]


def run_together(commands: list[list[str]], env: dict[str, str]) -> list[list[tuple[str, float]]]:
    procs = [subprocess.Popen(c, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for c in commands]  # fmt: skip
    outputs = [p.communicate()[0] for p in procs]
    for proc, out in zip(procs, outputs, strict=True):
        if proc.returncode != 0:
            sys.exit(f"a training failed (exit {proc.returncode}):\n{out[-2000:]}")
    return [epochs(out) for out in outputs]


def mean_after_first(record: list[tuple[str, float]]) -> float:
    times = [seconds for _, seconds in record[1:]] or [record[0][1]]
    return sum(times) / len(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", required=True, help="prepared data dir (mqsa-ted prepare)")
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--spin", nargs="+", default=["default", "libgomp"])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--set", nargs="*", default=[], help="config overrides, KEY=VALUE")
    args = parser.parse_args()
    model = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text()
                  .splitlines() if ln.startswith("model name")), "?")  # fmt: skip
    print(f"machine: {model}, {os.cpu_count()} cores; {args.threads} threads per training")
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        for spin in args.spin:
            env = environment(spin)
            start = time.perf_counter()
            (alone,) = run_together([command(args, f"{tmp}/alone")], env)
            pair = run_together([command(args, f"{tmp}/a"), command(args, f"{tmp}/b")], env)
            same = all([loss for loss, _ in p] == [loss for loss, _ in alone] for p in pair)
            ok &= same and bool(alone)
            solo = mean_after_first(alone)
            beside = [mean_after_first(p) for p in pair]
            print(
                f"GOMP_SPINCOUNT={spin}: alone {solo:.2f} s/epoch; two at once "
                f"{beside[0]:.2f} and {beside[1]:.2f} s/epoch: x{beside[0] / solo:.2f}, "
                f"x{beside[1] / solo:.2f} | losses {'equal' if same else 'DIFFER'} "
                f"({time.perf_counter() - start:.0f} s)",
                flush=True,
            )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
