"""Trials report where someone reads the result: the scheduler's decision points, the checkpoint
cadence and the end; their histories still hold every round."""

from __future__ import annotations

from typing import Any

import pytest

# The flights data fixtures of the runner's tests (data, version) are shared, not copied.
from tests.unit.test_runner import LOCAL, data, tune_cfg, version  # noqa: F401
from tuning_core.config import SchedulerOptions, TuneConfig
from tuning_core.runner import run_tuning
from tuning_core.schedulers import create_scheduler, report_cadence
from tuning_core.trainables.common import Cadence, per_actor
from tuning_core.trainables.xgboost import train_xgboost


@pytest.mark.parametrize("grace,rf,top,brackets", [(1, 3, 100, 1), (5, 3, 200, 1), (1, 4, 60, 2), (2, 2.5, 50, 3)])
def test_asha_report_points_are_rays_own_rungs(grace, rf, top, brackets):
    cfg = TuneConfig(scheduler="asha", max_iterations=top,
                     scheduler_options={"grace_period": grace, "reduction_factor": rf, "brackets": brackets})
    at, _ = report_cadence(cfg)
    ours = {int(p) for p in at.split(",")}
    scheduler = create_scheduler(cfg, {})
    rays = {min(top, int(-(-milestone // 1))) for bracket in scheduler._brackets  # noqa: SLF001
            for milestone, _ in bracket._rungs}  # noqa: SLF001
    assert ours == rays


def test_cadence_per_scheduler():
    assert report_cadence(TuneConfig(scheduler="fifo", max_iterations=30)) == ("", 10)
    assert report_cadence(TuneConfig(scheduler="pbt", max_iterations=12,
                                     scheduler_options={"perturbation_interval": 4})) == ("4,8,12", 12)
    assert report_cadence(TuneConfig(scheduler="median"))[0] == "every"
    # A stop threshold needs every result.
    assert report_cadence(TuneConfig(scheduler="asha", stop_metric_threshold=0.9))[0] == "every"
    c = Cadence.of({"_report_at": "1,3,9", "_checkpoint_every": 100, "_max_iterations": 20})
    assert [i for i in range(1, 21) if c.reports(i)] == [1, 3, 9, 20]
    assert [i for i in range(1, 21) if c.checkpoints(i)] == [1, 3, 9, 20]
    every = Cadence.of({"_max_iterations": 5, "_checkpoint_every": 2})  # no runner: every iteration
    assert [i for i in range(1, 6) if every.reports(i)] == [1, 2, 3, 4, 5]
    assert [i for i in range(1, 6) if every.checkpoints(i)] == [2, 4, 5]


def test_per_actor_builds_once_per_key():
    calls: list[str] = []

    def build(tag: str):
        return lambda: calls.append(tag) or tag

    assert per_actor(("t", "v1"), build("a")) == "a"
    assert per_actor(("t", "v1"), build("b")) == "a"
    assert per_actor(("t", "v2"), build("c")) == "c"
    assert calls == ["a", "c"]


class _Results:
    def __init__(self) -> None:
        self.seen: list[tuple[str, int]] = []

    def on_trial_result(self, iteration: int, trials: Any, trial: Any, result: dict, **info: Any) -> None:
        self.seen.append((trial.trial_id, int(result["training_iteration"])))


def test_asha_trials_report_only_at_rungs_and_keep_every_round(ray_local, data, tmp_path):  # noqa: F811
    cfg = tune_cfg(scheduler="asha", num_samples=4, max_iterations=12, checkpoint_every=None,
                   scheduler_options={"grace_period": 1, "reduction_factor": 3})
    results = _Results()
    result = run_tuning(train_xgboost, {**data, "data_key": "v"}, cfg.space, cfg, LOCAL, str(tmp_path / "ray"),
                        "cadence", callbacks=[results])
    assert {it for _, it in results.seen} <= {1, 3, 9, 12}
    for trial in result.trials:
        rounds = [h["training_iteration"] for h in trial.history]
        assert rounds == list(range(1, trial.iterations + 1)), (trial.trial_id, rounds)
        assert all(h.get("auc") is not None for h in trial.history)
    best = max(result.trials, key=lambda t: t.best_metric)
    peak = max(best.history, key=lambda h: h["auc"])
    assert result.best_iteration == peak["training_iteration"]


# ----------------------------------------------------------------------------- ASHA's promotion rule
def _decisions(rule: str, values: list[float], mode: str = "max") -> list[str]:
    """Each trial reports ``value`` at rung 1 in arrival order; the scheduler's answers."""
    from types import SimpleNamespace

    from tuning_core.schedulers import SCHEDULERS

    sched = SCHEDULERS["asha"](TuneConfig(scheduler="asha", max_iterations=64, scheduler_options=SchedulerOptions(
        reduction_factor=4, asha_rule=rule)), {})
    sched.set_search_properties("auc", mode)
    out = []
    for i, v in enumerate(values):
        trial = SimpleNamespace(trial_id=f"t{i}")
        sched.on_trial_add(None, trial)
        out.append(sched.on_trial_result(None, trial, {"training_iteration": 1, "auc": v}))
    return out


def test_top_k_continues_only_the_top_quarter_of_a_rung_itself_included():
    # n = 1..8 at rung 1, eta = 4: k = max(1, n // 4); continue when fewer than k trials are better.
    values = [0.60, 0.55, 0.65, 0.62, 0.64, 0.70, 0.50, 0.66]
    expected = ["CONTINUE", "STOP", "CONTINUE", "STOP", "STOP", "CONTINUE", "STOP", "CONTINUE"]
    assert _decisions("top-k", values) == expected
    # the same ranking for a metric to minimise
    assert _decisions("top-k", [1 - v for v in values], mode="min") == expected


def test_rays_rule_lets_more_trials_through_than_top_k():
    values = [0.60, 0.55, 0.65, 0.62, 0.64, 0.70, 0.50, 0.66]
    ray_rule, top_k = _decisions("ray", values), _decisions("top-k", values)
    assert ray_rule.count("CONTINUE") > top_k.count("CONTINUE")
    assert ray_rule[4] == "CONTINUE" and top_k[4] == "STOP"  # 0.64: 3rd of 5, above Ray's 75th percentile of 4
