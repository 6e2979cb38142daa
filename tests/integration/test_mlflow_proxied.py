"""MLflow as the real stack runs it: an ``mlflow server`` subprocess with a SQLite backend that proxies
artifacts to a real S3 server (SeaweedFS). The client holds no S3 credentials: models go up and come
back down through the tracking server only."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.fs as pafs
import pytest

from tests.conftest import ASA_SAMPLE, free_port, process_tree, stop_process_group

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


@contextlib.contextmanager
def _running_server(tmp_path: Path, env: dict[str, str], *options: str) -> Iterator[tuple[str, int]]:
    """``mlflow server`` with a SQLite backend on a free loopback port: (url, pid) while it runs.

    Stopped (its whole process group) at the end; fails if any of its processes is left.
    """
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
            "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}", *options, "--workers", "1"]
    log_path = tmp_path / "mlflow-server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, env={**env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},  # no GenAI jobs
                                cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    procs: list = []
    try:
        deadline = time.monotonic() + 180  # schema migrations + uvicorn start; slow on a busy machine
        while not _healthy(url):
            if proc.poll() is not None:
                pytest.fail(f"mlflow server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow server not healthy after 180 s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        procs = process_tree([proc.pid])
        yield url, proc.pid
    finally:
        procs = [*procs, *process_tree([proc.pid])]
        left = stop_process_group(proc, procs)
        if left:
            pytest.fail(f"mlflow server processes left after stop: {left}")


@pytest.fixture(scope="module")
def mlflow_server(seaweed_s3, tmp_path_factory):
    """``mlflow server`` on a free loopback port, artifacts proxied to a fresh prefix of the SeaweedFS bucket.

    One for this module (each test uses its own experiment and model names).
    """
    prefix = f"mlflow-proxied-{uuid.uuid4().hex[:8]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_"))}
    env.update(seaweed_s3.env)
    env.update({"MLFLOW_S3_ENDPOINT_URL": seaweed_s3.endpoint, "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required"})
    server = _running_server(tmp_path_factory.mktemp("mlflow-server"), env,
                             "--artifacts-destination", f"s3://{seaweed_s3.bucket}/{prefix}", "--serve-artifacts")
    with server as (url, pid):
        yield MlflowServer(url=url, bucket=seaweed_s3.bucket, prefix=prefix, pid=pid)


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

    from infra.storage import boto3_client, build_storage
    from infra.tracking import TAG_STAGE, Tracker
    from tuning_core.data.flights import CATEGORICAL
    from tuning_core.trainables.xgboost import LABEL, fit_booster
    from tuning_core.workloads.flights import booster_spec

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
    model_uri = tracker.log_model(run_id, booster_spec(booster, features.head(50), tmp_path))
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



def test_server_that_does_not_serve_artifacts_gets_the_s3_root_and_one_that_does_its_own(seaweed_s3, mlflow_server,
                                                                                          tmp_path, monkeypatch):
    """Where a new experiment's artifacts go: with a server that proxies them, the server's location
    (readable with the tracking URI alone); with one that does not, the s3:// storage root (its own
    default could be a folder on the server's disk)."""
    from infra.storage import build_storage
    from infra.tracking import Tracker

    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", seaweed_s3.endpoint)  # a Tracker sets it; undone after the test
    settings = seaweed_s3.settings(storage=f"s3://{seaweed_s3.bucket}/where-{uuid.uuid4().hex[:6]}")
    proxying = settings.model_copy(update={"mlflow_tracking_uri": mlflow_server.url})
    assert Tracker(proxying, build_storage(proxying)).artifact_location("exp") is None

    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_"))}
    with _running_server(tmp_path, env, "--no-serve-artifacts", "--default-artifact-root", str(tmp_path / "art")) \
            as (url, _):
        direct = settings.model_copy(update={"mlflow_tracking_uri": url})
        storage = build_storage(direct)
        assert Tracker(direct, storage).artifact_location("exp") == f"{storage.uri}/mlflow/exp"
        local = direct.model_copy(update={"storage": str(tmp_path / "store")})
        assert Tracker(local, build_storage(local)).artifact_location("exp") is None  # the server decides


