"""Run report: the model against the baselines, training curves, sample recommendations.

    python -m mqsa_ted.report RUN_DIR [--export EXPORT_DIR] [--users 3]

Prints a metrics table (model, most-popular, last-item transitions) and top-10 lists for a few
users, and writes ``curves.png`` and ``report.md`` into the run directory.
"""

from __future__ import annotations

import argparse
import json
import sys

import fsspec
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from core.config import load_config  # noqa: E402
from core.storage import atomic_write_bytes  # noqa: E402
from mqsa_ted.export import read_vocab  # noqa: E402
from mqsa_ted.recommend import Recommender  # noqa: E402
from trainer.baselines import baseline_metrics  # noqa: E402
from trainer.data import load_sequences  # noqa: E402
from trainer.metrics import METRIC_NAMES  # noqa: E402
from trainer.run_dir import RunDir  # noqa: E402


def metrics_table(rows: dict[str, dict[str, float]]) -> str:
    """A Markdown table: one row per method, one column per metric."""
    lines = [
        "| method | " + " | ".join(METRIC_NAMES) + " |",
        "|---" * (len(METRIC_NAMES) + 1) + "|",
    ]
    for name, metrics in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{metrics[m]:.4f}" for m in METRIC_NAMES) + " |")
    return "\n".join(lines)


def plot_curves(epochs: list[dict], path: str) -> None:
    """Losses and validation NDCG@10 per epoch, as one PNG."""
    fig, (ax_loss, ax_ndcg) = plt.subplots(1, 2, figsize=(10, 4))
    xs = [e["epoch"] for e in epochs]
    for key in ("loss", "loss_rec", "loss_kd"):
        ax_loss.plot(xs, [e[key] for e in epochs], label=key)
    ax_loss.set_xlabel("epoch")
    ax_loss.set_title("training losses")
    ax_loss.legend()
    evaluated = [e for e in epochs if "valid" in e]
    ax_ndcg.plot([e["epoch"] for e in evaluated], [e["valid"]["NDCG@10"] for e in evaluated], "o-")
    ax_ndcg.set_xlabel("epoch")
    ax_ndcg.set_title("validation NDCG@10")
    fig.tight_layout()
    with fsspec.open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)


def sample_recommendations(cfg, export_dir: str, num_users: int) -> list[tuple[list, list]]:
    """``(history raw ids, top-10 raw ids)`` for the first ``num_users`` users (test input)."""
    seqs = load_sequences(cfg)
    raw_ids = read_vocab(cfg.data.dir)
    rec = Recommender(export_dir)
    histories = []
    for user in range(min(num_users, seqs.num_users)):
        rows = [i for i in seqs.train[user].tolist() if i != seqs.num_items] + [
            int(seqs.valid[user])
        ]
        histories.append([raw_ids[i] for i in rows])
    results = rec.recommend(histories, k=10)
    return [(h, r.items) for h, r in zip(histories, results, strict=True)]


def write_report(run_dir: str, export_dir: str, num_users: int = 3) -> str:
    run = RunDir(run_dir)
    cfg = load_config(run.path("config.yaml"))
    with fsspec.open(run.path("metrics.json"), "r") as f:
        metrics = json.load(f)
    baselines = baseline_metrics(cfg)
    table = metrics_table(
        {
            f"MQSA-TED (epoch {metrics['best_epoch']})": metrics["test"],
            "most popular": baselines["most_popular"]["test"],
            "last item -> most frequent next": baselines["last_item"]["test"],
        }
    )
    plot_curves(metrics["epochs"], run.path("curves.png"))
    samples = sample_recommendations(cfg, export_dir, num_users)
    lines = [
        f"# Run report: {run_dir}",
        "",
        "## Test metrics (best validation NDCG@20)",
        "",
        table,
        "",
    ]
    lines += [
        "## Training curves",
        "",
        "![curves](curves.png)",
        "",
        "## Sample recommendations",
        "",
    ]
    for history, items in samples:
        lines.append(f"- history (last 5) `{', '.join(map(str, history[-5:]))}` -> top-10 "
                     f"`{', '.join(map(str, items))}`")  # fmt: skip
    report = "\n".join(lines) + "\n"
    atomic_write_bytes(run.path("report.md"), report.encode())
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir")
    parser.add_argument("--export", default="", help="export dir (default <RUN_DIR>/export)")
    parser.add_argument("--users", type=int, default=3)
    args = parser.parse_args(argv)
    export_dir = args.export or RunDir(args.run_dir).path("export")
    print(write_report(args.run_dir, export_dir, args.users))
    return 0


if __name__ == "__main__":
    sys.exit(main())
