"""The real local stack (infra/stack/): SeaweedFS, MLflow server, Prefect server + worker, Ray head.

One stack is started for the module (the start-up is the expensive part); the tests then check it
from the outside the way a user would, and the last one stops and restarts it to show that data,
ports and the model registry survive.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from pydantic import SecretStr

from infra import stack
from infra.ui_screenshots import Browser, find_chromium
from tests.conftest import free_port, process_tree, still_alive
from tuning_core.errors import ConfigError, StorageError, TunepipeError

pytestmark = pytest.mark.integration

MODEL = "tunepipe-stack-test"


def _s3(endpoint: str, key: str, secret: str):
    from infra.settings import Settings
    from infra.storage import boto3_client

    return boto3_client(Settings(s3_endpoint_url=endpoint, aws_access_key_id=key, aws_secret_access_key=secret))


@contextlib.contextmanager
def _mlflow_client_env(monkeypatch, tracking_uri: str):
    """The test process as a client with NO S3 credentials: artifacts must go through the server."""
    import mlflow

    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL",
                "MLFLOW_S3_ENDPOINT_URL", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tracking_uri)
    try:
        yield mlflow
    finally:
        mlflow.set_tracking_uri(previous)


def _always_one_model():
    import mlflow.pyfunc

    class AlwaysOne(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input, params=None):
            return [1] * len(model_input)

    return AlwaysOne()


@pytest.fixture(scope="module")
def fixed_mlflow_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def stack_dir(tmp_path_factory, fixed_mlflow_port):
    state_dir = tmp_path_factory.mktemp("stack")
    stack.up(state_dir, ports={"mlflow": fixed_mlflow_port}, timeout_s=150)
    yield state_dir
    stack.down(state_dir)


# ---- fast checks that start nothing ----------------------------------------------------------------


def test_fixed_port_in_use_fails_before_starting_anything(tmp_path):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(StorageError) as err:
            stack.up(tmp_path, ports={"s3": port})
    message = str(err.value)
    assert "s3" in message and str(port) in message and str(tmp_path / "logs" / "s3.log") in message
    assert "\n" not in message
    assert stack.status(tmp_path).pids() == {}


def test_unknown_names_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="ports"):
        stack.up(tmp_path, ports={"mlfow": 5000})
    with pytest.raises(ConfigError, match="services"):
        stack.up(tmp_path, services=("s3", "minio"))


def test_env_before_up_says_how_to_set_up(tmp_path):
    with pytest.raises(TunepipeError, match="stack up"):
        stack.env(tmp_path / "never-started")
    assert stack.status(tmp_path / "never-started").services == ()


def test_shell_exports_survive_quotes_in_values():
    script = stack.shell_exports({"A": "it's $HOME", "B": "plain"}) + 'printf "%s|%s" "$A" "$B"'
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True).stdout
    assert out == "it's $HOME|plain"


def test_state_dir_defaults_to_env_variable(monkeypatch, tmp_path):
    monkeypatch.setenv("TUNEPIPE_STACK_DIR", str(tmp_path / "custom"))
    assert stack.default_state_dir() == tmp_path / "custom"
    monkeypatch.delenv("TUNEPIPE_STACK_DIR")
    assert stack.default_state_dir() == Path(".tunepipe") / "stack"


def test_health_timeout_names_the_service_and_log_and_leaves_nothing_running(tmp_path):
    with pytest.raises(StorageError) as err:
        stack.up(tmp_path, services=("s3",), timeout_s=0.01)
    message = str(err.value)
    assert message.startswith("stack service s3: not healthy after 0.01 s")
    assert str(tmp_path / "logs" / "s3.log") in message
    assert stack.status(tmp_path).pids() == {}
    assert not stack.runtime_dir(tmp_path).exists(), "sockets left behind"


def test_down_leaves_no_seaweedfs_sockets_or_log_files_in_tmp(tmp_path):
    """SeaweedFS opens its gRPC sockets at fixed /tmp paths and by default writes glog files into /tmp;
    ``down()`` removes the sockets and the stack has it log to stderr only (found by benchmarks/soak.py)."""
    stack.up(tmp_path, services=("s3",), timeout_s=60)
    state = stack.StackState(tmp_path)
    state.load()
    weed_pid, ports = stack.status(tmp_path).pids()["s3"], state.data["ports"]
    sockets = [Path(f"/tmp/seaweedfs-{part}-grpc-{ports[key]}.sock") for part, key in (
        ("s3", "s3_grpc"), ("master", "weed_master_grpc"), ("volume", "weed_volume_grpc"),
        ("filer", "weed_filer_grpc"), ("admin", "weed_admin_grpc"))]
    try:
        assert [s for s in sockets if s.exists()], "no SeaweedFS socket where it puts them: nothing to check"
    finally:
        stack.down(tmp_path)
    assert [s for s in sockets if s.exists()] == []
    assert list(Path("/tmp").glob(f"weed.*.{weed_pid}")) == []


# ---- the seaweed_s3 fixture other integration tests use --------------------------------------------


def test_seaweed_fixture_serves_pyarrow_storage_with_its_credentials(seaweed_s3):
    from infra.storage import build_storage

    storage = build_storage(seaweed_s3.settings(storage=f"s3://{seaweed_s3.bucket}/fixture-check"))
    with storage.fs.open_output_stream(storage.path("hello.txt")) as out:
        out.write(b"hello")
    with storage.fs.open_input_stream(storage.path("hello.txt")) as f:
        assert f.read() == b"hello"
    # StorageError or ServiceUnavailable, depending on how infra.storage classifies pyarrow's error.
    with pytest.raises(TunepipeError, match="(?i)denied"):
        build_storage(seaweed_s3.settings().model_copy(update={"aws_secret_access_key": SecretStr("wrong")}))


# ---- one running stack -----------------------------------------------------------------------------


def test_up_reports_every_service_healthy_on_the_chosen_ports(stack_dir, fixed_mlflow_port):
    status = stack.status(stack_dir)
    assert [s.name for s in status.services] == ["s3", "mlflow", "prefect", "worker"]
    assert status.healthy, status
    assert status.service("mlflow").url == f"http://127.0.0.1:{fixed_mlflow_port}"
    env = stack.env(stack_dir)
    assert env["MLFLOW_TRACKING_URI"] == f"http://127.0.0.1:{fixed_mlflow_port}"
    assert env["PREFECT_API_URL"] == status.service("prefect").url
    assert env["TUNEPIPE_STORAGE"] == "s3://tunepipe/root"
    assert "RAY_ADDRESS" not in env  # no head was asked for


def test_prefect_ui_is_told_the_stacks_own_api_url(stack_dir):
    import urllib.request

    api = stack.env(stack_dir)["PREFECT_API_URL"]
    with urllib.request.urlopen(api.removesuffix("/api") + "/ui-settings", timeout=10) as r:
        settings = json.load(r)
    # Prefect's default would be http://127.0.0.1:4200/api: the UI's "Oops. Something went wrong."
    assert settings["api_url"] == api


@pytest.mark.skipif(find_chromium() is None, reason="needs Chromium on PATH (apt-get install chromium)")
def test_prefect_ui_shows_the_stacks_work_pool_in_a_browser(stack_dir):
    api = stack.env(stack_dir)["PREFECT_API_URL"]
    with Browser() as browser:
        # The pool's name comes from the API: the page shows it only if the UI reached the stack's API.
        text = browser.open(api.removesuffix("/api") + "/work-pools", until=stack.WORK_POOL, timeout_s=60)
    assert "Oops" not in text and "Unable to connect" not in text
    assert stack.WORK_POOL in text, text[:300]


def test_second_up_keeps_the_running_processes(stack_dir):
    before = stack.status(stack_dir).pids()
    again = stack.up(stack_dir)
    assert again.pids() == before
    assert again.healthy


def test_credentials_are_private_and_masked(stack_dir):
    state_file = stack_dir / "state.json"
    assert stat.S_IMODE(state_file.stat().st_mode) == 0o600
    assert stat.S_IMODE((stack_dir / "s3" / "identities.json").stat().st_mode) == 0o600
    secret = json.loads(state_file.read_text())["s3"]["secret_key"]
    masked, shown = stack.env(stack_dir), stack.env(stack_dir, show_secrets=True)
    assert masked["AWS_SECRET_ACCESS_KEY"] == "***" and masked["AWS_ACCESS_KEY_ID"] == "***"
    assert shown["AWS_SECRET_ACCESS_KEY"] == secret
    for log in (stack_dir / "logs").glob("*.log"):
        assert secret not in log.read_text(errors="replace"), log
    for proc in process_tree(stack.status(stack_dir).pids().values()):
        with contextlib.suppress(psutil.Error):
            assert secret not in " ".join(proc.cmdline()), proc


def test_s3_accepts_stack_credentials_and_rejects_wrong_ones(stack_dir):
    from botocore.exceptions import ClientError

    env = stack.env(stack_dir, show_secrets=True)
    endpoint, key, secret = env["AWS_ENDPOINT_URL_S3"], env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]
    good = _s3(endpoint, key, secret)
    good.put_object(Bucket="tunepipe", Key="checks/hello.txt", Body=b"hello")
    assert good.get_object(Bucket="tunepipe", Key="checks/hello.txt")["Body"].read() == b"hello"
    for bad_key, bad_secret in ((key, secret + "x"), ("nobody", "nothing")):
        with pytest.raises(ClientError) as err:
            _s3(endpoint, bad_key, bad_secret).get_object(Bucket="tunepipe", Key="checks/hello.txt")
        assert err.value.response["Error"]["Code"] in ("SignatureDoesNotMatch", "InvalidAccessKeyId", "AccessDenied")


def test_services_listen_only_on_loopback(stack_dir):
    # Before any Ray head: Ray 2.60 rewrites --node-ip-address 127.0.0.1 to the host's address and
    # binds to all interfaces; its cluster token guards it instead (see infra/cluster/README.md).
    pids = stack.status(stack_dir).pids()
    assert set(pids) == {"s3", "mlflow", "prefect", "worker"}
    listening = {}
    for proc in process_tree(pids.values()):
        with contextlib.suppress(psutil.Error):
            for conn in proc.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN:
                    listening[(conn.laddr.ip, conn.laddr.port)] = proc.name()
    assert len(listening) >= 13  # S3 alone has 10 listeners
    assert {ip for ip, _ in listening} == {"127.0.0.1"}, listening


def test_ray_head_joins_the_stack_and_the_worker_learns_its_address(stack_dir):
    before = stack.status(stack_dir).pids()
    after = stack.up(stack_dir, ray_head=True, ray_num_cpus=1)
    assert after.healthy and after.service("ray").healthy
    pids = after.pids()
    assert {k: pids[k] for k in ("s3", "mlflow", "prefect")} == {k: before[k] for k in ("s3", "mlflow", "prefect")}
    # The worker's flow runs must reach the head: it was restarted with RAY_ADDRESS.
    assert pids["worker"] != before["worker"]
    env = stack.env(stack_dir, show_secrets=True)
    assert psutil.Process(pids["worker"]).environ()["RAY_ADDRESS"] == env["RAY_ADDRESS"]
    assert stat.S_IMODE(Path(env["RAY_AUTH_TOKEN_PATH"]).stat().st_mode) == 0o600

    code = ("import ray; ray.init(log_to_driver=False, configure_logging=False); "
            "print(int(ray.cluster_resources()['CPU'])); ray.shutdown()")
    child_env = {**os.environ, **env, "RAY_USAGE_STATS_ENABLED": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=child_env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "1"


def test_mlflow_proxies_artifacts_into_the_bucket(stack_dir, monkeypatch):
    env = stack.env(stack_dir, show_secrets=True)
    with _mlflow_client_env(monkeypatch, env["MLFLOW_TRACKING_URI"]) as mlflow:
        mlflow.set_experiment("stack-artifacts")
        with mlflow.start_run() as run:
            mlflow.log_text("proxied", "notes/hello.txt")
    s3 = _s3(env["AWS_ENDPOINT_URL_S3"], env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"])
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="tunepipe", Prefix="root/mlflow/").get("Contents", [])]
    wanted = [k for k in keys if k.endswith(f"{run.info.run_id}/artifacts/notes/hello.txt")]
    assert wanted, keys
    assert s3.get_object(Bucket="tunepipe", Key=wanted[0])["Body"].read() == b"proxied"


def test_crashed_worker_is_restarted_alone(stack_dir):
    before = stack.status(stack_dir).pids()
    os.killpg(before["worker"], signal.SIGKILL)
    deadline = time.monotonic() + 10
    while stack.status(stack_dir).service("worker").pid is not None and time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(before["worker"], os.WNOHANG)
        time.sleep(0.1)
    assert stack.status(stack_dir).service("worker").healthy is False
    after = stack.up(stack_dir).pids()
    assert after["worker"] != before["worker"]
    assert {k: v for k, v in after.items() if k != "worker"} == {k: v for k, v in before.items() if k != "worker"}


@pytest.mark.filterwarnings("ignore:Add type hints")
def test_data_and_registered_model_survive_down_and_up(stack_dir, monkeypatch):
    import pandas as pd

    env = stack.env(stack_dir, show_secrets=True)
    with _mlflow_client_env(monkeypatch, env["MLFLOW_TRACKING_URI"]) as mlflow:
        mlflow.set_experiment("stack-registry")
        with mlflow.start_run():
            # A pyfunc, not sklearn: mlflow.sklearn's default (skops) format imports every sklearn
            # estimator and torch, ~30 s here, which this test does not need.
            info = mlflow.pyfunc.log_model(name="model", python_model=_always_one_model(), registered_model_name=MODEL,
                                           pip_requirements=["mlflow"])
        mlflow.MlflowClient().set_registered_model_alias(MODEL, "champion", info.registered_model_version)

    processes = process_tree(stack.status(stack_dir).pids().values())
    stopped = stack.down(stack_dir)
    assert not stopped.running and stopped.pids() == {}
    assert still_alive(processes) == [], still_alive(processes)
    assert not stack.runtime_dir(stack_dir).exists()

    restarted = stack.up(stack_dir)
    assert restarted.healthy
    # Same ports and credentials; the Ray head was not asked for this time.
    without_ray = {k: v for k, v in env.items() if not k.startswith("RAY_")}
    assert stack.env(stack_dir, show_secrets=True) == without_ray
    with _mlflow_client_env(monkeypatch, env["MLFLOW_TRACKING_URI"]) as mlflow:
        loaded = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion")
        assert list(loaded.predict(pd.DataFrame({"x": [0.0, 2.0, 5.0]}))) == [1, 1, 1]
    s3 = _s3(env["AWS_ENDPOINT_URL_S3"], env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"])
    assert s3.get_object(Bucket="tunepipe", Key="checks/hello.txt")["Body"].read() == b"hello"