# ----------------------------------------------------------------------------- registry consumers
# What a consumer's Python holds of ours: nothing. Importing any of our packages fails, so a model that
# needed them (code_paths, a pickled class) could not load or predict.
_NO_TUNEPIPE = '''
import sys


class _NoTunepipe:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {"infra", "tuning_core", "tasks", "flows"}:
            raise ModuleNotFoundError(f"a registry consumer has no module {name!r}")
        return None


sys.meta_path.insert(0, _NoTunepipe())
'''

_LOAD_AND_PREDICT = _NO_TUNEPIPE + '''
import json

import mlflow
import pandas as pd

path_before = list(sys.path)
model = mlflow.pyfunc.load_model(sys.argv[1])
with open(sys.argv[2]) as f:
    layouts = json.load(f)
out = {name: model.predict(pd.DataFrame(rows))["delay_probability"].tolist() for name, rows in layouts.items()}
print(json.dumps({"predictions": out, "sys_path_unchanged": sys.path == path_before}))
'''


@dataclass(frozen=True)
class Champion:
    """A flights champion registered through the proxying server, and what it must answer."""

    url: str
    name: str
    experiment: str
    layouts: dict[str, list[dict]]  # the same raw flights in each schema, as JSON records
    expected: np.ndarray  # the booster's probabilities for them, on the data stage's features
    asa: pd.DataFrame


def _records(df: pd.DataFrame) -> list[dict]:
    import json

    return json.loads(df.to_json(orient="records"))  # what a JSON client sends: NaN as null


@pytest.fixture(scope="module")
def stack_champion(mlflow_server, seaweed_s3, tmp_path_factory) -> Champion:
    """A champion registered the way the pipeline does it on the stack: the storage root is in the S3
    bucket and the pipeline holds the stack's keys, MLflow is the server that proxies artifacts."""
    import mlflow
    import xgboost as xgb

    from infra.settings import Settings, get_settings
    from infra.storage import build_storage
    from infra.tracking import TAG_STAGE, Tracker
    from tests.raw_flights import as_bts, as_nycflights13, asa_rows, canonical_features
    from tuning_core.data.flights import CATEGORICAL
    from tuning_core.trainables.xgboost import LABEL, fit_booster
    from tuning_core.workloads.flights import booster_spec

    tmp = tmp_path_factory.mktemp("stack-champion")
    name, experiment = "flights-stack-consumer", "tunepipe-stack-consumer"
    with pytest.MonkeyPatch.context() as mp:  # undone before the tests: they are consumers, not the pipeline
        for key, value in seaweed_s3.env.items():
            mp.setenv(key, value)
        mp.setenv("TUNEPIPE_STORAGE", f"s3://{seaweed_s3.bucket}/champion-{uuid.uuid4().hex[:8]}")
        mp.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
        mp.setenv("MLFLOW_S3_ENDPOINT_URL", seaweed_s3.endpoint)  # the Tracker sets it; recorded to be undone
        mp.delenv("MLFLOW_REGISTRY_URI", raising=False)
        get_settings.cache_clear()
        try:
            settings = Settings()
            tracker = Tracker(settings, build_storage(settings))
            assert tracker.storage.is_s3 and tracker.uri == mlflow_server.url
            train, _ = _flights(tmp)
            booster = fit_booster({"max_depth": 3, "eta": 0.3}, train, 10, nthread=1)
            features = train.drop(columns=[LABEL])
            categories = {c: [str(v) for v in features[c].cat.categories] for c in CATEGORICAL}
            parent = tracker.parent_run(experiment, "stack-key", {"workload": "flights"}, run_name="stack")
            run_id, _ = tracker.child_run(parent, TAG_STAGE, "retrain", "retrain")
            model_uri = tracker.log_model(run_id, booster_spec(booster, features.head(50), tmp))
            tracker.finish(run_id)
            version = tracker.register(name, run_id, model_uri, {})
            assert tracker.gate(name, version, 0.7, "auc", "max", 0.0, lambda uri: 0.0).promoted
            location = tracker.client.get_experiment_by_name(experiment).artifact_location
        finally:
            mlflow.set_tracking_uri(None)
            mlflow.set_registry_uri(None)
            get_settings.cache_clear()
    # With an s3:// storage root the experiment is still the server's: consumers need no S3 keys.
    assert location.startswith("mlflow-artifacts:"), location
    asa = asa_rows(30)
    expected = booster.predict(xgb.DMatrix(canonical_features(asa, categories, tmp), enable_categorical=True))
    layouts = {"asa": _records(asa), "bts": _records(as_bts(asa)), "nycflights13": _records(as_nycflights13(asa))}
    return Champion(url=mlflow_server.url, name=name, experiment=experiment, layouts=layouts, expected=expected,
                    asa=asa)


