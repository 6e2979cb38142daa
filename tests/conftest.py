"""Shared, real, throwaway parts: one local Ray, one moto S3 server, one Prefect harness per session,
MLflow on a temp SQLite file per test, and the real data samples from ../shared/data/."""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
ASA_SAMPLE = SHARED_DATA / "flights-asa-2008" / "2008_first_22041_rows.csv"
FASHION_SAMPLE = SHARED_DATA / "fashion-mnist-2k"

# Quiet, deterministic Ray in tests (no dashboard, no usage stats, no token-auth nagging).
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
os.environ.setdefault("AWS_REQUEST_CHECKSUM_CALCULATION", "when_required")
os.environ.setdefault("AWS_RESPONSE_CHECKSUM_VALIDATION", "when_required")
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")


# The S3 key pair every Ray worker of the test session holds in its environment (runtime_env):
# tests that use it get the key-free filesystem for Ray (no key pickled into experiment state).
RAY_WORKER_KEY_ID = f"AKIDTUNEPIPE{uuid.uuid4().hex[:8].upper()}"
RAY_WORKER_SECRET = f"SECRET-tunepipe-{uuid.uuid4().hex}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session; only shut down because this fixture started it."""
    import ray

    started = False
    if not ray.is_initialized():
        # address="local": never join a `ray start` cluster some other test left recorded in /tmp/ray.
        ray.init(address="local", num_cpus=2, include_dashboard=False,
                 runtime_env={"env_vars": {"AWS_ACCESS_KEY_ID": RAY_WORKER_KEY_ID,
                                           "AWS_SECRET_ACCESS_KEY": RAY_WORKER_SECRET}},
                 log_to_driver=False, configure_logging=False)
        started = True
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="session")
def moto_server():
    """A moto S3 server in a thread on a free loopback port (server mode, so pyarrow/Ray reach it too)."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3_settings(moto_server, monkeypatch):
    """Settings pointing at moto with a fresh bucket; also exported as env for subprocesses/Ray."""
    import uuid

    from infra.settings import Settings, get_settings
    from infra.storage import boto3_client

    bucket = f"tp-{uuid.uuid4().hex[:10]}"
    env = {
        "AWS_ENDPOINT_URL_S3": moto_server,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
        "TUNEPIPE_STORAGE": f"s3://{bucket}/root",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    get_settings.cache_clear()
    settings = Settings()
    boto3_client(settings).create_bucket(Bucket=bucket)
    yield settings
    get_settings.cache_clear()


@pytest.fixture(scope="session")
def mlflow_sqlite_template(tmp_path_factory):
    """An MLflow SQLite database migrated once: creating one takes 5-25 s, copying it milliseconds."""
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def local_settings(tmp_path, monkeypatch, mlflow_sqlite_template):
    """Local storage root and MLflow on a fresh SQLite file; MLflow's process-wide URIs restored after."""
    import shutil

    from infra.settings import Settings, get_settings

    shutil.copyfile(mlflow_sqlite_template, tmp_path / "mlflow.db")
    monkeypatch.setenv("TUNEPIPE_STORAGE", str(tmp_path / "store"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    # mlflow.set_tracking_uri/set_registry_uri write these; recording them here restores them at teardown.
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    for k in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "RAY_ADDRESS", "MLFLOW_S3_ENDPOINT_URL"):
        monkeypatch.delenv(k, raising=False)
    get_settings.cache_clear()
    yield Settings()
    get_settings.cache_clear()


@pytest.fixture(scope="session")
def prefect_harness():
    """One Prefect ephemeral API for the session (it takes ~15 s to start)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
