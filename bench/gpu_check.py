"""The GPU check's Python part (``scripts/gpu_check.sh`` runs it): a short synthetic training on
one device for paper mode and catalogue mode, an export, and the figures a GPU user asks for.

    python bench/gpu_check.py require-cuda                  # exit 3, "no CUDA device", if none
    python bench/gpu_check.py run --device cpu  --out cpu.json
    python bench/gpu_check.py run --device cuda --out cuda.json
    python bench/gpu_check.py compare cpu.json cuda.json    # same losses and metrics, tolerance

``run`` trains one epoch per mode on the same seeded synthetic data (dropout 0 and float32, so a
CPU and a GPU run compute the same function; the negatives are drawn on the host, so both see
the same candidates), evaluates, exports (no FAISS: it is optional), and records the epoch's
mean losses, the metrics, step time, samples (users) per second and peak device memory. Each
device runs in its own process: DeepSpeed picks its accelerator once per process.

Needs torch, deepspeed, pyarrow, fsspec, pyyaml and tqdm; the dense item table only (TorchRec
needs fbgemm-gpu: see docs/gpu.md).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODES = {
    "paper": ["loss.candidates=all"],
    "catalog": ["loss.candidates=sampled", "loss.sampler=mixed", "loss.num_negatives=1024"],
    # the templates' transition term: sparse additions inside the full softmax and evaluation
    "paper_transition_term": ["loss.candidates=all", "model.transition_term=true"],
}
TOLERANCE = {"loss_rtol": 1e-3, "metric_atol": 5e-3}


def require_cuda() -> int:
    try:
        import torch
    except ImportError:
        print("no CUDA device: torch is not installed in this Python", file=sys.stderr)
        return 3
    if not torch.cuda.is_available():
        print(f"no CUDA device: torch {torch.__version__} sees no GPU", file=sys.stderr)
        return 3
    print(f"CUDA: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    return 0


def synthetic_data(workdir: Path, users: int, items: int) -> Path:
    """A seeded prepared-data directory (no Spark needed: written with pyarrow)."""
    sys.path.insert(0, str(ROOT))
    from tests.synthetic import write_prepared

    data = workdir / "data"
    if not (data / "_COMPLETE").exists():
        write_prepared(data, num_users=users, num_items=items, max_len=50, seed=11, num_files=4)
    return data


def run(device: str, out: str, workdir: str, users: int, items: int) -> int:
    os.environ["DS_ACCELERATOR"] = device
    import torch

    from mqsa_core.config import load_config
    from mqsa_ted.export import export_run
    from trainer.runtime.builder import build_run
    from trainer.runtime.distributed import init_distributed, shutdown
    from trainer.runtime.trainer import Trainer

    work = Path(workdir) / device
    data = synthetic_data(Path(workdir), users, items)
    env = init_distributed()
    results = {"device": device, "name": torch.cuda.get_device_name(0) if device == "cuda" else
               "cpu", "torch": torch.__version__, "modes": {}}  # fmt: skip
    for mode, overrides in MODES.items():
        cfg = load_config(None, [
            f"data.dir={data}", "data.max_len=50", "model.dim=64", "model.dropout=0.0",
            "train.batch_size=256", "train.epochs=1", "train.bf16=false", "train.progress=false",
            f"train.run_dir={work / mode}", "embeddings.backend=dense", *overrides,
        ])  # fmt: skip
        trainer = Trainer(build_run(cfg, env))
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        result = trainer.fit()
        record = result["epochs"][0]
        steps = trainer.users.steps_per_epoch()
        peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None
        manifest = export_run(str(work / mode), str(work / f"{mode}-export"), faiss_kind="none")
        results["modes"][mode] = {
            "loss_rec": record["loss_rec"],
            "loss_kd": record["loss_kd"],
            "valid": record["valid"],
            "test": record["test"],
            "step_ms": 1000 * record["seconds"] / steps,
            "samples_per_s": trainer.users.num_users / record["seconds"],
            "eval_s": record["eval_seconds"],
            "wall_s": time.perf_counter() - start,
            "peak_mib": peak,
            "exported_items": manifest.count,
        }
        line = results["modes"][mode]
        peak_text = f", peak {peak:.0f} MiB" if peak is not None else ""
        print(f"[{device}] {mode}: {line['step_ms']:.1f} ms/step, "
              f"{line['samples_per_s']:.0f} users/s, eval {line['eval_s']:.2f} s{peak_text}, "
              f"rec {line['loss_rec']:.5f} kd {line['loss_kd']:.5f}, "
              f"test NDCG@10 {line['test']['NDCG@10']:.4f}, "
              f"exported {manifest.count} items")  # fmt: skip
    shutdown()
    Path(out).write_text(json.dumps(results, indent=2))
    return 0


def compare(reference: str, other: str) -> int:
    """Same losses (relative tolerance) and metrics (absolute tolerance) in both runs."""
    a, b = json.loads(Path(reference).read_text()), json.loads(Path(other).read_text())
    failures = []
    for mode, want in a["modes"].items():
        got = b["modes"][mode]
        for key in ("loss_rec", "loss_kd"):
            if abs(got[key] - want[key]) > TOLERANCE["loss_rtol"] * max(abs(want[key]), 1e-8):
                failures.append(f"{mode} {key}: {a['device']} {want[key]:.6f} "
                                f"vs {b['device']} {got[key]:.6f}")  # fmt: skip
        for split in ("valid", "test"):
            for metric, value in want[split].items():
                if abs(got[split][metric] - value) > TOLERANCE["metric_atol"]:
                    failures.append(f"{mode} {split} {metric}: {value:.4f} vs "
                                    f"{got[split][metric]:.4f}")  # fmt: skip
        speed = want["step_ms"] / got["step_ms"]
        print(f"{mode}: {b['device']} {got['step_ms']:.1f} ms/step vs {a['device']} "
              f"{want['step_ms']:.1f} ms/step (x{speed:.1f}); losses within "
              f"rtol {TOLERANCE['loss_rtol']}, "
              f"metrics within {TOLERANCE['metric_atol']}")  # fmt: skip
    for failure in failures:
        print("MISMATCH", failure, file=sys.stderr)
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("require-cuda")
    run_p = sub.add_parser("run")
    run_p.add_argument("--device", choices=["cpu", "cuda"], required=True)
    run_p.add_argument("--out", required=True)
    run_p.add_argument("--workdir", default="/tmp/gpu_check")
    run_p.add_argument("--users", type=int, default=4096)
    run_p.add_argument("--items", type=int, default=20000)
    cmp_p = sub.add_parser("compare")
    cmp_p.add_argument("reference")
    cmp_p.add_argument("other")
    args = parser.parse_args(argv)
    if args.command == "require-cuda":
        return require_cuda()
    if args.command == "run":
        return run(args.device, args.out, args.workdir, args.users, args.items)
    return compare(args.reference, args.other)


if __name__ == "__main__":
    sys.exit(main())
