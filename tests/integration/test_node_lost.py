"""The embedded default's local Ray node dying under a run (its raylet SIGKILLed mid-tune, as the OOM
killer does): the tune stage fails retryably within seconds (infra.ray_watchdog), its Prefect retry
starts a fresh local Ray and resumes the experiment, and the run finishes with every trial finished
before the kill kept as it was, no duplicate trial runs and exactly one model version.

A real `tunepipe run flights` process (4 trials of 30 rounds on the ASA sample, one at a time) with the shipped retry
policy on a 1 s base delay.
"""

from __future__ import annotations

import json
import os

import psutil
import pytest

from tests.integration.test_concurrent_runs import Run, experiment, mlflow_trial_runs, trials, wait_for
from tests.integration.test_concurrent_runs import shared as shared  # the fixture
from tests.integration.test_flights_flow import _finished_trials

pytestmark = pytest.mark.slow


def _raylet(pid: int) -> psutil.Process:
    (raylet,) = [p for p in psutil.Process(pid).children(recursive=True) if p.name() == "raylet"]
    return raylet


def test_local_ray_node_killed_mid_tune_is_retried_with_a_fresh_ray_and_resumes(shared):
    tmp, env = shared
    store = tmp / "store"
    # One trial at a time, each its 30 rounds (FIFO): the kill lands between finished and unstarted trials.
    run = Run(tmp, env, "node-lost", "--num-samples", "4", "--max-iterations", "30", "--scheduler", "fifo",
              TUNEPIPE_RETRY_DELAY_S="1", TUNEPIPE_RAY_NUM_CPUS="1")
    try:
        wait_for("a first finished trial", lambda: _finished_trials(store), run)
        raylet = _raylet(run.proc.pid)
        raylet.kill()
        before = _finished_trials(store)
        assert len(before) < 4, "every trial finished before the kill: nothing left to resume"
        code = run.wait(300)
    finally:
        run.kill()

    assert code == 0, run.stderr()[-4000:]
    assert "the local Ray node died during tuning (its raylet killed by SIGKILL" in run.stderr()
    summary = json.loads(run.summary.read_text())
    assert summary["tuning"]["num_trials"] == 4 and summary["tuning"]["resumed"] is True
    after = _finished_trials(store)  # trials TERMINATED in the newest experiment state, with their result counts
    assert len(after) == 4
    # Trials finished before the kill were kept as they were, not run again.
    assert {name: after[name] for name in before} == before
    assert len(trials(experiment(store, drivers=2))) == 4  # the retry's driver wrote its own state beside
    assert sorted(set(mlflow_trial_runs(tmp))) == sorted(mlflow_trial_runs(tmp)) and len(mlflow_trial_runs(tmp)) == 4
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp}/mlflow.db", registry_uri=f"sqlite:///{tmp}/mlflow.db")
    versions = client.search_model_versions(f"name = '{summary['registry']['model_name']}'")
    assert [str(v.version) for v in versions] == ["1"] and summary["registry"]["version"] == "1"
    # Nothing of the run is left running: neither Ray's processes nor Prefect's ephemeral API.
    left = [p for p in psutil.process_iter(["pid", "name"]) if _session(p) == run.proc.pid]
    assert left == [], left


def _session(proc: psutil.Process) -> int | None:
    try:
        return os.getsid(proc.pid)
    except OSError:
        return None
