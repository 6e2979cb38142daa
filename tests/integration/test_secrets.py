"""Secrets stay secret: a full pipeline run on S3 (moto) with a recognisable secret key, and failing runs,
searched for that secret in every output they produce.

Searched: the CLI's stdout/stderr, captured log records (ours, Prefect's, Ray's, MLflow's), the
summary JSON, Prefect's API (logs, artifacts, flow-run parameters) and persisted task results,
MLflow (params, tags and metric names of every run, registered models, model versions), every
object in the bucket (data versions, Ray experiment state and checkpoints, MLflow artifacts) and
every file the run left in its temp folder (MLflow's SQLite file included).

Related checks live in tests/integration/test_stack.py: the local stack's services listen on
127.0.0.1 only (``test_services_listen_only_on_loopback``), its S3 server rejects wrong credentials
(``test_s3_accepts_stack_credentials_and_rejects_wrong_ones``) and its credential file is private
(``test_credentials_are_private_and_masked``).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import mlflow
import pytest
from typer.testing import CliRunner

import flows.workloads  # noqa: F401 - Prefect binds its log handlers at import: not inside CliRunner's streams
from flows.cli import app
from tests.conftest import ASA_SAMPLE, RAY_WORKER_KEY_ID, RAY_WORKER_SECRET, free_port

pytestmark = pytest.mark.slow

# moto accepts any credentials unless told to check them.
# The pair the session's Ray workers hold (conftest.ray_local), as a cluster started by tunepipe would.
SECRET = RAY_WORKER_SECRET
KEY_ID = RAY_WORKER_KEY_ID


# Ray Tune's experiment state files: tuner.pkl, experiment_state-*.json, <searcher>-state-*.json.
RAY_STATE = re.compile(r"/ray/[^/]+/(tuner\.pkl|[\w.-]*state[\w.-]*\.(json|pkl))$")


def leaks(outputs: dict[str, str | bytes]) -> list[str]:
    """Names of the outputs that contain the secret (as text or bytes)."""
    return [name for name, text in outputs.items()
            if (SECRET.encode() in text if isinstance(text, bytes) else SECRET in text)]


@pytest.fixture
def secret_env(local_settings, s3_settings, monkeypatch):
    """The s3_settings bucket, now used with a recognisable secret; MLflow on a local SQLite file."""
    from infra.settings import get_settings

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY_ID)
    monkeypatch.delenv("MLFLOW_S3_ENDPOINT_URL", raising=False)
    get_settings.cache_clear()
    yield s3_settings  # the original settings: moto's own credentials, to read the bucket back
    get_settings.cache_clear()
    mlflow.set_tracking_uri(None)
    mlflow.set_registry_uri(None)


@pytest.fixture
def all_logs(caplog):
    """Every log record at INFO and above (DEBUG for our packages), Prefect's non-propagating loggers too."""
    caplog.set_level(logging.INFO)
    for name in ("tuning_core", "infra", "tasks", "flows", "tunepipe"):
        caplog.set_level(logging.DEBUG, logger=name)
    prefect = logging.getLogger("prefect")
    prefect.addHandler(caplog.handler)
    yield caplog
    prefect.removeHandler(caplog.handler)


def _prefect_outputs() -> dict[str, str | bytes]:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts()
        logs = client.read_logs()
        flow_runs = client.read_flow_runs()
        task_runs = client.read_task_runs()
    out: dict[str, str | bytes] = {
        "prefect artifacts": json.dumps([[a.key, a.description, a.data] for a in artifacts], default=str),
        "prefect logs": "\n".join(f"{log.name} {log.message}" for log in logs),
        "prefect flow-run parameters": json.dumps([r.parameters for r in flow_runs], default=str),
        "prefect task-run inputs": json.dumps([r.task_inputs for r in task_runs], default=str),
    }
    results = Path(PREFECT_LOCAL_STORAGE_PATH.value()).expanduser()
    for f in results.rglob("*") if results.is_dir() else []:
        if f.is_file():
            out[f"prefect result {f.name}"] = f.read_bytes()
    assert artifacts and logs and any(k.startswith("prefect result") for k in out), \
        "nothing to search: the run left no Prefect artifacts, logs or persisted results"
    return out


