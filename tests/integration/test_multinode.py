"""Scale-out: the tune stage on a two-node Ray cluster (a head and a worker started with `ray start`).

Both nodes run on this machine, each offering one CPU, so two concurrent one-CPU trials must land
on different nodes. The tuning driver runs in a subprocess with RAY_ADDRESS set: this pytest
process may already hold the session's local Ray (``ray_local``), which must stay untouched.
Running this file as a module (``python -m tests.integration.test_multinode``) is that driver.

Only the two ``ray start --block`` processes this module starts are ever signalled (each leads its
own process group); ``ray stop`` would also stop other Ray instances on the machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.integration


# ---- the driver (runs in a child process) ----------------------------------------------------------


def _drive(out_file: str, source: str, local_store: str) -> None:
    """Run the data and tune stages twice on a small flights sample on S3, read by Ray tasks on the
    cluster: first with ``local_store`` as the storage root (expected to be refused), then with the root
    from the environment (S3). One process for both, since the imports and the connection to the
    cluster are most of the cost. The nodes hold no S3 keys: the tasks reading the source get them
    from the driver's ``runtime_env`` (their filesystem carries none)."""
    from infra.settings import get_settings
    from tasks import workloads
    from tuning_core.config import FlightsData, FlightsPipeline, Resources, TuneConfig
    from tuning_core.errors import TunepipeError

    cfg = FlightsPipeline(
        data=FlightsData(source=source, max_rows=3000, split="random", engine="ray"),
        tune=TuneConfig(num_samples=4, max_iterations=6, checkpoint_every=3, search="random", scheduler="fifo",
                        resources=Resources(cpu=1), seed=5),
    )
    # What the driver puts into Ray's object store (the data stage's filesystem, the trials' data): the
    # S3 secret must be in none of it.
    import ray
    from ray import cloudpickle

    secret, put_with_key, real_put = get_settings().aws_secret_access_key.get_secret_value().encode(), [], ray.put

    def recording_put(value, **kw):
        put_with_key.append(secret in cloudpickle.dumps(value))
        return real_put(value, **kw)

    ray.put = recording_put
    out: dict = {}
    for key, settings in (("local", get_settings().model_copy(update={"storage": local_store})),
                          ("s3", get_settings())):
        ctx = workloads.Context.build(settings)
        try:
            version = workloads.prepare(cfg, ctx)
            result = workloads.tune(cfg, ctx, version)
        except TunepipeError as err:
            out[key] = {"error": type(err).__name__, "message": str(err)}
        else:
            out[key] = {"engine": version.manifest["engine"], "rows": version.rows,
                        "puts": len(put_with_key), "puts_with_key": sum(put_with_key),
                        "experiment_uri": result.experiment_uri, "num_trials": result.num_trials,
                        "nodes": [t.node_id for t in result.trials],
                        "iterations": [t.iterations for t in result.trials]}
    Path(out_file).write_text(json.dumps(out))


