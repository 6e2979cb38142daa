"""The flights pipeline on the real local stack: SeaweedFS S3, an MLflow server, a Prefect server + worker.

One stack and one small flow run for the module; the tests then look at what the run left behind
from the outside (the bucket, the MLflow server, the Prefect server), restart the stack and load the
champion again, and finally check that ``down()`` leaves no process behind.

The flow runs in this process. Prefect reads PREFECT_API_URL once, when it is imported, so changing
the variable afterwards is not enough: ``temporary_settings`` points this process's Prefect client
at the stack's server for the run (a subprocess with the stack's env would see the variable).
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from pathlib import Path

import pytest

from infra import stack
from tests.conftest import ASA_SAMPLE, ROOT, process_tree, still_alive
from tuning_core.config import FlightsData, FlightsPipeline, RegistryConfig, TuneConfig

pytestmark = pytest.mark.integration

MODEL = "stack-pipeline-flights"


def _cfg() -> FlightsPipeline:
    return FlightsPipeline(
        data=FlightsData(source=str(ASA_SAMPLE), max_rows=4000, split="random"),
        tune=TuneConfig(num_samples=2, max_iterations=6, checkpoint_every=3, search="random", scheduler="fifo",
                        max_concurrent_trials=2, seed=3),
        registry=RegistryConfig(model_name=MODEL),
    )


@contextlib.contextmanager
def _stack_clients(monkeypatch, env: dict[str, str]):
    """This process as a client of the stack: its env, settings, Prefect API and MLflow URIs."""
    import mlflow
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from infra.settings import get_settings

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    # Set (not left to infra.tracking's setdefault) so that it is removed again after the test.
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", env["AWS_ENDPOINT_URL_S3"])
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    get_settings.cache_clear()
    tracking, registry = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    try:
        with temporary_settings(updates={PREFECT_API_URL: env["PREFECT_API_URL"]}):
            yield
    finally:
        mlflow.set_tracking_uri(tracking)
        mlflow.set_registry_uri(registry)
        get_settings.cache_clear()


@pytest.fixture(scope="module")
def stack_dir(tmp_path_factory):
    state_dir = tmp_path_factory.mktemp("stack-pipeline")
    stack.up(state_dir, timeout_s=150)
    try:
        yield state_dir
    finally:
        stack.down(state_dir)


@pytest.fixture(scope="module")
def flow_summary(stack_dir, ray_local):
    """The flights flow, run once against the stack (Ray: the session's local instance)."""
    from flows.workloads import flights_tuning

    env = stack.env(stack_dir, show_secrets=True)
    with pytest.MonkeyPatch.context() as mp, _stack_clients(mp, env):
        return flights_tuning(_cfg())


@pytest.fixture
def stack_env(stack_dir, monkeypatch):
    env = stack.env(stack_dir, show_secrets=True)
    with _stack_clients(monkeypatch, env):
        yield env


def _keys(env: dict[str, str], prefix: str) -> list[str]:
    from infra.settings import get_settings
    from infra.storage import boto3_client

    s3 = boto3_client(get_settings())
    keys, token = [], None
    while True:
        kwargs = {"ContinuationToken": token} if token else {}
        page = s3.list_objects_v2(Bucket=stack.BUCKET, Prefix=prefix, **kwargs)
        keys += [o["Key"] for o in page.get("Contents", [])]
        if not page.get("IsTruncated"):
            return keys
        token = page["NextContinuationToken"]


def test_flow_writes_data_experiment_and_model_artifacts_into_the_bucket(flow_summary, stack_env):
    data, tuning = flow_summary["data"], flow_summary["tuning"]
    assert data["uri"] == f"s3://{stack.BUCKET}/root/data/flights/{data['version']}"
    assert f"root/data/flights/{data['version']}/manifest.json" in _keys(stack_env, "root/data/flights/")

    experiment = tuning["experiment_uri"].rsplit("/", 1)[-1]
    assert tuning["experiment_uri"] == f"s3://{stack.BUCKET}/root/ray/{experiment}"
    ray_keys = _keys(stack_env, f"root/ray/{experiment}/")
    assert sum(k.endswith("/result.json") for k in ray_keys) == tuning["num_trials"] == 2
    assert any("/checkpoint_" in k for k in ray_keys), ray_keys[:20]

    # Proxied artifacts: the MLflow server wrote the model into the bucket under root/mlflow/.
    run_id = flow_summary["retrain"]["mlflow_run_id"]
    model_keys = [k for k in _keys(stack_env, "root/mlflow/") if k.endswith("/MLmodel")]
    assert model_keys, "no MLmodel file under root/mlflow/"
    assert flow_summary["mlflow_tracking_uri"] == stack_env["MLFLOW_TRACKING_URI"]
    assert any(run_id in k for k in _keys(stack_env, "root/mlflow/")), f"nothing of run {run_id} in the bucket"


def test_registered_champion_is_visible_through_the_mlflow_server(flow_summary, stack_env):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=stack_env["MLFLOW_TRACKING_URI"],
                          registry_uri=stack_env["MLFLOW_TRACKING_URI"])  # not a process-wide registry URI
    version = client.get_model_version_by_alias(MODEL, "champion")
    assert version.version == flow_summary["registry"]["version"]
    assert version.run_id == flow_summary["retrain"]["mlflow_run_id"]
    assert version.tags["data_version"] == flow_summary["data"]["version"]


