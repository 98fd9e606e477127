"""The learning-rate schedule's factors (trainer/runtime/schedule.py) and its config key."""

import pytest

from mqsa_core.config import ConfigError, load_config
from trainer.runtime.schedule import describe_schedule, lr_factor, planned_epochs, planned_steps


def train_config(*overrides: str):
    return load_config(None, list(overrides)).train


def test_constant_without_warm_up_is_no_schedule():
    assert lr_factor(train_config(), 1000) is None


def test_warm_up_then_constant():
    factor = lr_factor(train_config("train.warmup_steps=4"), 1000)
    assert [factor(s) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert factor(999) == 1.0


def test_warm_up_then_linear_decay_to_zero_at_the_last_planned_step():
    factor = lr_factor(train_config("train.warmup_steps=2", "train.lr_schedule=linear"), 10)
    assert [factor(s) for s in range(10)] == [0.5, 1.0, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375,
                                              0.25, 0.125]  # fmt: skip
    assert factor(10) == 0.0  # past the plan (never reached)


def test_planned_epochs_grow_to_min_steps():
    assert planned_epochs(train_config("train.epochs=2"), 10) == 2
    assert planned_epochs(train_config("train.epochs=2", "train.min_steps=45"), 10) == 5


def test_a_step_budget_cuts_the_plan():
    budget = train_config("train.epochs=20", "train.max_steps=45")
    assert planned_epochs(budget, 10) == 5 and planned_steps(budget, 10) == 45
    assert planned_steps(train_config("train.epochs=2", "train.max_steps=45"), 10) == 20
    assert planned_steps(train_config("train.epochs=2"), 10) == 20


def test_an_unknown_schedule_is_refused_where_it_is_parsed():
    with pytest.raises(ConfigError, match="lr_schedule"):
        train_config("train.lr_schedule=cosine")


def test_the_log_names_the_schedule_and_a_warm_up_longer_than_the_run():
    assert describe_schedule(train_config(), 100) is None
    line = describe_schedule(train_config("train.lr_schedule=linear", "train.warmup_steps=10"), 100)
    assert "linear" in line and "at step 100" in line
    line = describe_schedule(train_config("train.warmup_steps=100"), 30)
    assert line.startswith("warning: train.warmup_steps=100") and "30 steps" in line