# ---- the cluster -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cluster:
    address: str
    env: dict[str, str]  # what a driver needs to join it (address, token auth)
    logs: Path


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_started(proc: subprocess.Popen, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while "Ray runtime started" not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"ray start did not come up ({log}):\n{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.5)


def _stop(procs: list[subprocess.Popen]) -> None:
    """Stop each node: SIGTERM to its `ray start --block` leader alone (it drains the node and stops
    GCS, raylet and workers in order; signalling the whole group at once kills GCS first and the
    leader then waits ~30 s for it), then SIGKILL for whatever is left in its process group."""
    for proc in procs:  # the worker node first
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _leftovers(base: Path) -> list:
    """Live processes of this cluster: every Ray process names its session folder under ``base``."""
    import psutil

    found = []
    for proc in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            if any(str(base) in arg for arg in proc.info["cmdline"] or ()) and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
    return found


def _driver_log_tail(base: Path, lines: int = 30) -> str:
    """The end of the Ray core logs of the drivers that joined this cluster: when Ray's C++ side ends a
    driver (a lost connection) it says why only there, not on the driver's stderr."""
    logs = sorted(base.glob("r/session_*/logs/python-core-driver-*.log"), key=lambda p: p.stat().st_mtime)
    return "".join(f"\n--- {log.name}:\n" + "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
                   for log in logs[-2:])


def _still_running(procs: list, grace_s: float = 15) -> list:
    """Those of ``procs`` still running after ``grace_s``: a Ray worker may be in the middle of exiting
    when the nodes' stop returns (seen: one was a zombie by the time the failure was printed)."""
    import psutil

    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    running = []
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            if proc.status() != psutil.STATUS_ZOMBIE:
                running.append(proc)
    return running


@pytest.fixture(scope="module")
def two_nodes():
    # Ray's unix sockets live under --temp-dir and must stay under 107 characters: a short folder.
    base = Path(tempfile.mkdtemp(prefix="tp-mn-"))
    token = base / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    port = _free_port()
    # Ray 2.5x enables token auth for clusters started by `ray start`; a private token keeps this
    # cluster apart from ~/.ray/auth_token, which other clusters of this user share.
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    # No storage credentials on the nodes: trials get the storage filesystem from the driver.
    node_env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "AWS_", "TUNEPIPE_"))}
    node_env.update(auth, RAY_USAGE_STATS_ENABLED="0")
    ray = str(Path(sys.executable).parent / "ray")
    common = ["--block", "--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--disable-usage-stats",
              "--temp-dir", str(base / "r")]
    procs: list[subprocess.Popen] = []
    try:
        for role, argv in (("head", [ray, "start", "--head", "--port", str(port), "--include-dashboard", "false"]),
                           ("worker", [ray, "start", "--address", f"127.0.0.1:{port}"])):
            log = base / f"{role}.log"
            with open(log, "wb") as out:
                procs.insert(0, subprocess.Popen([*argv, *common], env=node_env, stdout=out,
                                                 stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                                 start_new_session=True, cwd=base))
            _wait_started(procs[0], log, timeout_s=180)
        address = f"127.0.0.1:{port}"
        yield Cluster(address=address, env={"RAY_ADDRESS": address, **auth}, logs=base)
    finally:
        _stop(procs)
        left = _still_running(_leftovers(base))
        for proc in left:
            proc.kill()
        shutil.rmtree(base, ignore_errors=True)
        assert not left, f"processes of the two-node cluster outlived its stop: {left}"


@pytest.fixture(scope="module")
def driver_run(two_nodes, seaweed_s3, tmp_path_factory) -> dict:
    """The tuning driver, run once against the two-node cluster (see ``_drive``)."""
    from tests.conftest import ASA_SAMPLE

    tmp = tmp_path_factory.mktemp("multinode")
    out = tmp / "driver.json"
    prefix = f"multinode-{uuid.uuid4().hex[:8]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "TUNEPIPE_", "MLFLOW_", "RAY_ADDRESS"))}
    env.update(seaweed_s3.env, **two_nodes.env, TUNEPIPE_STORAGE=f"s3://{seaweed_s3.bucket}/{prefix}",
               MLFLOW_TRACKING_URI=f"sqlite:///{tmp / 'mlflow.db'}", RAY_USAGE_STATS_ENABLED="0",
               GIT_PYTHON_REFRESH="quiet")
    # The source: the ASA sample in two S3 objects (data.engine ray reads them with a task each).
    from infra.storage import boto3_client

    lines = ASA_SAMPLE.read_text().splitlines(keepends=True)
    s3 = boto3_client(seaweed_s3.settings())
    for i, part in enumerate((lines[1:6000], lines[6000:])):
        s3.put_object(Bucket=seaweed_s3.bucket, Key=f"{prefix}/in/{i}.csv", Body="".join([lines[0], *part]).encode())
    source = f"s3://{seaweed_s3.bucket}/{prefix}/in"
    argv = [sys.executable, "-m", "tests.integration.test_multinode", str(out), source, str(tmp / "store")]
    proc = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=480)
    assert proc.returncode == 0 and out.exists(), proc.stdout[-2000:] + proc.stderr[-4000:]
    return {**json.loads(out.read_text()), "prefix": prefix, "store": tmp / "store"}