def test_flow_run_is_recorded_by_the_stack_prefect_server(flow_summary, stack_env):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        assert str(client.api_url).rstrip("/") == stack_env["PREFECT_API_URL"].rstrip("/")
        runs = client.read_flow_runs()
    assert [r.state.type.value for r in runs] == ["COMPLETED"]
    assert runs[0].name.startswith(f"flights-{flow_summary['data']['version'][:10]}")


def test_deploy_all_then_a_triggered_deployment_runs_on_the_stack_worker(flow_summary, stack_dir, stack_env):
    """`prefect deploy --all` against the stack's server; a run triggered as the UI does is picked up and
    executed by the stack's own worker, with the stack's env (champion from its MLflow, output in its bucket)."""
    import os

    from prefect.client.orchestration import get_client

    cli_env = {**os.environ, **stack_env, "CI": "true"}
    deployed = subprocess.run([str(Path(sys.executable).parent / "prefect"), "--no-prompt", "deploy", "--all"],
                              env=cli_env, cwd=ROOT, capture_output=True, text=True, timeout=300,
                              stdin=subprocess.DEVNULL)
    assert deployed.returncode == 0, deployed.stdout[-3000:] + deployed.stderr[-3000:]

    with get_client(sync_client=True) as client:
        names = {d.name for d in client.read_deployments()}
        assert {"flights-nightly", "fashion-mnist-manual", "batch-score"} <= names
        # The nightly schedule must not start a full retraining on this worker during the test.
        client.pause_deployment(client.read_deployment_by_name("flights-tuning/flights-nightly").id)
        deployment = client.read_deployment_by_name("batch-score/batch-score")
        assert deployment.work_pool_name == stack.WORK_POOL
        run = client.create_flow_run_from_deployment(
            deployment.id, parameters={"source": str(ASA_SAMPLE), "model_name": MODEL})
        deadline = time.monotonic() + 300
        while not (run := client.read_flow_run(run.id)).state.is_final() and time.monotonic() < deadline:
            time.sleep(2)
    worker_log = (stack_dir / "logs" / "worker.log").read_text()
    assert run.state.is_completed(), f"{run.state!r}\n{worker_log[-3000:]}"
    assert run.infrastructure_pid, "no worker started a process for the run"
    assert str(run.id) in worker_log  # the stack's worker (the only one on its pool) submitted it

    version = flow_summary["registry"]["version"]
    predictions = _keys(stack_env, f"root/predictions/{MODEL}-v{version}/")
    assert any(k.endswith(".parquet") for k in predictions), predictions


@pytest.mark.filterwarnings("ignore:Add type hints")
def test_champion_still_predicts_after_down_and_up_and_down_leaves_nothing(flow_summary, stack_dir, stack_env):
    import mlflow

    from infra.settings import get_settings
    from infra.storage import build_storage
    from tasks.workloads import plain_features
    from tuning_core.data.flights import load_split

    storage = build_storage(get_settings())
    test = load_split(storage.fs, flow_summary["data"]["uri"], "test").drop(columns=["delayed"]).head(25)

    before = stack.status(stack_dir).pids()
    assert set(before) == set(stack.CORE_SERVICES)
    processes = process_tree(before.values())
    assert not stack.down(stack_dir).running
    assert still_alive(processes) == []
    # What a registry consumer needs; the full restart is test_stack.py's (the Prefect pair is slow).
    restarted = stack.up(stack_dir, services=("s3", "mlflow"), timeout_s=150)
    assert restarted.service("s3").healthy and restarted.service("mlflow").healthy, restarted
    assert stack.env(stack_dir, show_secrets=True) == stack_env  # same ports and credentials

    mlflow.set_tracking_uri(stack_env["MLFLOW_TRACKING_URI"])
    mlflow.set_registry_uri(stack_env["MLFLOW_TRACKING_URI"])
    model = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion")
    out = model.predict(plain_features(test))
    assert len(out) == 25 and out["delay_probability"].between(0, 1).all()

    recorded = restarted.pids()  # from the run records: the processes this stack started
    assert set(recorded) == {"s3", "mlflow"}
    processes = process_tree(recorded.values())
    stopped = stack.down(stack_dir)
    assert stopped.pids() == {} and not stopped.running
    assert still_alive(processes) == [], still_alive(processes)  # leaders and every child (uvicorn, huey, ...)
    assert not list((stack_dir / "run").glob("*.json"))
    assert not stack.runtime_dir(stack_dir).exists()
