"""Numerics fuzz: short trainings over many logs and every numeric path; no step may go
non-finite, and the paths must agree on quality.

    .venv/bin/python bench/numerics_fuzz.py --workdir /tmp/fuzz \
        [--repro ../shared/data/repro/taste-log.csv] [--seeds 3] [--variants all]

Logs: every kind ``spark_jobs/synth.py`` makes, ``--seeds`` seeds each (``--users`` users,
``--items`` items, ``--events`` events), plus ``--repro`` (a CSV with ``customer``, ``product``,
``event_time``: the log that stopped the main job on an Intel Xeon). Each is prepared once with
Spark under ``--workdir``. Trainings: the demo template (``configs/demo.yaml``) for ``--epochs``
epochs, one process, crossed over {bf16 on, off} x {CPU kernel on, off} x {transition term on,
off} x {dense, torchrec} (the kernel only matters with bf16: 12 distinct runs per log).

Variants, each in its own process (the environment must be set before torch loads):

- ``default``: this machine as it is;
- ``kernel-refused``: ``MQSA_CPU_FLAGS=-avx512_bf16``, as on a CPU without AVX-512 BF16;
- ``onednn-avx512``: ``ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16`` (oneDNN without AMX);
- ``aten-avx2``: ``ATEN_CPU_CAPABILITY=avx2`` (torch's own kernels in AVX2).

The non-default variants train one seed per kind plus the reproduction, dense only (6 runs per
log). ``--assume-bf16`` sets ``MQSA_CPU_FLAGS=+avx512_bf16`` in the
``default`` and oneDNN variants when the CPU runs AVX-512 BF16 but ``/proc/cpuinfo`` hides it (a
VM; probed in a child process first).

Per log it reports the non-finite steps (must be 0), and test NDCG@10 of bf16 against float32
(within ``--bf16-tolerance``, 3% relative) and of the kernel against torch's path (within
``--kernel-tolerance``, 1%), the worst over the term x backend cells; the markdown table goes to
stdout and ``--workdir``/results.md. Exit status 1 when anything is non-finite or out of
tolerance.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS = {
    "default": {},
    "kernel-refused": {"MQSA_CPU_FLAGS": "-avx512_bf16"},
    "onednn-avx512": {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"},
    "aten-avx2": {"ATEN_CPU_CAPABILITY": "avx2"},
}
BASE = ["train.min_steps=0", "train.patience=0", "train.warmup_steps=10", "train.progress=false",
        "train.log_every=0", "distributed.nproc_per_node=1", "train.threads=2"]  # fmt: skip


def prepare_logs(args: argparse.Namespace) -> dict[str, str]:
    """``{log name: prepared data dir}``, generating and preparing what is missing."""
    from mqsa_core.config import load_config
    from spark_jobs.prepare import prepare
    from spark_jobs.progress import Progress
    from spark_jobs.session import build_session
    from spark_jobs.synth import KINDS, SynthSpec, write_log

    work = Path(args.workdir)
    logs: dict[str, tuple[str, list[str]]] = {}
    for kind in KINDS:
        for seed in range(args.seeds):
            events = work / "events" / f"{kind}-{seed}"
            if not (events / "_COMPLETE").exists():
                spec = SynthSpec(args.events, args.users, args.items, seed=seed, kind=kind)
                write_log(str(events), spec)
            logs[f"{kind}-{seed}"] = (str(events), [])
    if args.repro:
        logs["repro"] = (args.repro, ["data.user_col=customer", "data.item_col=product",
                                      "data.time_col=event_time"])  # fmt: skip
    dirs, spark = {}, None
    for name, (events, columns) in logs.items():
        out = work / "prepared" / name
        if not (out / "_COMPLETE").exists():
            spark = spark or build_session()
            cfg = load_config("configs/demo.yaml", [f"data.events={events}", f"data.dir={out}",
                                                    "data.num_files=1", *columns])  # fmt: skip
            prepare(cfg.data, spark, Progress(log=lambda line: None))
        dirs[name] = str(out)
    if spark is not None:
        spark.stop()
    return dirs


def combinations(variant: str) -> list[dict[str, bool | str]]:
    """The runs of one log: bf16, kernel, term, backend."""
    runs = []
    for backend in ("dense",) if variant != "default" else ("dense", "torchrec"):
        for term in (True, False):
            for bf16, kernel in ((True, True), (True, False), (False, False)):
                runs.append({"bf16": bf16, "kernel": kernel, "term": term, "backend": backend})
    return runs


def train_all(args: argparse.Namespace, variant: str, dirs: dict[str, str]) -> list[dict]:
    """Every run of ``variant`` in this process (one process group of one)."""
    from mqsa_core.config import load_config
    from trainer.runtime.builder import build_run
    from trainer.runtime.distributed import init_distributed
    from trainer.runtime.trainer import Trainer, TrainingDiverged

    env = init_distributed()
    logs = dirs if variant == "default" else {
        k: v for k, v in dirs.items() if k == "repro" or k.endswith("-0")
    }  # fmt: skip
    results = []
    for name, data in logs.items():
        for run in combinations(variant):
            overrides = [
                f"data.dir={data}", f"train.run_dir={args.workdir}/runs/{variant}/{name}",
                f"train.epochs={args.epochs}", f"train.eval_every={args.epochs}",
                f"train.bf16={run['bf16']}", f"train.cpu_kernel={run['kernel']}",
                f"model.transition_term={run['term']}", f"embeddings.backend={run['backend']}",
                *BASE,
            ]  # fmt: skip
            start = time.perf_counter()
            trainer = Trainer(build_run(load_config("configs/demo.yaml", overrides), env))
            kernel_ran = getattr(trainer.model, "kernel", None) is not None
            try:
                metrics = trainer.fit()
                ndcg, error = metrics["test"]["NDCG@10"], ""
            except TrainingDiverged as e:
                ndcg, error = float("nan"), str(e)
            record = {**run, "log": name, "variant": variant, "kernel_ran": kernel_ran,
                      "skipped": trainer.guard.skipped(), "ndcg10": ndcg, "error": error,
                      "seconds": time.perf_counter() - start}  # fmt: skip
            results.append(record)
            print(json.dumps(record), flush=True)
    return results


def relative(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def table(results: list[dict], bf16_tol: float, kernel_tol: float) -> tuple[list[str], bool]:
    """Markdown rows per variant and log, and whether everything passed."""
    rows = ["| variant | log | runs | kernel ran | non-finite steps | float32 NDCG@10 | "
            "bf16 vs float32 (worst) | kernel vs torch (worst) | |",
            "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    passed = True
    keys = sorted({(r["variant"], r["log"]) for r in results}, key=lambda k: (k[0] != "default", k))
    for variant, log in keys:
        runs = [r for r in results if r["variant"] == variant and r["log"] == log]
        skipped = sum(r["skipped"] for r in runs) + sum(bool(r["error"]) for r in runs)

        def pick(bf16: bool, kernel: bool, term: bool, backend: str, among=runs) -> dict | None:
            match = [r for r in among if (r["bf16"], r["kernel"], r["term"], r["backend"])
                     == (bf16, kernel, term, backend)]  # fmt: skip
            return match[0] if match else None

        bf16_gap, kernel_gap, fp32 = [], [], []
        for cell in {(r["term"], r["backend"]) for r in runs}:
            on, torch_bf16, f32 = (pick(True, True, *cell), pick(True, False, *cell),
                                   pick(False, False, *cell))  # fmt: skip
            if f32:
                fp32.append(f32["ndcg10"])
                bf16_gap += [relative(r["ndcg10"], f32["ndcg10"]) for r in (on, torch_bf16) if r]
            if on and torch_bf16:
                kernel_gap.append(relative(on["ndcg10"], torch_bf16["ndcg10"]))
        worst_bf16 = max(bf16_gap) if bf16_gap else float("nan")
        worst_kernel = max(kernel_gap) if kernel_gap else float("nan")
        ok = (skipped == 0 and not (worst_bf16 > bf16_tol) and not (worst_kernel > kernel_tol)
              and all(r["ndcg10"] == r["ndcg10"] for r in runs))  # fmt: skip
        passed &= ok
        ran = sum(r["kernel_ran"] for r in runs)
        f32_text = f"{sum(fp32) / len(fp32):.4f}" if fp32 else "-"
        rows.append(
            f"| {variant} | {log} | {len(runs)} | {ran} | {skipped} | {f32_text} | "
            f"{worst_bf16:.2%} | {worst_kernel:.2%} | {'ok' if ok else 'FAIL'} |"
        )
    return rows, passed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--repro", default="", help="the reproduction's CSV (optional)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--users", type=int, default=2000)
    parser.add_argument("--items", type=int, default=400)
    parser.add_argument("--events", type=int, default=40000)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--variants", default="all", help=f"all or some of {', '.join(VARIANTS)}")
    parser.add_argument("--assume-bf16", action="store_true")
    parser.add_argument("--bf16-tolerance", type=float, default=0.03)
    parser.add_argument("--kernel-tolerance", type=float, default=0.01)
    parser.add_argument("--only-variant", help=argparse.SUPPRESS)
    args = parser.parse_args()
    work = Path(args.workdir)
    if args.only_variant:  # a child: train and write the results
        dirs = json.loads((work / "logs.json").read_text())
        results = train_all(args, args.only_variant, dirs)
        (work / f"results-{args.only_variant}.json").write_text(json.dumps(results))
        return 0
    work.mkdir(parents=True, exist_ok=True)
    dirs = prepare_logs(args)
    (work / "logs.json").write_text(json.dumps(dirs))
    from trainer.model import cpu_kernels

    assume = args.assume_bf16 and "avx512_bf16" not in cpu_kernels.cpu_flags()
    if assume and not cpu_kernels.executes_bf16_dot():
        sys.exit("--assume-bf16: this CPU does not run AVX-512 BF16")
    names = list(VARIANTS) if args.variants == "all" else args.variants.split(",")
    results = []
    for variant in names:
        env = {**os.environ, "PYTHONPATH": str(ROOT), **VARIANTS[variant]}
        if assume and variant in ("default", "onednn-avx512"):
            env["MQSA_CPU_FLAGS"] = "+avx512_bf16"
        command = [sys.executable, __file__, "--only-variant", variant,
                   *(a for a in sys.argv[1:] if a != "--assume-bf16")]  # fmt: skip
        print(f"== {variant}: {' '.join(f'{k}={v}' for k, v in VARIANTS[variant].items())}",
              flush=True)  # fmt: skip
        if subprocess.run(command, env=env, cwd=ROOT).returncode != 0:
            print(f"variant {variant}: the training process failed", flush=True)
            return 1
        results += json.loads((work / f"results-{variant}.json").read_text())
    model = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text()
                  .splitlines() if ln.startswith("model name")), "?")  # fmt: skip
    rows, passed = table(results, args.bf16_tolerance, args.kernel_tolerance)
    text = "\n".join([f"machine: {model}; {len(results)} trainings", "", *rows])
    print(text)
    (work / "results.md").write_text(text + "\n")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
