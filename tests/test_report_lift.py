"""The run report states the lift over the baselines and plots the selection metric with them."""

from __future__ import annotations

import matplotlib.image as mpimg

from mqsa_ted.report import curves_figure, lift_lines, plot_curves

EPOCHS = [
    {"epoch": e, "loss": 1.0 / e, "loss_rec": 0.9 / e, "loss_kd": 0.1 / e}
    | ({"valid": {"NDCG@20": [0, 0.25, 0.5, 0.25][e // 2], "NDCG@10": 0.0}} if e % 2 == 0 else {})
    for e in range(1, 7)
]  # evaluated at epochs 2, 4, 6; the best valid NDCG@20 at epoch 4


def test_lift_lines_name_the_best_baseline_first():
    lines = lift_lines(
        {"NDCG@10": 0.46},
        {"most popular": {"NDCG@10": 0.05}, "last item": {"NDCG@10": 0.40}, "zero": {"NDCG@10": 0}},
    )
    assert "best validation NDCG@20" in lines[0] and "NDCG@10" in lines[0]
    assert lines[2:] == [
        "- MQSA-TED vs last item (the best baseline): 0.4600 vs 0.4000, 1.15x (+15.0%)",
        "- MQSA-TED vs most popular: 0.4600 vs 0.0500, 9.20x (+820.0%)",
        "- MQSA-TED vs zero: 0.4600 vs 0.0000, n/a",
    ]


def test_curves_show_valid_ndcg20_the_best_epoch_and_the_baselines():
    fig = curves_figure(EPOCHS, {"most popular": 0.05, "last item": 0.25})
    ax = fig.axes[1]
    assert ax.get_title().startswith("validation NDCG@20")
    lines = {
        line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.lines
    }
    assert lines["MQSA-TED"] == ([2, 4, 6], [0.25, 0.5, 0.25])
    assert lines["best epoch 4"] == ([4], [0.5])
    assert lines["most popular"][1] == [0.05, 0.05] and lines["last item"][1] == [0.25, 0.25]


def test_plot_curves_writes_a_png(tmp_path):
    path = tmp_path / "curves.png"
    plot_curves(EPOCHS, str(path), {"last item": 0.25})
    assert mpimg.imread(path).shape[:2] == (400, 1100)  # 11 x 4 inches at 100 dpi


def test_the_report_warns_when_under_a_baseline_or_still_improving():
    from mqsa_ted.report import run_warnings

    still = "valid NDCG@20 was still improving at the last epoch (6)"
    metrics = {"test": {"NDCG@10": 0.30}, "warnings": [still]}
    baselines = {"last item": {"test": {"NDCG@10": 0.40}}, "popular": {"test": {"NDCG@10": 0.1}}}
    warnings = run_warnings(metrics, baselines)
    assert warnings[0] == still
    assert len(warnings) == 2 and "below the baseline 'last item' (0.3000 vs 0.4000" in warnings[1]
    assert run_warnings({"test": {"NDCG@10": 0.5}}, baselines) == []