def _s3_keys(seaweed_s3, prefix: str) -> list[str]:
    from infra.storage import boto3_client

    s3 = boto3_client(seaweed_s3.settings())
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=seaweed_s3.bucket, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


# ---- tests -----------------------------------------------------------------------------------------


def test_trials_run_on_both_nodes_and_the_experiment_lives_on_s3(driver_run, seaweed_s3):
    out, prefix = driver_run["s3"], driver_run["prefix"]
    assert "error" not in out, out
    # The data stage read the S3 source with Ray tasks on the cluster, whose nodes hold no keys: the
    # tasks got them from the driver's runtime_env, and no object put into the object store carries them.
    assert out["engine"] == "ray" and sum(out["rows"].values()) == 3000, out
    assert out["puts"] >= 1 and out["puts_with_key"] == 0, out
    assert out["num_trials"] == 4 and out["iterations"] == [6, 6, 6, 6]
    assert all(out["nodes"]), out
    assert len(set(out["nodes"])) == 2, f"trials ran on {set(out['nodes'])}, expected both nodes"

    experiment = out["experiment_uri"].rsplit("/", 1)[-1]
    assert out["experiment_uri"] == f"s3://{seaweed_s3.bucket}/{prefix}/ray/{experiment}"
    keys = _s3_keys(seaweed_s3, f"{prefix}/ray/{experiment}/")
    assert sum(k.endswith("/result.json") for k in keys) == 4, keys
    # Every trial, those on the worker node included, checkpointed to S3: no disk is shared.
    assert len({k.split("/checkpoint_")[0] for k in keys if "/checkpoint_" in k}) == 4, keys


def test_local_folder_storage_on_a_multinode_cluster_is_refused(driver_run):
    out, store = driver_run["local"], driver_run["store"]
    assert out.get("error") == "ConfigError", out
    assert "shared storage" in out["message"] and str(store) in out["message"], out["message"]
    assert "2 nodes" in out["message"]
    assert not list(store.glob("ray/*")), "the experiment started despite the refusal"


# ---- data-parallel trials across the two nodes (issue 18, part 4) ----------------------------------


