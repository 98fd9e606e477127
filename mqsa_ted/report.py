"""Run report: the model against the baselines, training curves, sample recommendations.

    mqsa-ted report RUN_DIR [--export EXPORT_DIR] [--users 3]

Reads ``RUN_DIR/config.yaml``, ``metrics.json`` and ``model.pt``, the prepared data of the run,
and the run's export (default ``RUN_DIR/export``: run ``mqsa-ted export RUN_DIR``
first). Prints a metrics table (model, most-popular, last-item transitions) with the evaluation
protocol the metrics were measured under, and top-10 lists for a few users; writes
``curves.png`` and ``report.md`` into the run directory. An export whose weights are not the
run's current ``model.pt`` (the run was retrained since) is refused unless ``--allow-stale``.

Trust boundary: the export is loaded weights-only (safe whatever its origin); the run directory
is a trusted artifact of your own training.
"""

from __future__ import annotations

import argparse
import json
import sys

import fsspec
import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from mqsa_core.config import ConfigError, load_config  # noqa: E402
from mqsa_core.errors import UserError  # noqa: E402
from mqsa_core.storage import atomic_write_bytes  # noqa: E402
from mqsa_ted.manifest import MissingExportError  # noqa: E402
from mqsa_ted.recommend import Recommender  # noqa: E402
from trainer.data.sequences import load_sequences  # noqa: E402
from trainer.evaluation.baselines import baseline_metrics  # noqa: E402
from trainer.evaluation.metrics import METRIC_NAMES  # noqa: E402
from trainer.runtime.run_dir import RunDir  # noqa: E402

PROTOCOLS = {
    "paper": "paper (the whole train history is excluded from the ranking; a target inside it "
    "counts as a miss)",
    "repeat_aware": "repeat_aware (nothing is excluded; repeated targets are ranked)",
}


class ReportError(UserError):
    """The run or its export is not ready for a report (the message names the command to run)."""


def metrics_table(rows: dict[str, dict[str, float]]) -> str:
    """A Markdown table: one row per method, one column per metric."""
    lines = [
        "| method | " + " | ".join(METRIC_NAMES) + " |",
        "|---" * (len(METRIC_NAMES) + 1) + "|",
    ]
    for name, metrics in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{metrics[m]:.4f}" for m in METRIC_NAMES) + " |")
    return "\n".join(lines)


BASELINE_NAMES = {"most_popular": "most popular", "last_item": "last item -> most frequent next"}
SELECTION_METRIC = "NDCG@20"  # valid metric that picks the best epoch (trainer.runtime.trainer)
HEADLINE_METRIC = "NDCG@10"  # test metric the lift is stated in


def term_line(metrics: dict) -> list[str]:
    """The transition term's line when the model has one (``model.transition_term``)."""
    scale = metrics.get("transition_scale")
    if scale is None:
        return []
    return ["", f"Scores include the transition term (`model.transition_term`): its learned "
                f"weight times {scale:g}, the multiple chosen on validation."]  # fmt: skip


def lift_lines(model: dict[str, float], baselines: dict[str, dict[str, float]]) -> list[str]:
    """How the selection works, then the model's test lift over each baseline, best first."""
    lines = [
        f"The epoch is the one with the best validation {SELECTION_METRIC} (the paper's "
        f"protocol); the figures are on the test split, in {HEADLINE_METRIC}:",
        "",
    ]
    ranked = sorted(baselines, key=lambda name: -baselines[name][HEADLINE_METRIC])
    for rank, name in enumerate(ranked):
        ours, theirs = model[HEADLINE_METRIC], baselines[name][HEADLINE_METRIC]
        lift = f"{ours / theirs:.2f}x ({ours / theirs - 1:+.1%})" if theirs > 0 else "n/a"
        best = " (the best baseline)" if rank == 0 else ""
        lines.append(f"- MQSA-TED vs {name}{best}: {ours:.4f} vs {theirs:.4f}, {lift}")
    return lines


def run_warnings(metrics: dict, baselines: dict[str, dict[str, dict[str, float]]]) -> list[str]:
    """What the user should act on: the trainer's warnings (e.g. validation still improving at
    the last epoch) and a model below a baseline on the test split."""
    warnings = list(metrics.get("warnings") or [])
    ours = metrics["test"][HEADLINE_METRIC]
    for name, result in baselines.items():
        theirs = result["test"][HEADLINE_METRIC]
        if ours < theirs:
            warnings.append(
                f"MQSA-TED is below the baseline '{name}' ({ours:.4f} vs {theirs:.4f} test "
                f"{HEADLINE_METRIC}): train longer (train.min_steps, train.epochs) or check that "
                "the data has sequential structure the baseline cannot see"
            )
    return warnings


MARKERS_UP_TO = 30  # epochs drawn with a marker each (a line alone hides 1 point, blurs 3)


def epoch_axis(ax: plt.Axes, epochs: list[int]) -> None:
    """An epoch x axis: integer ticks only, and at least half an epoch of margin on either side,
    so a run of 1-3 epochs reads ``1``, ``1 2 3`` rather than ``0.96 ... 1.04``."""
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    if epochs:
        low, high = min(epochs), max(epochs)
        pad = max(0.5, 0.03 * (high - low))
        ax.set_xlim(low - pad, high + pad)


