"""The parallel-coordinates plot of a tuning run: axes read from the trials, one line per trial."""

from __future__ import annotations

import math

import pytest

from tuning_core.plots import draw_parallel_coordinates, parallel_axes, parallel_coordinates_png
from tuning_core.results import TrialRecord, TuningResult


def _result(configs: list[dict], scores: list[float | None], mode: str = "max") -> TuningResult:
    trials = [TrialRecord(trial_id=f"t{i}", config=c, status="TERMINATED" if s is not None else "ERROR",
                          iterations=5, metric=s, best_metric=s, metrics={}, time_s=1.0)
              for i, (c, s) in enumerate(zip(configs, scores, strict=True))]
    ok = [t for t in trials if t.best_metric is not None]
    best = (max if mode == "max" else min)(ok, key=lambda t: t.best_metric)
    return TuningResult(experiment_name="exp", experiment_uri="/tmp/exp", search="hyperopt", scheduler="asha",
                        metric="auc", mode=mode, num_trials=len(trials), best_trial_id=best.trial_id,
                        best_config=best.config, best_metric=best.best_metric, best_iteration=5,
                        best_checkpoint_uri=None, resumed=False, wall_time_s=1.0, trials=trials)


CONFIGS = [
    {"eta": 0.001, "max_depth": 3, "booster": "gbtree", "objective": "binary:logistic"},
    {"eta": 0.01, "max_depth": 5, "booster": "dart", "objective": "binary:logistic"},
    {"eta": 0.1, "max_depth": 7, "booster": "gbtree", "objective": "binary:logistic"},
]


def test_axes_are_the_searched_parameters_then_the_metric():
    axes = parallel_axes(_result(CONFIGS, [0.6, 0.7, 0.65]))
    # The constant objective was not searched: no axis.
    assert [a.name for a in axes] == ["eta", "max_depth", "booster", "best auc"]
    eta, depth, booster, metric = axes
    assert eta.scale == "log" and eta.positions == pytest.approx([0.0, 0.5, 1.0])  # two decades: log axis
    assert depth.scale == "linear" and depth.positions == pytest.approx([0.0, 0.5, 1.0])
    assert booster.scale == "categorical" and booster.positions == [0.0, 1.0, 0.0]
    assert [label for _, label in booster.ticks] == ["gbtree", "dart"]
    assert metric.positions == pytest.approx([0.0, 1.0, 0.5])


def test_minimised_metric_puts_the_winner_on_top_and_failed_trials_have_no_metric_point():
    axes = parallel_axes(_result(CONFIGS, [0.3, None, 0.5], mode="min"))
    assert axes[-1].positions[0] == 1.0 and axes[-1].positions[2] == 0.0
    assert math.isnan(axes[-1].positions[1])


def test_plot_draws_one_line_per_trial_with_the_winner_highlighted():
    result = _result(CONFIGS, [0.6, 0.7, None])
    ax = draw_parallel_coordinates(result).axes[0]
    assert len(ax.lines) == 3
    winner = [line for line in ax.lines if line.get_label() == "best: t1"]
    assert len(winner) == 1 and winner[0].get_linewidth() > max(ln.get_linewidth() for ln in ax.lines
                                                                 if ln is not winner[0])
    assert [t.get_text() for t in ax.get_xticklabels()] == ["eta (log)", "max_depth", "booster", "best auc"]


def test_png_is_written_for_a_single_trial_too():
    png = parallel_coordinates_png(_result(CONFIGS[:1], [0.6]))
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000
