"""ETAs: the epoch's and the run's time left in the tqdm bar and in the plain log lines, and the
line after each epoch (mean epoch time including evaluation x planned epochs left)."""

from __future__ import annotations

import io
import time

import pytest

from mqsa_core.progress import EtaBar, PlainProgress, RunEta, format_duration, progress


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.4, "0s"), (42, "42s"), (60, "1m00s"), (1059, "17m39s"), (3900, "1h05m"),
     (50 * 3600, "2d02h")],
)  # fmt: skip
def test_format_duration(seconds: float, text: str):
    assert format_duration(seconds) == text


def test_plain_line_shows_the_epoch_and_run_time_left():
    bar = PlainProgress(range(400), 400, "epoch 3/20", 30.0, run_left=lambda left: left + 100)
    bar.set_postfix(rec="1.2345")
    # 100 of 400 steps in 50 s: 150 s left in the epoch, 250 s in the run
    assert bar.status(100, 50.0) == "epoch 3/20: 100/400 (2.0/s, 2m30s left, run ~4m10s left) " \
        "rec=1.2345"  # fmt: skip
    assert PlainProgress(range(4), 4, "eval", 30.0).status(1, 2.0) == "eval: 1/4 (0.5/s, 6s left)"


def test_plain_progress_logs_lines_with_eta_to_stderr(capsys):
    items = list(progress(range(3), 3, "epoch 1/2", interval=0.0, run_left=lambda left: left))
    assert items == [0, 1, 2]
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(":")[1].split()[0] for line in lines] == ["1/3", "2/3"]  # not the last
    assert all(" left, run ~" in line for line in lines)


def test_tqdm_bar_shows_the_run_time_left():
    out = io.StringIO()
    bar = EtaBar(range(3), total=3, file=out, mininterval=0, run_left=lambda left: left + 3600)
    for _ in bar:
        time.sleep(0.01)
    bar.close()
    assert "run ~1h00m left" in out.getvalue()


def test_run_eta_title_and_lines():
    eta = RunEta(planned_epochs=20, steps_per_epoch=10, patience=5)
    assert eta.title(3) == "epoch 3/20 (early stop after 5 evaluations without a better valid " \
        "NDCG@20)"  # fmt: skip
    assert RunEta(20, 10).title(3) == "epoch 3/20"
    assert eta.line(1) == "ETA: 19 epoch(s) left"  # nothing measured yet
    eta.start(global_step=0)
    time.sleep(0.05)
    eta.epoch_done(global_step=10)
    mean = eta.mean_epoch()
    assert mean == eta.seconds and 0.05 <= mean < 5
    line = eta.line(1)
    assert line.startswith(f"ETA: 19 epoch(s) left x {mean:.1f} s (mean epoch incl. evaluation)")
    assert "early stopping (train.patience=5) may end it sooner" in line
    assert eta.remaining(2)(7.0) == pytest.approx(7.0 + 18 * mean)
    assert eta.line(20) == "ETA: epoch 20 was the last planned one"


def test_run_eta_counts_a_resumed_partial_epoch_per_step():
    eta = RunEta(planned_epochs=4, steps_per_epoch=10)
    eta.start(global_step=15)  # resumed halfway through epoch 2
    time.sleep(0.02)
    eta.epoch_done(global_step=20)  # 5 steps ran
    assert eta.mean_epoch() == pytest.approx(2 * eta.seconds)
