"""MLflow as the real stack runs it: an ``mlflow server`` subprocess with a SQLite backend that proxies
artifacts to a real S3 server (SeaweedFS). The client holds no S3 credentials: models go up and come
back down through the tracking server only."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.fs as pafs
import pytest

from tests.conftest import ASA_SAMPLE, free_port

pytestmark = pytest.mark.integration

# Everything that could hand the client S3 access; the test removes them from its environment.
_S3_ACCESS_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                  "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "MLFLOW_S3_ENDPOINT_URL")


@pytest.fixture(autouse=True)
def _restore_mlflow_uris(restore_mlflow_uris):
    """Every test here: see tests.conftest.restore_mlflow_uris."""


@dataclass(frozen=True)
class MlflowServer:
    url: str
    bucket: str
    prefix: str  # artifacts land under s3://<bucket>/<prefix>/
    pid: int


def _healthy(url: str) -> bool:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never via a proxy
    try:
        with opener.open(f"{url}/health", timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


def _process_tree(pid: int) -> list[int]:
    import psutil

    try:
        root = psutil.Process(pid)
        return [pid, *(c.pid for c in root.children(recursive=True))]
    except psutil.NoSuchProcess:
        return []


def _alive(pids: list[int]) -> list[int]:
    import psutil

    alive = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.NoSuchProcess:
            pass
    return alive


@pytest.fixture
def mlflow_server(seaweed_s3, tmp_path):
    """``mlflow server`` on a free loopback port, artifacts proxied to a fresh prefix of the SeaweedFS bucket.

    Stopped (its whole process group) at the end; the test fails if any of its processes is left.
    """
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    prefix = f"mlflow-proxied-{uuid.uuid4().hex[:8]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_"))}
    env.update(seaweed_s3.env)
    env.update({"MLFLOW_S3_ENDPOINT_URL": seaweed_s3.endpoint,
                "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required",
                "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})  # no GenAI job consumers to fork
    argv = [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
            "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
            "--artifacts-destination", f"s3://{seaweed_s3.bucket}/{prefix}", "--serve-artifacts",
            "--workers", "1"]
    log_path = tmp_path / "mlflow-server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    pids: list[int] = [proc.pid]
    try:
        deadline = time.monotonic() + 180  # schema migrations + uvicorn start; slow on a busy machine
        while not _healthy(url):
            if proc.poll() is not None:
                pytest.fail(f"mlflow server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow server not healthy after 180 s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        pids = _process_tree(proc.pid)
        yield MlflowServer(url=url, bucket=seaweed_s3.bucket, prefix=prefix, pid=proc.pid)
    finally:
        pids = sorted(set(pids) | set(_process_tree(proc.pid)))
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        deadline = time.monotonic() + 10
        while _alive(pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = _alive(pids)
        if left:
            for pid in left:
                os.kill(pid, signal.SIGKILL)
            pytest.fail(f"mlflow server processes left after stop: {left}")


@pytest.fixture
def client_settings(mlflow_server, tmp_path, monkeypatch):
    """The pipeline side: tracking URI = the server, local storage root, and no way to reach S3 itself."""
    from infra.settings import Settings, get_settings

    for name in _S3_ACCESS_ENV:
        monkeypatch.delenv(name, raising=False)
    # No shared credentials/config file either, wherever HOME points.
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    monkeypatch.setenv("TUNEPIPE_STORAGE", str(tmp_path / "store"))
    get_settings.cache_clear()
    yield Settings()
    get_settings.cache_clear()


def _flights(tmp_path: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    from tuning_core.config import FlightsData
    from tuning_core.data import flights

    fs = pafs.LocalFileSystem()
    version = flights.prepare(FlightsData(source=str(ASA_SAMPLE), max_rows=3000), None, None, fs,
                              str(tmp_path / "data"))
    return flights.load_split(fs, version.path, "train"), flights.load_split(fs, version.path, "test")


def test_model_logged_through_the_server_lands_in_s3_and_loads_by_alias(mlflow_server, client_settings, seaweed_s3,
                                                                        tmp_path):
    import mlflow

    from infra.models import log_flights_model
    from infra.storage import boto3_client, build_storage
    from infra.tracking import TAG_STAGE, Tracker
    from tuning_core.data.flights import CATEGORICAL
    from tuning_core.trainables.xgboost import LABEL, fit_booster

    assert not [k for k in _S3_ACCESS_ENV if k in os.environ]
    train, test = _flights(tmp_path)
    booster = fit_booster({"max_depth": 3, "eta": 0.3}, train, 15, nthread=1)
    features = train.drop(columns=[LABEL])
    categories = {c: [str(v) for v in features[c].cat.categories] for c in CATEGORICAL}

    tracker = Tracker(client_settings, build_storage(client_settings))
    assert tracker.uri == mlflow_server.url
    tracker.check()
    parent = tracker.parent_run("tunepipe-proxied", "proxied-key", {"workload": "flights"}, run_name="proxied")
    run_id, _ = tracker.child_run(parent, TAG_STAGE, "retrain", "retrain")
    model_uri = log_flights_model(run_id, booster, features.head(50), categories)
    tracker.log_files(run_id, {"roc_curve.png": b"\x89PNG\r\n\x1a\nplot"})
    tracker.finish(run_id)
    version = tracker.register("flights-proxied", run_id, model_uri, {"data": "asa"})
    assert tracker.register("flights-proxied", run_id, model_uri, {"data": "asa"}) == version
    result = tracker.gate("flights-proxied", version, 0.7, "auc", "max", 0.0, lambda uri: 0.0)
    assert result.promoted and result.aliases == ["champion"]

    # The experiment's artifacts are proxied: the server, not the client, decided where they go.
    location = tracker.client.get_experiment_by_name("tunepipe-proxied").artifact_location
    assert location.startswith("mlflow-artifacts:"), location

    # The objects are in the SeaweedFS bucket, under the server's --artifacts-destination.
    s3 = boto3_client(seaweed_s3.settings())  # the test's own look into the bucket, with the server's keys
    listed = s3.list_objects_v2(Bucket=mlflow_server.bucket, Prefix=f"{mlflow_server.prefix}/")
    keys = [o["Key"] for o in listed.get("Contents", [])]
    assert any(k.endswith("/MLmodel") for k in keys), keys
    assert any(k.endswith("/model.ubj") for k in keys), keys
    assert any(k.endswith(f"{run_id}/artifacts/roc_curve.png") for k in keys), keys

    # A registry consumer loads the champion through the server and scores plain features.
    model = mlflow.pyfunc.load_model("models:/flights-proxied@champion")
    x = test.drop(columns=[LABEL])
    frame = pd.DataFrame({c: (x[c].astype(str) if c in categories else x[c]) for c in x.columns})
    out = model.predict(frame)
    assert len(out) == len(test)
    proba = out["delay_probability"].to_numpy()
    assert np.isfinite(proba).all() and ((proba > 0) & (proba < 1)).all()
    import xgboost as xgb

    np.testing.assert_allclose(proba, booster.predict(xgb.DMatrix(x, enable_categorical=True)), rtol=1e-5)

