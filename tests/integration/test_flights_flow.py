"""The flights flow end to end under Prefect's test harness, with real Ray, MLflow (SQLite) and local storage."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from tests.conftest import ASA_SAMPLE
from tuning_core.config import FlightsData, FlightsPipeline, RegistryConfig, TuneConfig
from tuning_core.errors import DataError

pytestmark = pytest.mark.slow

SUMMARY_KEYS = {
    "data": {"version", "uri", "schema", "rows"},
    "tuning": {"experiment_uri", "num_trials", "search", "scheduler", "best_config", "best_metric", "resumed"},
    "retrain": {"mlflow_run_id", "test_metrics", "baseline_test_metrics", "fit_s"},
    "registry": {"model_name", "version", "aliases", "promoted"},
    "timings": {"preflight_s", "prepare_s", "tune_s", "retrain_s", "register_s", "total_s"},
}


def small_cfg(num_samples: int = 3, model: str = "flow-test", **tune: object) -> FlightsPipeline:
    return FlightsPipeline(
        data=FlightsData(source=str(ASA_SAMPLE), max_rows=6000, split="random"),
        tune=TuneConfig(num_samples=num_samples, max_iterations=8, checkpoint_every=4, search="random",
                        scheduler="fifo", max_concurrent_trials=2, **tune),
        registry=RegistryConfig(model_name=model),
    )


@pytest.fixture
def env(local_settings, prefect_harness, ray_local):
    return local_settings


def _artifact_keys() -> set[str]:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return {a.key for a in client.read_artifacts() if a.key}


def test_flow_end_to_end_registers_champion_and_is_idempotent(env):
    from flows.workloads import flights_tuning

    summary = flights_tuning(small_cfg())
    for section, keys in SUMMARY_KEYS.items():
        assert keys <= set(summary[section]), section
    assert summary["workload"] == "flights"
    assert summary["data"]["schema"] == "asa"
    assert summary["tuning"]["num_trials"] == 3
    assert summary["registry"]["aliases"] == ["champion"] and summary["registry"]["promoted"]
    json.dumps(summary)  # the summary is JSON-serialisable as written by --summary-json
    t = summary["timings"]
    stages = t["preflight_s"] + t["prepare_s"] + t["tune_s"] + t["retrain_s"] + t["register_s"]
    assert all(v >= 0 for v in t.values()) and t["tune_s"] > 0 and stages <= t["total_s"] + 0.05
    assert 0 < summary["retrain"]["fit_s"] <= t["retrain_s"]
    assert {"flights-data-report", "flights-leaderboard", "flights-tuning-progress", "flights-report"} <= \
        _artifact_keys()

    # The retrain run holds the search's leaderboard and plots beside the model; the parent run the
    # winning checkpoint and the parallel coordinates of its trials.
    client = mlflow.MlflowClient()
    retrain_run = client.get_run(summary["retrain"]["mlflow_run_id"])
    assert {"leaderboard.json", "learning_curves.png", "parallel_coordinates.png"} <= \
        {a.path for a in client.list_artifacts(retrain_run.info.run_id)}
    parent_id = retrain_run.data.tags["mlflow.parentRunId"]
    assert {"best_checkpoint", "parallel_coordinates.png"} <= {a.path for a in client.list_artifacts(parent_id)}
    assert client.list_artifacts(parent_id, "best_checkpoint")

    # A registry consumer loads the champion and predicts on canonical features.
    model = mlflow.pyfunc.load_model("models:/flow-test@champion")
    from infra.storage import build_storage
    from tuning_core.data.flights import load_split

    storage = build_storage(env)
    test = load_split(storage.fs, summary["data"]["uri"], "test").drop(columns=["delayed"]).head(20)
    from tasks.workloads import plain_features

    out = model.predict(plain_features(test))
    assert len(out) == 20 and out["delay_probability"].between(0, 1).all()

    # Same inputs again: nothing is duplicated, aliases unchanged.
    again = flights_tuning(small_cfg())
    client = mlflow.MlflowClient()
    assert len(client.search_model_versions("name = 'flow-test'")) == 1
    assert again["registry"]["version"] == summary["registry"]["version"]
    assert again["registry"]["aliases"] == ["champion"]
    runs = client.search_runs([client.get_experiment_by_name("tunepipe-flights").experiment_id])
    trial_runs = [r for r in runs if "tunepipe.trial_id" in r.data.tags]
    assert len(trial_runs) == 3

    # The Ray experiment deleted by hand: the tune stage's cached result points into it, so it runs again
    # instead of handing on the URIs of deleted files.
    import shutil

    experiment = Path(summary["tuning"]["experiment_uri"])
    shutil.rmtree(experiment)
    third = flights_tuning(small_cfg())
    assert third["tuning"]["experiment_uri"] == summary["tuning"]["experiment_uri"]
    assert (experiment / "leaderboard.parquet").is_file() and not third["tuning"]["resumed"]


def test_trial_child_runs_are_written_during_the_tuning_and_a_failed_write_is_redone(env, monkeypatch):
    """Each trial's MLflow child run is written as the trial finishes (not after the tuning); one that
    fails then (MLflow unreachable) is written by the pass after the tuning, once."""
    import threading

    from infra.tracking import Tracker
    from tasks import workloads

    calls: list[tuple[str, str]] = []
    real = Tracker.log_trial

    def flaky(self, parent_id, t, *args, **kwargs):
        calls.append((threading.current_thread().name, t.trial_id))
        if len(calls) == 1:
            raise ConnectionError("MLflow unreachable (test)")
        return real(self, parent_id, t, *args, **kwargs)

    monkeypatch.setattr(Tracker, "log_trial", flaky)
    cfg = small_cfg(num_samples=3, model="flow-live-log", seed=11)
    ctx = workloads.Context.build(env)
    result = workloads.tune(cfg, ctx, workloads.prepare(cfg, ctx))

    live = [tid for thread, tid in calls if thread.startswith("tunepipe-mlflow")]
    after = [tid for thread, tid in calls if not thread.startswith("tunepipe-mlflow")]
    assert sorted(live) == sorted(t.trial_id for t in result.trials)  # every trial, as it finished
    assert after == [live[0]]  # only the failed one again, after the tuning
    client = mlflow.MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("tunepipe-flights").experiment_id],
                              f"tags.`tunepipe.experiment` = '{result.experiment_name}'")
    assert sorted(r.data.tags["tunepipe.trial_id"] for r in runs) == sorted(t.trial_id for t in result.trials)
    for run in runs:
        trial = next(t for t in result.trials if t.trial_id == run.data.tags["tunepipe.trial_id"])
        assert run.info.status == "FINISHED" and run.data.metrics["training_iteration"] == trial.iterations
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "auc"))
        assert steps == list(range(1, trial.iterations + 1))


def _finished_trials(root) -> dict[str, int]:
    """trial folder → number of results, for trials TERMINATED in the newest saved experiment state.

    The experiment state is what a restore reads; a result.json saying "done" can be newer than it.
    """
    out = {}
    for exp in root.glob("ray/*"):
        states = sorted(exp.glob("experiment_state-*.json"))
        if not states:
            continue
        try:
            state = json.loads(states[-1].read_text())
        except (ValueError, OSError):  # caught mid-write; the next poll reads a whole file
            continue
        for trial_json, _ in state.get("trial_data", []):
            trial = json.loads(trial_json)
            result = exp / f"trial_{trial['trial_id']}" / "result.json"
            if trial.get("status") == "TERMINATED" and result.is_file():
                out[result.parent.name] = len([ln for ln in result.read_text().splitlines() if ln.strip()])
    return out


def test_rerun_after_driver_sigkill_resumes_instead_of_restarting(env, tmp_path):
    """The flow's process is SIGKILLed mid-tuning; running the flow again resumes the experiment."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    import yaml

    from flows.workloads import flights_tuning

    # Trials here last a fraction of a second: 16 of them one at a time, polled every 50 ms, so the
    # kill lands while most are still to run (6 trials 2 at a time once all finished between two polls).
    trials = 16
    cfg = small_cfg(num_samples=trials, model="flow-resume", seed=7)
    cfg = cfg.model_copy(update={"tune": cfg.tune.model_copy(update={"max_concurrent_trials": 1})})
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    store = Path(env.storage)
    child = subprocess.Popen([sys.executable, "-m", "flows.cli", "run", "flights", "--config", str(cfg_file)],
                             env={**os.environ, "PREFECT_HOME": str(tmp_path / "prefect")},
                             start_new_session=True, stdout=open(tmp_path / "child.log", "wb"),
                             stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        while len(_finished_trials(store)) < 2 and time.monotonic() < deadline and child.poll() is None:
            time.sleep(0.05)
        before = _finished_trials(store)
        log_tail = (tmp_path / "child.log").read_text()[-2000:]
        assert len(before) >= 2, f"child did not finish two trials in time: {log_tail}"
        assert len(before) < trials, "child finished everything before the kill"
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
        child.wait()
    summary = flights_tuning(cfg)
    assert summary["tuning"]["resumed"] is True
    assert summary["tuning"]["num_trials"] == trials
    after = _finished_trials(store)
    assert len(after) == trials
    # Trials finished before the kill were not run again (no new results appended).
    assert {k: after[k] for k in before} == before
    # MLflow holds exactly one child run per trial, whatever the killed driver had logged.
    client = mlflow.MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("tunepipe-flights").experiment_id])
    trial_ids = [r.data.tags["tunepipe.trial_id"] for r in runs if "tunepipe.trial_id" in r.data.tags]
    assert sorted(trial_ids) == sorted(set(trial_ids)) and len(trial_ids) == trials


