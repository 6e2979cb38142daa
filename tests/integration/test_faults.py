"""Real faults injected into real runs, each test checking what survived.

* a trial that crashes twice resumes from its last checkpoint and the experiment completes;
* a crash at each stage boundary (prepare, tune, retrain, register), one after the other: each
  re-run skips the finished stages (Prefect cache), resumes or reuses the interrupted one and
  ends with exactly one model version; a further re-run changes nothing (fault 5);
* the S3 endpoint goes down for ~10 s in the middle of writing a data version: the stage retries,
  the half-written version is never visible (no manifest) and is rewritten, the run completes;
* the MLflow tracking server is stopped right before registration and comes back ~5 s later:
  the registration task retries and exactly one model version exists.

The driver SIGKILLed mid-experiment is covered by tests/integration/test_flights_flow.py
(``test_rerun_after_driver_sigkill_resumes_instead_of_restarting``).

Budgets are tiny (4,000 rows of the ASA sample, 3 trials, 6 boosting rounds).
"""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlflow
import pyarrow.fs as pafs
import pytest

from tests.conftest import ASA_SAMPLE, free_port
from tests.faults import failing
from tuning_core.config import FlightsData, FlightsPipeline, RegistryConfig, TuneConfig

pytestmark = pytest.mark.slow

LOCAL = pafs.LocalFileSystem()
SPACE: dict[str, Any] = {
    "max_depth": {"type": "randint", "low": 2, "high": 5},
    "eta": {"type": "loguniform", "low": 0.05, "high": 0.5},
    "subsample": {"type": "uniform", "low": 0.6, "high": 1.0},
}


def small_cfg(model: str, **tune: Any) -> FlightsPipeline:
    return FlightsPipeline(
        data=FlightsData(source=str(ASA_SAMPLE), max_rows=4000, split="random"),
        # One trial at a time: on 2 cores a second trial actor costs more than these tiny trials.
        tune=TuneConfig(**{"num_samples": 3, "max_iterations": 6, "checkpoint_every": 2, "search": "random",
                           "scheduler": "fifo", "max_concurrent_trials": 1, "space": SPACE, **tune}),
        registry=RegistryConfig(model_name=model),
    )


@pytest.fixture
def env(local_settings, prefect_harness, ray_local):
    yield local_settings
    mlflow.set_tracking_uri(None)
    mlflow.set_registry_uri(None)