def curves_figure(epochs: list[dict], baselines: dict[str, float]) -> plt.Figure:
    """Losses per epoch, and the selection metric (valid NDCG@20) per evaluated epoch with the
    best epoch marked and each baseline's valid NDCG@20 (``baselines``) as a horizontal line.
    Short runs get a marker per epoch and integer epoch ticks (:func:`epoch_axis`)."""
    fig, (ax_loss, ax_valid) = plt.subplots(1, 2, figsize=(11, 4))
    xs = [e["epoch"] for e in epochs]
    marker = "o" if len(xs) <= MARKERS_UP_TO else None
    for key in ("loss", "loss_rec", "loss_kd"):
        ax_loss.plot(xs, [e[key] for e in epochs], marker=marker, label=key)
    epoch_axis(ax_loss, xs)
    ax_loss.set_title("training losses")
    ax_loss.legend()
    evaluated = [e for e in epochs if "valid" in e]
    values = [e["valid"][SELECTION_METRIC] for e in evaluated]
    ax_valid.plot([e["epoch"] for e in evaluated], values, "o-", label="MQSA-TED")
    if evaluated:
        best = max(range(len(values)), key=values.__getitem__)  # first maximum, as the trainer
        ax_valid.plot([evaluated[best]["epoch"]], [values[best]], "*", markersize=14,
                      label=f"best epoch {evaluated[best]['epoch']}")  # fmt: skip
    for (name, value), style in zip(baselines.items(), ("--", ":", "-."), strict=False):
        ax_valid.axhline(value, linestyle=style, color="grey", label=name)
    epoch_axis(ax_valid, xs)  # the same epochs as the losses, side by side
    ax_valid.set_title(f"validation {SELECTION_METRIC} (selects the epoch)")
    ax_valid.legend(fontsize="small")
    fig.tight_layout()
    return fig


def plot_curves(epochs: list[dict], path: str, baselines: dict[str, float]) -> None:
    """:func:`curves_figure` as a PNG at ``path``."""
    fig = curves_figure(epochs, baselines)
    with fsspec.open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)


def sample_recommendations(cfg, rec: Recommender, num_users: int) -> list[tuple[list, list]]:
    """``(history raw ids, top-10 raw ids)`` for the first ``num_users`` users (test input)."""
    seqs = load_sequences(cfg.data, cfg.train.new_target_weight)
    histories = []
    for user in range(min(num_users, seqs.num_users)):
        rows = [i for i in seqs.train[user].tolist() if i != seqs.num_items] + [
            int(seqs.valid[user])
        ]
        histories.append(rec.raw(np.array(rows)))
    results = rec.recommend(histories, k=10)
    return [(h, r.items) for h, r in zip(histories, results, strict=True)]


def open_export(run_dir: str, export_dir: str, allow_stale: bool) -> Recommender:
    """The run's export, refused when missing or older than the run's ``model.pt``."""
    try:
        return Recommender(export_dir, allow_stale, run_dir=run_dir)
    except MissingExportError as e:
        raise ReportError(
            f"no export at {export_dir} yet: run `mqsa-ted export {run_dir}"
            + (f" --out {export_dir}" if export_dir != RunDir(run_dir).path("export") else "")
            + "` first"
        ) from e


def read_metrics(run_dir: str) -> dict:
    path = RunDir(run_dir).path("metrics.json")
    try:
        with fsspec.open(path, "r") as f:
            return json.load(f)
    except FileNotFoundError as e:
        raise ReportError(f"{path} not found: train first (`mqsa-ted train CONFIG`)") from e


def write_report(
    run_dir: str, export_dir: str, num_users: int = 3, allow_stale: bool = False
) -> str:
    run = RunDir(run_dir)
    cfg = load_config(run.path("config.yaml"), fit=False)
    metrics = read_metrics(run_dir)
    rec = open_export(run_dir, export_dir, allow_stale)
    protocol = metrics.get("protocol")
    baselines = {
        BASELINE_NAMES[key]: result for key, result in baseline_metrics(cfg.data, cfg.train).items()
    }  # name -> split -> metric
    table = metrics_table(
        {
            f"MQSA-TED (epoch {metrics['best_epoch']})": metrics["test"],
            **{name: result["test"] for name, result in baselines.items()},
        }
    )
    valid_lines = {name: result["valid"][SELECTION_METRIC] for name, result in baselines.items()}
    plot_curves(metrics["epochs"], run.path("curves.png"), valid_lines)
    samples = sample_recommendations(cfg, rec, num_users)
    lines = [
        f"# Run report: {run_dir}",
        "",
        f"## Test metrics at the epoch of the best validation {SELECTION_METRIC}",
        "",
        "Evaluation protocol: "
        + PROTOCOLS.get(protocol, f"{protocol or 'not recorded in metrics.json'}"),
        *term_line(metrics),
        "",
        table,
        "",
        *lift_lines(metrics["test"], {name: result["test"] for name, result in baselines.items()}),
        "",
    ]
    warnings = run_warnings(metrics, baselines)
    if warnings:
        lines += ["## Warnings", "", *(f"- {w}" for w in warnings), ""]
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
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("run_dir")
    parser.add_argument("--export", default="", help="export dir (default <RUN_DIR>/export)")
    parser.add_argument("--users", type=int, default=3)
    parser.add_argument(
        "--allow-stale", action="store_true", help="use an export older than the run's model.pt"
    )
    args = parser.parse_args(argv)
    export_dir = args.export or RunDir(args.run_dir).path("export")
    try:
        print(write_report(args.run_dir, export_dir, args.users, args.allow_stale))
    except (UserError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
