"""The retry policy that ships, run under test with short delays (``TUNEPIPE_RETRY_DELAY_S``).

No test here replaces a task's retries or delays: the flow applies the stages' own policy
(``tasks.stages.for_run``) with the base delay of the environment, as a production run does.

* a transient failure inside a task (an S3 outage in the data stage, a dropped connection at
  registration) is retried after the configured delay and the flow finishes;
* bad input found inside a task (a value deep in the file, seen only by the data stage) is tried
  once: it fails the run without a retry and writes nothing under the storage root or in MLflow.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
import pytest

from tests.conftest import ASA_SAMPLE
from tests.integration.test_faults import small_cfg, task_runs
from tuning_core.config import FlightsData
from tuning_core.errors import ServiceUnavailable

BASE_S = 0.2  # the base delay under test; production's default is 10 s


@pytest.fixture
def short_delays(local_settings, prefect_harness, ray_local, monkeypatch):
    from infra.settings import get_settings

    monkeypatch.setenv("TUNEPIPE_RETRY_DELAY_S", str(BASE_S))
    get_settings.cache_clear()
    yield get_settings()
    mlflow.set_tracking_uri(None)
    mlflow.set_registry_uri(None)


def _fail_first(calls: list[str], name: str, real: Any, error: BaseException) -> Any:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls.append(name)
        if calls.count(name) == 1:
            raise error
        return real(*args, **kwargs)

    return wrapper


def _waits(task_run_id: Any) -> list[float]:
    """Seconds each AwaitingRetry state of a task run was scheduled ahead."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        history = client.read_task_run_states(task_run_id)
    return [(s.state_details.scheduled_time - s.timestamp).total_seconds() for s in history
            if s.name == "AwaitingRetry"]


def test_shipped_policy_retries_transient_failures_after_the_configured_delay(short_delays, monkeypatch):
    from flows.workloads import flights_tuning
    from tasks import workloads

    calls: list[str] = []
    monkeypatch.setattr(workloads, "prepare", _fail_first(
        calls, "prepare", workloads.prepare, ServiceUnavailable("s3://bucket: endpoint unreachable (injected)")))
    monkeypatch.setattr(workloads, "register", _fail_first(
        calls, "register", workloads.register, ConnectionError("registry connection reset (injected)")))

    state = flights_tuning(small_cfg("policy-transient", num_samples=2, max_iterations=3), return_state=True)

    summary = state.result()
    assert summary["registry"]["version"] == "1"
    runs = task_runs(state)
    for name in ("prepare_data", "evaluate_and_register"):
        run = runs[name]
        assert (run.state.name, run.run_count) == ("Completed", 2), name
        # The stages' own retry counts, with delays of 1, 2, 4 base units from the settings.
        assert run.empirical_policy.retries == 3
        assert run.empirical_policy.retry_delay == [BASE_S, 2 * BASE_S, 4 * BASE_S]
        (wait,) = _waits(run.id)
        assert 0 < wait <= BASE_S * 1.5 + 0.05  # jitter 0.5 at most; not the 10 s default
    assert runs["preflight"].empirical_policy.retry_delay == [BASE_S / 2] * 2
    assert calls.count("prepare") == 2 and calls.count("register") == 2


def test_bad_input_inside_a_task_is_tried_once_and_writes_nothing(short_delays, tmp_path):
    from flows.workloads import flights_tuning

    lines = ASA_SAMPLE.read_text().splitlines(keepends=True)[:400]
    header = lines[0].rstrip("\n").split(",")
    cells = lines[300].rstrip("\n").split(",")
    cells[header.index("ArrDelay")] = "late"  # deep in the file: preflight's sample does not reach it
    lines[300] = ",".join(cells) + "\n"
    source = tmp_path / "late.csv"
    source.write_text("".join(lines))
    cfg = small_cfg("policy-bad-input")
    cfg = cfg.model_copy(update={"data": FlightsData(source=str(source), max_rows=4000, split="random")})

    state = flights_tuning(cfg, return_state=True)

    assert state.is_failed()
    run = task_runs(state)["prepare_data"]
    assert (run.state.name, run.run_count) == ("Failed", 1)
    assert run.empirical_policy.retries == 3  # it could have been retried: the policy chose not to
    assert _waits(run.id) == []
    assert "column 'ArrDelay' is not numeric" in run.state.message
    store = Path(short_delays.storage)
    written = sorted(str(p.relative_to(store)) for p in store.rglob("*") if p.is_file())
    # Only the root's identity (infra.storage: part of the cache keys, made when the data stage's key
    # is computed): no data, ray, mlflow, predictions or leases objects.
    assert written == [".tunepipe-id"]
    client = mlflow.MlflowClient(tracking_uri=short_delays.mlflow_tracking_uri)
    assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []
    assert client.search_model_versions() == []
