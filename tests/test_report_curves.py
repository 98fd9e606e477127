"""The report's curves stay readable for short runs: a marker per epoch, integer epoch ticks and
at least half an epoch of margin (a one-epoch run once drew an empty plot ticked 0.96-1.04)."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import pytest

from mqsa_ted.report import curves_figure, plot_curves

BASELINES = {"most popular": 0.05}


def epoch_records(count: int, evaluate_every: int = 1) -> list[dict]:
    """``count`` epoch records shaped like metrics.json's (losses falling, NDCG rising)."""
    records = []
    for epoch in range(1, count + 1):
        record = {"epoch": epoch, "loss": 5.0 / epoch, "loss_rec": 4.5 / epoch,
                  "loss_kd": 5.0 / epoch, "seconds": 1.0}  # fmt: skip
        if epoch % evaluate_every == 0 or epoch == count:
            record["valid"] = {"NDCG@20": 0.1 + 0.01 * epoch}
        records.append(record)
    return records


def visible_ticks(ax: plt.Axes) -> list[str]:
    """The x tick labels drawn inside the axis' limits."""
    low, high = ax.get_xlim()
    return [t.get_text() for t in ax.get_xticklabels() if low <= t.get_position()[0] <= high]


@pytest.mark.parametrize("count", [1, 2, 3])
def test_short_runs_have_markers_and_integer_epoch_ticks(tmp_path: Path, count: int):
    fig = curves_figure(epoch_records(count), BASELINES)
    fig.savefig(tmp_path / "curves.png")  # draws the figure: tick labels get their text
    ax_loss, ax_valid = fig.axes
    epochs = [str(e) for e in range(1, count + 1)]
    for ax in (ax_loss, ax_valid):
        assert visible_ticks(ax) == epochs
        low, high = ax.get_xlim()
        assert low <= 0.5 and high >= count + 0.5
    for line in ax_loss.get_lines():  # loss, loss_rec, loss_kd: each point visible
        assert line.get_marker() == "o"
        assert len(line.get_xdata()) == count
    bottom, top = ax_loss.get_ylim()
    assert bottom < 5.0 / count and top > 5.0  # every loss inside the axis
    plt.close(fig)


def test_long_runs_keep_plain_lines_and_few_ticks(tmp_path: Path):
    fig = curves_figure(epoch_records(200, evaluate_every=10), BASELINES)
    fig.savefig(tmp_path / "curves.png")
    ax_loss, _ = fig.axes
    assert all(line.get_marker() in ("None", None, "") for line in ax_loss.get_lines())
    ticks = visible_ticks(ax_loss)
    assert 3 <= len(ticks) <= 12 and all(t.isdigit() for t in ticks)
    plt.close(fig)


def test_plot_curves_writes_a_png(tmp_path: Path):
    path = tmp_path / "curves.png"
    plot_curves(epoch_records(1), str(path), BASELINES)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
