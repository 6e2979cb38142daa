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
    """Run the tune stage twice on a small flights sample: first with ``local_store`` as the storage
    root (expected to be refused), then with the root from the environment (S3). One process for
    both, since the imports and the connection to the cluster are most of the cost."""
    from infra.settings import get_settings
    from tasks import workloads
    from tuning_core.config import FlightsData, FlightsPipeline, Resources, TuneConfig
    from tuning_core.errors import TunepipeError

    cfg = FlightsPipeline(
        data=FlightsData(source=source, max_rows=3000, split="random"),
        tune=TuneConfig(num_samples=4, max_iterations=6, checkpoint_every=3, search="random", scheduler="fifo",
                        resources=Resources(cpu=1), seed=5),
    )
    out = {}
    for key, settings in (("local", get_settings().model_copy(update={"storage": local_store})),
                          ("s3", get_settings())):
        ctx = workloads.Context.build(settings)
        version = workloads.prepare(cfg, ctx)
        try:
            result = workloads.tune(cfg, ctx, version)
        except TunepipeError as err:
            out[key] = {"error": type(err).__name__, "message": str(err)}
        else:
            out[key] = {"experiment_uri": result.experiment_uri, "num_trials": result.num_trials,
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
            proc.wait(timeout=30)
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
        left = _leftovers(base)
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
    argv = [sys.executable, "-m", "tests.integration.test_multinode", str(out), str(ASA_SAMPLE), str(tmp / "store")]
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


if __name__ == "__main__":
    _drive(*sys.argv[1:4])