def task_runs(flow_state: Any) -> dict[str, Any]:
    """Task name → its task run (state, run_count) in the flow run behind ``flow_state``."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    flow_run_id = flow_state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {r.name.rsplit("-", 1)[0]: r for r in runs}


def states(flow_state: Any) -> dict[str, str]:
    return {name: run.state.name for name, run in task_runs(flow_state).items()}


def model_versions(name: str) -> list[Any]:
    return mlflow.MlflowClient().search_model_versions(f"name = '{name}'")


def tagged_runs(tag: str) -> list[Any]:
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name("tunepipe-flights")
    return [r for r in client.search_runs([exp.experiment_id]) if tag in r.data.tags]


# --------------------------------------------------------------------------- 1. a trial crashes twice
class _Seen:
    """A driver-side Tune callback: every result, per trial, in arrival order."""

    def __init__(self) -> None:
        self.iterations: dict[str, list[int]] = {}
        self.rounds: dict[str, int] = {}  # boosting rounds covered by the reports' curves

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.iterations.setdefault(trial.trial_id, []).append(int(result["training_iteration"]))
        self.rounds[trial.trial_id] = self.rounds.get(trial.trial_id, 0) + len(result["curve"]["auc"])


def test_trial_crashing_twice_resumes_from_its_checkpoints_and_every_trial_completes(ray_local, tmp_path):
    from tuning_core.data import flights
    from tuning_core.runner import run_tuning
    from tuning_core.trainables.xgboost import train_xgboost

    version = flights.prepare(small_cfg("x").data, None, None, LOCAL, str(tmp_path / "store"))
    data = {s: flights.load_split(LOCAL, version.path, s) for s in ("train", "valid")}
    marker = tmp_path / "crashes"
    # The first trial to checkpoint crashes right after it (round 2), and again after the next one (round 4).
    cfg = small_cfg("x", max_failures=2).tune
    seen = _Seen()

    trainable = failing(train_xgboost, marker, times=2, after_checkpoint=True)
    result = run_tuning(trainable, data, cfg.space, cfg, LOCAL, str(tmp_path / "ray"), "crash-twice",
                        callbacks=[seen])

    assert marker.read_text() == "2"
    assert len(result.trials) == 3
    assert all(t.status == "TERMINATED" and t.iterations == 6 for t in result.trials)
    (error_file,) = Path(result.experiment_uri).glob("trial_*/error.txt")  # one trial crashed, twice
    assert "injected trial failure 1/2" in error_file.read_text()
    assert "injected trial failure 2/2" in error_file.read_text()
    crashed = error_file.parent.name.removeprefix("trial_")
    # Trials report at their checkpoints (every 2 rounds, FIFO). Rounds continued after each crash
    # (2 → 3, 4 → 5) instead of starting again at 1: no report repeats, and the reports' curves
    # cover each of the 6 rounds once.
    assert seen.iterations[crashed] == [2, 4, 6]
    assert all(its == [2, 4, 6] for its in seen.iterations.values())
    assert set(seen.rounds.values()) == {6}


# --------------------------------------------------------------------------- 5 + 6. crash at each stage boundary
STAGES = [("prepare_data", "prepare"), ("tune", "tune"), ("retrain_best", "retrain"),
          ("evaluate_and_register", "register")]


def test_crash_after_each_stage_then_rerun_continues_where_it_stopped(env, monkeypatch):
    """Each run crashes right after the work of one stage (its result not yet recorded); the next run goes on.

    Crashing *after* the work is the hard case: the data version, the Ray experiment, the MLflow
    run or the model version exist, but Prefect recorded a failure, so the re-run must find and
    reuse them instead of duplicating them.
    """
    from flows.workloads import flights_tuning
    from tasks import stages, workloads

    crash = {"after": None}

    def crashing(fn_name: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            out = real(*args, **kwargs)
            if crash["after"] == fn_name:
                raise RuntimeError(f"injected crash after {fn_name}")
            return out

        return wrapper

    for task_name, fn_name in STAGES:
        monkeypatch.setattr(workloads, fn_name, crashing(fn_name, getattr(workloads, fn_name)))
        monkeypatch.setattr(stages, task_name, getattr(stages, task_name).with_options(retries=0))
    cfg = small_cfg("fault-chain")

    for i, (task_name, fn_name) in enumerate(STAGES):
        crash["after"] = fn_name
        state = flights_tuning(cfg, return_state=True)
        assert state.is_failed()
        seen = states(state)
        assert seen[task_name] == "Failed", seen
        # Stages two or more steps back finished in an earlier run: cached. The one just before
        # crashed last time, so it ran again (finding its own leftovers).
        assert all(seen[t] == "Cached" for t, _ in STAGES[:max(0, i - 1)]), seen
        if i:
            assert seen[STAGES[i - 1][0]] == "Completed", seen
        assert not set(seen) & {t for t, _ in STAGES[i + 1:]}, seen

    crash["after"] = None
    state = flights_tuning(cfg, return_state=True)
    summary = state.result()
    seen = states(state)
    assert [seen[t] for t, _ in STAGES] == ["Cached", "Cached", "Cached", "Completed"], seen
    assert summary["tuning"]["resumed"] is True  # the re-run of tune restored the crashed run's experiment
    assert summary["tuning"]["num_trials"] == 3
    assert len(model_versions("fault-chain")) == 1 and summary["registry"]["version"] == "1"
    assert summary["registry"]["aliases"] == ["champion"]
    assert len(tagged_runs("tunepipe.trial_id")) == 3
    assert len([r for r in tagged_runs("tunepipe.stage") if r.data.tags["tunepipe.stage"] == "retrain"]) == 1
    assert len(list((Path(env.storage) / "data" / "flights").iterdir())) == 1

    # 5. The same flow after a success: finished stages skipped, nothing duplicated, aliases unchanged.
    again = flights_tuning(cfg, return_state=True)
    assert [states(again)[t] for t, _ in STAGES[:3]] == ["Cached"] * 3
    assert again.result()["registry"] == summary["registry"]
    assert len(model_versions("fault-chain")) == 1


# --------------------------------------------------------------------------- 3. S3 down mid-write
class FlakyProxy:
    """A TCP proxy in front of an S3 endpoint that goes down when a request names ``trigger``.

    Down is what a crashed or restarting server looks like to clients: the connection carrying the
    trigger and every other open one are cut, and new ones are refused (no listening socket) for
    ``down_s`` seconds. ``on_recover`` runs just before it listens again.
    """

    def __init__(self, target: str, trigger: bytes, down_s: float, on_recover: Callable[[], None]) -> None:
        host, port = target.removeprefix("http://").rstrip("/").split(":")
        self.target = (host, int(port))
        self.trigger, self.down_s, self.on_recover = trigger, down_s, on_recover
        self.port = free_port()
        self.outages = 0
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._up = threading.Event()
        self._closed = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()
        assert self._up.wait(10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self._closed.set()
        self._up.clear()

    def _serve(self) -> None:
        while not self._closed.is_set():
            with socket.socket() as listener:
                listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                listener.bind(("127.0.0.1", self.port))
                listener.listen(64)
                self._up.set()
                while self._up.is_set():
                    if select.select([listener], [], [], 0.05)[0]:
                        client, _ = listener.accept()
                        threading.Thread(target=self._relay, args=(client,), daemon=True).start()
            if not self._closed.is_set():  # down: connections are refused until we listen again
                time.sleep(self.down_s)
                self.on_recover()

    def _go_down(self) -> None:
        with self._lock:
            self.outages += 1
            self._up.clear()
            for s in self._conns:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _relay(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.target, timeout=10)
        except OSError:
            client.close()
            return
        with self._lock:
            self._conns |= {client, upstream}
        try:
            while self._up.is_set():
                for s in select.select([client, upstream], [], [], 0.5)[0]:
                    data = s.recv(1 << 16)
                    if not data:
                        return
                    if s is client and self.outages == 0 and self.trigger in data:
                        self._go_down()
                        return
                    (upstream if s is client else client).sendall(data)
        except OSError:
            pass
        finally:
            with self._lock:
                self._conns -= {client, upstream}
            client.close()
            upstream.close()


def test_s3_down_while_writing_a_data_version_is_retried_and_no_half_version_is_visible(
        local_settings, s3_settings, prefect_harness, ray_local, monkeypatch):
    from flows.workloads import flights_tuning
    from infra.settings import get_settings
    from infra.storage import s3_filesystem
    from tuning_core.versioning import version_exists

    bucket = s3_settings.storage.removeprefix("s3://").split("/")[0]
    direct = s3_filesystem(s3_settings)  # straight to the server, past the proxy
    versions_root = f"{bucket}/root/data/flights"

    def listing() -> dict[str, set[str]]:
        infos = direct.get_file_info(pafs.FileSelector(versions_root, recursive=True, allow_not_found=True))
        out: dict[str, set[str]] = {}
        for i in infos:
            if i.type == pafs.FileType.File:
                folder, name = i.path.removeprefix(versions_root + "/").split("/", 1)
                out.setdefault(folder, set()).add(name)
        return out

    during: dict[str, Any] = {}

    def on_recover() -> None:
        during["files"] = listing()
        during["visible"] = {f for f in during["files"] if version_exists(direct, f"{versions_root}/{f}")}

    # The outage starts when the second split of the data version is uploaded: train.parquet is there.
    proxy = FlakyProxy(s3_settings.s3_endpoint_url, b"valid.parquet", down_s=10, on_recover=on_recover)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy.url)
    monkeypatch.delenv("MLFLOW_S3_ENDPOINT_URL", raising=False)
    # The shipped policy (3 retries, backing off 1, 2, 4 base delays with jitter) on a 3 s base: at least
    # 0.63 * 21 s of waiting in all, past the 10 s outage.
    monkeypatch.setenv("TUNEPIPE_RETRY_DELAY_S", "3")
    get_settings.cache_clear()
    try:
        state = flights_tuning(small_cfg("fault-s3"), return_state=True)
    finally:
        proxy.close()
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)

    summary = state.result()
    assert proxy.outages == 1
    version = summary["data"]["version"]
    # While S3 was down, the interrupted version was there in part, without its manifest: not a version.
    assert during["files"] == {version: {"train.parquet"}}
    assert during["visible"] == set()
    prepare = task_runs(state)["prepare_data"]
    assert prepare.state.name == "Completed" and prepare.run_count >= 2
    # The retry rewrote it whole; the run went on to register a model.
    assert listing() == {version: {"manifest.json", "train.parquet", "valid.parquet", "test.parquet"}}
    assert summary["registry"]["version"] == "1"


# --------------------------------------------------------------------------- 4. MLflow down at registration
class MlflowServer:
    """`mlflow server` on a free loopback port with a SQLite store and proxied local artifacts."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        home.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        argv = [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1",
                "--port", str(self.port), "--backend-store-uri", f"sqlite:///{self.home / 'mlflow.db'}",
                "--artifacts-destination", str(self.home / "artifacts"), "--serve-artifacts", "--workers", "1"]
        with open(self.home / "server.log", "ab") as log:
            self.proc = subprocess.Popen(argv, cwd=self.home, stdout=log, stderr=subprocess.STDOUT,
                                         env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
                                         start_new_session=True)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (self.home / "server.log").read_text()[-2000:]
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2):
                    return
            except OSError:
                time.sleep(0.5)
        raise AssertionError("mlflow server did not start: " + (self.home / "server.log").read_text()[-2000:])

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def test_tracking_server_down_at_registration_is_retried_and_registers_once(env, tmp_path, monkeypatch):
    from flows.workloads import flights_tuning
    from infra.settings import get_settings
    from tasks import workloads

    server = MlflowServer(tmp_path / "mlflow")
    server.start()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    get_settings.cache_clear()
    calls: list[float] = []
    real = workloads.register
    restart = threading.Timer(5, server.start)

    def register(*args: Any, **kwargs: Any) -> Any:
        calls.append(time.monotonic())
        if len(calls) == 1:  # the server goes away right before registration and is back ~5 s later
            server.stop()
            restart.start()
        return real(*args, **kwargs)

    monkeypatch.setattr(workloads, "register", register)  # with the shipped retry policy and its 10 s base
    try:
        state = flights_tuning(small_cfg("fault-mlflow"), return_state=True)
        summary = state.result()
        client = mlflow.MlflowClient(tracking_uri=server.url, registry_uri=server.url)
        versions = client.search_model_versions("name = 'fault-mlflow'")
    finally:
        restart.join()
        server.stop()

    assert len(calls) >= 2  # the first attempt failed against the stopped server
    assert task_runs(state)["evaluate_and_register"].run_count == len(calls)
    assert [(str(v.version), v.run_id) for v in versions] == [("1", summary["retrain"]["mlflow_run_id"])]
    assert summary["registry"]["aliases"] == ["champion"]
