"""prefect.yaml against a real Prefect server: deploy all, trigger a run with parameters as the UI does, execute it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import ASA_SAMPLE, ROOT, free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BIN = Path(sys.executable).parent


@pytest.fixture
def prefect_server(tmp_path):
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"),
           "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{tmp_path}/prefect.db",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    log = open(tmp_path / "server.log", "wb")
    proc = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port),
                             "--analytics-off"], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise RuntimeError((tmp_path / "server.log").read_text()[-2000:])
        time.sleep(1)
    else:
        raise RuntimeError("prefect server did not become healthy")
    yield url, env
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _cli(args: list[str], env: dict[str, str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "prefect"), *args], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def test_deploy_all_and_run_a_triggered_deployment(prefect_server, tmp_path):
    url, server_env = prefect_server
    env = {**server_env, "PREFECT_API_URL": url, "TUNEPIPE_STORAGE": str(tmp_path / "store"),
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db", "CI": "true"}
    pool = _cli(["work-pool", "create", "tunepipe-process", "--type", "process"], env)
    assert pool.returncode == 0, pool.stdout + pool.stderr
    deployed = _cli(["--no-prompt", "deploy", "--all"], env)
    assert deployed.returncode == 0, deployed.stdout[-3000:] + deployed.stderr[-3000:]

    from prefect.client.orchestration import SyncPrefectClient

    with SyncPrefectClient(url) as client:
        names = {d.name for d in client.read_deployments()}
        assert {"flights-nightly", "fashion-mnist-manual", "tabular-manual", "batch-score"} <= names
        nightly = client.read_deployment_by_name("flights-tuning/flights-nightly")
        assert nightly.schedules and nightly.schedules[0].schedule.cron == "0 2 * * *"
        for deployment in client.read_deployments():  # one run at a time, the next one queued
            assert deployment.global_concurrency_limit.limit == 1, deployment.name
            assert deployment.concurrency_options.collision_strategy == "ENQUEUE", deployment.name
        # Trigger with parameters, as the UI's "Custom run" form does.
        params = {"cfg": {"data": {"source": str(ASA_SAMPLE), "max_rows": 3000, "split": "random"},
                          "tune": {"num_samples": 2, "max_iterations": 5, "search": "random", "scheduler": "fifo"},
                          "registry": {"model_name": "deployed-flights"}}}
        run = client.create_flow_run_from_deployment(nightly.id, parameters=params)
    executed = subprocess.run([str(BIN / "prefect"), "flow-run", "execute", str(run.id)], env=env, cwd=ROOT,
                              capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    with SyncPrefectClient(url) as client:
        state = client.read_flow_run(run.id).state
    assert state.is_completed(), executed.stdout[-3000:] + executed.stderr[-3000:]