def _whole_table_growth_mb(version_dir: str, s3_env: dict[str, str]) -> float:
    """What holding the whole training split costs one process: the memory a fresh process gains
    reading it and building its training matrix (MiB). Measured the way the workers measure theirs."""
    code = (
        "import resource, sys, xgboost, pyarrow.parquet, pandas\n"
        "from infra.settings import get_settings\n"
        "from infra.storage import build_storage\n"
        "from tuning_core.data.flights import load_split\n"
        "from tuning_core.trainables.xgboost import quantile_matrix, split_xy, xgb_params\n"
        "def rss():\n"
        "    return int(open('/proc/self/statm').read().split()[1]) * 4096 / 2**20\n"
        "before = rss()\n"
        "fs = build_storage(get_settings()).fs\n"
        "x, y = split_xy(load_split(fs, sys.argv[1], 'train'))\n"
        "m = quantile_matrix(x, y, xgb_params({}))\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before)\n")
    done = subprocess.run([sys.executable, "-c", code, version_dir], env={**os.environ, **s3_env}, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return float(done.stdout.strip().splitlines()[-1])


def test_data_parallel_pipeline_spreads_each_trial_over_both_nodes_each_worker_holding_its_shard(
        two_nodes, seaweed_s3, tmp_path, flights_years):
    """`tunepipe run flights` with ``workers_per_trial: 2`` on the two-node cluster (one CPU each), S3 on
    the stack's server: every trial is one Ray Train run with a worker on each node, each reading only its
    half of the training split; the retrain runs on the same workers; the registered model loads and
    predicts in a fresh process. Each worker's memory grows by about its shard, not the whole table."""
    import pyarrow.fs as pafs

    from benchmarks.scale import link_files
    from infra.storage import s3_filesystem

    data = link_files(flights_years[:3], tmp_path / "data")  # 1.0M flights in 3 files
    prefix = f"dp-{uuid.uuid4().hex[:8]}"
    config = tmp_path / "dp.yaml"
    config.write_text(json.dumps({
        "tune": {"num_samples": 2, "max_iterations": 12, "checkpoint_every": 6, "search": "random",
                 "scheduler": "asha", "resources": {"workers_per_trial": 2, "cpu_per_worker": 1}},
        "registry": {"model_name": "dp-two-nodes"}}))
    summary_file = tmp_path / "summary.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "TUNEPIPE_", "MLFLOW_", "RAY_ADDRESS"))}
    env.update(seaweed_s3.env, **two_nodes.env, TUNEPIPE_STORAGE=f"s3://{seaweed_s3.bucket}/{prefix}",
               MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}", PREFECT_HOME=str(tmp_path / "prefect"),
               RAY_USAGE_STATS_ENABLED="0", GIT_PYTHON_REFRESH="quiet")
    tunepipe = Path(sys.executable).with_name("tunepipe")
    run = subprocess.run([str(tunepipe), "run", "flights", "--data", data, "--config", str(config),
                          "--summary-json", str(summary_file)], env=env, cwd=tmp_path, capture_output=True,
                         text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert run.returncode == 0, run.stderr[-4000:] + _driver_log_tail(two_nodes.logs)
    summary = json.loads(summary_file.read_text())
    assert summary["tuning"]["num_trials"] == 2 and summary["registry"]["version"] == "1"

    # Every report of every trial came from both workers, one per node, each holding about half the rows.
    fs = s3_filesystem(seaweed_s3.settings())
    manifest = json.loads(fs.open_input_file(
        summary["data"]["uri"].removeprefix("s3://") + "/manifest.json").read().decode())
    train_rows = manifest["rows"]["train"]
    experiment = summary["tuning"]["experiment_uri"].removeprefix("s3://")
    results = [fs.open_input_file(f.path).read().decode()
               for f in fs.get_file_info(pafs.FileSelector(experiment, recursive=True))
               if f.path.endswith("/result.json") and "/train/" not in f.path]
    assert len(results) == 2
    reports = [json.loads(line) for text in results for line in text.splitlines() if line.strip()]
    assert reports and all(len(r["workers"]) == 2 for r in reports)
    for report in reports:
        workers = sorted(report["workers"], key=lambda w: w["rank"])
        assert [w["rank"] for w in workers] == [0, 1]
        assert len({w["node_id"] for w in workers}) == 2, workers  # one worker on each node
        assert sum(w["train_rows"] for w in workers) == train_rows
        assert all(abs(w["train_rows"] - train_rows / 2) <= 1 for w in workers), (workers, train_rows)

    # Memory: each worker gained about its shard's worth (reading it, typing it, its matrix), well under
    # what one process gains holding the whole split. Loose on purpose (allocator and Ray Data buffers).
    whole = _whole_table_growth_mb(summary["data"]["uri"], seaweed_s3.env)
    grown = [w["peak_rss_mb"] - w["rss_before_data_mb"] for r in reports for w in r["workers"]]
    assert whole > 40, whole  # the table is big enough for the comparison to mean something
    assert max(grown) < 0.8 * whole, (grown, whole)

    # A registry consumer in a fresh process: the champion loads from S3 and predicts raw rows.
    code = ("import mlflow, pandas as pd, sys\n"
            "m = mlflow.pyfunc.load_model('models:/dp-two-nodes@champion')\n"
            "rows = pd.read_csv(sys.argv[1], nrows=5)\n"
            "print(len(m.predict(rows)))\n")
    first_file = sorted(Path(data).iterdir())[0]
    consumer = {k: v for k, v in env.items() if not k.startswith("RAY_")}
    done = subprocess.run([sys.executable, "-c", code, str(first_file)], env=consumer, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().splitlines()[-1] == "5", done.stderr[-3000:]


if __name__ == "__main__":
    _drive(*sys.argv[1:4])