def test_consumer_with_only_the_tracking_uri_loads_the_champion_and_predicts_raw_rows(stack_champion, tmp_path):
    import json

    rows = tmp_path / "rows.json"
    rows.write_text(json.dumps(stack_champion.layouts))
    env = {"MLFLOW_TRACKING_URI": stack_champion.url}  # no AWS_*, no PATH, no PYTHONPATH: nothing else
    done = subprocess.run([sys.executable, "-c", _LOAD_AND_PREDICT, f"models:/{stack_champion.name}@champion",
                           str(rows)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["sys_path_unchanged"]
    assert sorted(result["predictions"]) == ["asa", "bts", "nycflights13"]
    for layout, proba in result["predictions"].items():
        np.testing.assert_allclose(proba, stack_champion.expected, rtol=1e-6, err_msg=layout)
    # Loading and predicting say nothing a consumer would have to act on.
    assert not [line for line in done.stderr.splitlines() if "Warning" in line or "WARNING" in line], done.stderr


def _post(url: str, payload: dict) -> tuple[int, dict]:
    import json

    req = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_served_champion_answers_raw_rows_of_each_schema_and_400_naming_a_bad_column(stack_champion, tmp_path):
    """``mlflow models serve`` from the registry, as a consumer runs it: only the tracking URI, and a
    Python in which none of our packages can be imported (sitecustomize blocks them in every process)."""

    blocker = tmp_path / "no-tunepipe"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(_NO_TUNEPIPE)
    port = free_port()
    env = {"MLFLOW_TRACKING_URI": stack_champion.url, "PYTHONPATH": str(blocker),
           "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"}  # bash and uvicorn
    argv = [str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m",
            f"models:/{stack_champion.name}@champion", "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)]
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    procs = []
    try:
        deadline = time.monotonic() + 180
        while not _healthy_ping(url):
            assert proc.poll() is None, f"mlflow models serve exited:\n{log_path.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"not serving after 180 s:\n{log_path.read_text()[-3000:]}"
            time.sleep(0.5)
        procs = process_tree([proc.pid])
        for layout, records in stack_champion.layouts.items():
            status, body = _post(f"{url}/invocations", {"dataframe_records": records})
            assert status == 200, (layout, body)
            proba = [p["delay_probability"] for p in body["predictions"]]
            np.testing.assert_allclose(proba, stack_champion.expected, rtol=1e-5, err_msg=layout)
        bad = stack_champion.asa.head(3).astype({"CRSDepTime": object})
        bad.loc[1, "CRSDepTime"] = "25:61"
        status, body = _post(f"{url}/invocations", {"dataframe_records": _records(bad)})
        assert status == 400, body
        assert "column 'CRSDepTime': '25:61' at row 1 is not a number" in body["message"], body["message"][-500:]
    finally:
        left = stop_process_group(proc, procs or process_tree([proc.pid]))
    assert not left, f"mlflow models serve processes left after stop: {left}"


def _healthy_ping(url: str) -> bool:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"{url}/ping", timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False