def test_batch_score_writes_a_prediction_per_row(env, tmp_path, monkeypatch):
    from flows.batch_score import batch_score
    from flows.workloads import flights_tuning

    flights_tuning(small_cfg(model="flow-score"))
    rows = pd.read_csv(ASA_SAMPLE, nrows=300)
    src = tmp_path / "to_score.csv"
    rows.to_csv(src, index=False)
    result = batch_score(str(src), "flow-score")
    # Warm start: the next run tries the champion's config first.
    champion_cfg = mlflow.MlflowClient().get_model_version_by_alias("flow-score", "champion").tags[
        "tunepipe.best_config"]
    warm = flights_tuning(small_cfg(model="flow-score").model_copy(update={"warm_start_from_champion": True}))
    expected = json.loads(champion_cfg)
    tried = [json.loads(f.read_text()) for f in Path(warm["tuning"]["experiment_uri"]).glob("trial_*/params.json")]
    assert any({k: t.get(k) for k in expected} == expected for t in tried)
    out = pd.read_parquet(result["output"])
    assert result["rows"] == len(out) == 300
    assert out["delay_probability"].between(0, 1).all()

    # A folder of files is scored a file at a time, PART_ROWS rows a prediction call, never held whole:
    # the same predictions as the one file, in the same order.
    from tasks import scoring

    folder = tmp_path / "many"
    folder.mkdir()
    rows.iloc[:120].to_csv(folder / "a.csv", index=False)
    rows.iloc[120:].to_csv(folder / "b.csv", index=False)
    parts: list[int] = []
    add = scoring._Predictions.add
    monkeypatch.setattr(scoring, "PART_ROWS", 50)
    monkeypatch.setattr(scoring._Predictions, "add", lambda self, scored, figures: (
        parts.append(len(scored)), add(self, scored, figures)))
    many = batch_score(str(folder), "flow-score")
    assert parts == [50, 50, 20, 50, 50, 50, 30]
    pd.testing.assert_frame_equal(pd.read_parquet(many["output"]), out)
    assert many["delayed_rate"] == pytest.approx(result["delayed_rate"])

    # A bad file after a good one was scored: one line, and no predictions at all (nor a partial file).
    (folder / "c.csv").write_text("this,is,not\na,flights,file\n")
    written = sorted(p.name for p in (tmp_path / "store" / "predictions").rglob("*"))
    parts.clear()
    with pytest.raises(DataError, match="c.csv"):
        batch_score(str(folder), "flow-score")
    assert sum(parts) == 300  # a.csv and b.csv had been scored when c.csv failed
    assert sorted(p.name for p in (tmp_path / "store" / "predictions").rglob("*")) == written