def _mlflow_outputs() -> dict[str, str]:
    client = mlflow.MlflowClient()
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    models = client.search_registered_models()
    versions = client.search_model_versions()
    assert runs and versions, "nothing to search: no MLflow runs or model versions"
    return {
        "mlflow runs": json.dumps([[r.data.params, r.data.tags, sorted(r.data.metrics), r.info.artifact_uri]
                                   for r in runs]),
        "mlflow registered models": json.dumps([[m.name, m.description, m.tags] for m in models]),
        "mlflow model versions": json.dumps([[v.source, v.description, v.tags, v.run_link] for v in versions]),
    }


def _bucket_objects(settings: Any) -> dict[str, bytes]:
    from infra.storage import boto3_client

    s3 = boto3_client(settings)
    bucket = settings.storage.removeprefix("s3://").split("/")[0]
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
            for o in page.get("Contents", [])]
    return {f"s3://{bucket}/{k}": s3.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}


def _local_files(folder: Path) -> dict[str, bytes]:
    return {str(f): f.read_bytes() for f in folder.rglob("*") if f.is_file()}


def test_pipeline_on_s3_writes_the_secret_nowhere(secret_env, prefect_harness, ray_local, all_logs, capsys,
                                                  tmp_path):
    summary = tmp_path / "summary.json"
    result = CliRunner().invoke(app, [
        "run", "flights", "--data", str(ASA_SAMPLE), "--max-rows", "4000", "--num-samples", "3",
        "--max-iterations", "6", "--search", "random", "--scheduler", "fifo", "--max-concurrent", "1",
        "--model-name", "secrets-test", "--summary-json", str(summary)])
    assert result.exit_code == 0, result.output

    captured = capsys.readouterr()
    objects = _bucket_objects(secret_env)
    assert any(k.endswith("/manifest.json") for k in objects) and any("/ray/" in k for k in objects)
    assert any("/mlflow/" in k for k in objects)  # model artifacts went to the bucket too
    outputs: dict[str, str | bytes] = {
        "cli output": result.output, "captured logs": all_logs.text, "stdout/stderr": captured.out + captured.err,
        "summary json": summary.read_text(), **_prefect_outputs(), **_mlflow_outputs(), **objects,
        **_local_files(tmp_path),
    }
    # Ray Tune pickles its storage filesystem into the experiment state on the bucket (tuner.pkl,
    # *-state-*.json): the filesystem tunepipe hands Ray carries no keys when the workers hold them.
    assert leaks(outputs) == []
    assert any(RAY_STATE.search(k) for k in outputs), "the Ray experiment state was not searched"


FAILING = {
    # S3 refuses the (unknown) key: the error names the bucket and the variables, not their values.
    "wrong credentials": ({}, "moto_auth", "denied"),
    "S3 endpoint unreachable": ({"AWS_ENDPOINT_URL_S3": "http://127.0.0.1:{port}"}, None, "cannot reach bucket"),
    "unreadable S3 source": ({}, None, "no such file or folder"),
    # A tracking URI with basic-auth credentials in it, as some MLflow deployments are reached.
    "MLflow unreachable, password in its URI": (
        {"MLFLOW_TRACKING_URI": f"http://tunepipe:{SECRET}@127.0.0.1:{{port}}"}, None, "unreachable"),
}


@pytest.mark.parametrize("case", list(FAILING))
def test_failing_runs_show_the_secret_in_no_message_or_log(case, secret_env, all_logs, capsys, monkeypatch,
                                                            request, tmp_path):
    from infra.settings import get_settings

    env, fixture, expected = FAILING[case]
    for key, value in env.items():
        monkeypatch.setenv(key, value.replace("{port}", str(free_port())))
    get_settings.cache_clear()
    if fixture:
        request.getfixturevalue(fixture)
    bucket = secret_env.storage.removeprefix("s3://").split("/")[0]

    source = str(ASA_SAMPLE) if "MLflow" in case else f"s3://{bucket}/in/none.csv"
    result = CliRunner().invoke(app, ["run", "flights", "--data", source])

    assert result.exit_code == 2 and expected in result.stderr, result.output
    captured = capsys.readouterr()
    outputs = {"cli output": result.output, "captured logs": all_logs.text,
               "stdout/stderr": captured.out + captured.err, **_local_files(tmp_path)}
    assert leaks(outputs) == []
