"""MQSA-TED against the baselines on a family of synthetic logs (project issue 14).

    PYTHONPATH=. .venv/bin/python bench/synthetic_families.py --workdir /tmp/families \
        [--kinds series markov taste mixture longtail] [--events 400000 --users 20000 \
        --items 3000 --seed 7] [section.key=value ...]

For each kind of ``spark_jobs.synth`` (what decides the next item: the last item, the user's
taste, both, a long-tailed catalogue...), writes the log with the same sizes and seed, then runs
the main job on it: ``scripts/main.sh CONFIG`` (default configs/demo.yaml) with only the data
settings changed (``data.events``, ``data.dir``, ``train.run_dir`` under ``--workdir``) plus the
same extra overrides for every kind: the model is never tuned per family. Prints a table of test
NDCG@10 (at the best valid NDCG@20 epoch) of MQSA-TED, most popular and last item -> most
frequent next, with the ratio of the model to the best baseline, and writes it as
``results.json`` in the work directory. The main job's stage lines go to ``<kind>/main.log``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from mqsa_core.config import load_config
from spark_jobs.synth import KINDS, SynthSpec, write_log
from trainer.evaluation.baselines import baseline_metrics

ROOT = Path(__file__).resolve().parents[1]
METRIC = "NDCG@10"


def run_kind(kind: str, args: argparse.Namespace) -> dict:
    """Write ``kind``'s log, run the main job on it; the test metrics of each method."""
    base = Path(args.workdir) / kind
    events = base / "events"
    if not events.exists():
        spec = SynthSpec(args.events, args.users, args.items, args.seed, kind)
        write_log(str(events), spec)
    data = [f"data.events={events}", f"data.dir={base / 'prepared'}"]
    run_dir = base / "run"
    overrides = [*data, f"train.run_dir={run_dir}", *args.overrides]
    start = time.perf_counter()
    with open(base / "main.log", "w") as log:
        proc = subprocess.run(
            ["bash", str(ROOT / "scripts" / "main.sh"), args.config, *overrides],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
            env={**os.environ, "MQSA_SKIP_SETUP": "1"},
        )  # fmt: skip
    if proc.returncode:
        raise SystemExit(f"{kind}: the main job failed (exit {proc.returncode}); see {log.name}")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    run_cfg = load_config(str(run_dir / "config.yaml"))
    baselines = baseline_metrics(run_cfg.data, run_cfg.train)
    return {
        "MQSA-TED": metrics["test"][METRIC],
        "most popular": baselines["most_popular"]["test"][METRIC],
        "last item": baselines["last_item"]["test"][METRIC],
        "best_epoch": metrics["best_epoch"],
        "seconds": round(time.perf_counter() - start, 1),
    }


def table(results: dict[str, dict]) -> str:
    """Markdown: one row per kind with the ratio of the model to the best baseline."""
    lines = [
        "| kind | MQSA-TED | most popular | last item -> most frequent next | "
        "MQSA-TED / best baseline | best epoch | main job (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for kind, r in results.items():
        best = max(r["most popular"], r["last item"])
        ratio = f"{r['MQSA-TED'] / best:.2f}" if best > 0 else "n/a"
        lines.append(
            f"| {kind} | {r['MQSA-TED']:.4f} | {r['most popular']:.4f} | {r['last item']:.4f} | "
            f"{ratio} | {r['best_epoch']} | {r['seconds']:.0f} |"
        )
    return f"test {METRIC}\n\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--kinds", nargs="+", choices=KINDS,
                        default=["series", "markov", "taste", "mixture", "longtail"])  # fmt: skip
    parser.add_argument("--events", type=int, default=400_000)
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--items", type=int, default=3_000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("overrides", nargs="*", help="section.key=value for every kind")
    args = parser.parse_args(argv)
    results = {}
    for kind in args.kinds:
        results[kind] = run_kind(kind, args)
        print(f"{kind}: {json.dumps(results[kind])}", flush=True)
    Path(args.workdir, "results.json").write_text(json.dumps(results, indent=2))
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
