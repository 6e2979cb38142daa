"""Faults of a Ray cluster that a run joined through RAY_ADDRESS (one we did not start; issue 16, part 3).

* the cluster's only node dies mid-tune: the run stops with one clear line and exit code 2 within
  seconds instead of Ray ending it silently after 60 s (``infra.ray_watchdog``: a cluster we joined
  is not restarted by us); a run started while it is still down stops at once with one line;
* on the two-node cluster, the worker node is killed mid-tune: its trial is restored on the head
  node from its last checkpoint and the run finishes, every trial once.

Both nodes run on this machine (``ray start --block``, one CPU each, a private auth token), started
per test because each test kills one; only their own process groups are ever signalled.
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
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.integration.test_concurrent_runs import Run, mlflow_trial_runs, wait_for
from tests.integration.test_concurrent_runs import shared as shared  # the fixture
from tests.integration.test_faults_tuning import _iterations, _trial_states
from tests.integration.test_multinode import _free_port, _leftovers, _still_running, _stop, _wait_started

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@contextlib.contextmanager
def ray_cluster(workers: int) -> Iterator[tuple[dict[str, str], list[subprocess.Popen]]]:
    """A head and ``workers`` worker nodes (one CPU each); yields the driver's env and the nodes'
    `ray start --block` leaders, head first. Stopped (and checked for leftovers) at the end."""
    base = Path(tempfile.mkdtemp(prefix="tp-fc-"))  # short: Ray's unix sockets live under it
    token = base / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    port = _free_port()
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    node_env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "AWS_", "TUNEPIPE_"))}
    node_env.update(auth, RAY_USAGE_STATS_ENABLED="0")
    ray = str(Path(sys.executable).parent / "ray")
    common = ["--block", "--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--disable-usage-stats",
              "--temp-dir", str(base / "r")]
    nodes: list[subprocess.Popen] = []
    try:
        roles = [("head", [ray, "start", "--head", "--port", str(port), "--include-dashboard", "false"])]
        roles += [(f"worker{i}", [ray, "start", "--address", f"127.0.0.1:{port}"]) for i in range(workers)]
        for role, argv in roles:
            log = base / f"{role}.log"
            with open(log, "wb") as out:
                nodes.append(subprocess.Popen([*argv, *common], env=node_env, stdout=out, stderr=subprocess.STDOUT,
                                              stdin=subprocess.DEVNULL, start_new_session=True, cwd=base))
            _wait_started(nodes[-1], log, timeout_s=180)
        yield {"RAY_ADDRESS": f"127.0.0.1:{port}", **auth}, nodes
    finally:
        _stop(list(reversed(nodes)))
        left = _still_running(_leftovers(base))
        for proc in left:
            proc.kill()
        shutil.rmtree(base, ignore_errors=True)
        assert not left, f"processes of the cluster outlived its stop: {left}"


def _kill_node(leader: subprocess.Popen) -> None:
    """The node dies at once, as a machine does: every process of its group SIGKILLed."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(leader.pid, signal.SIGKILL)
    leader.wait()


def test_joined_cluster_dying_mid_tune_fails_with_one_line_and_does_not_hang(shared):
    tmp, env = shared
    store = tmp / "store"
    with ray_cluster(workers=0) as (cluster_env, (head,)):
        run = Run(tmp, env, "cluster-lost", "--num-samples", "2", "--max-iterations", "400", "--scheduler", "fifo",
                  "--max-concurrent", "1", TUNEPIPE_RETRY_DELAY_S="1", **cluster_env)
        try:
            wait_for("a trial checkpoint", lambda: any(store.glob("ray/*/trial_*/checkpoint_*")), run)
            _kill_node(head)
            killed = time.monotonic()
            code = run.wait(180)
            took = time.monotonic() - killed
        finally:
            run.kill()
    assert code == 2, run.stderr()[-4000:]
    assert took < 40, f"{took:.0f} s after the kill (Ray alone ends the driver after 60 s, with no error line)"
    errors = [ln for ln in run.stderr().splitlines() if ln.startswith(("error: ", "internal error"))]
    assert len(errors) == 1, run.stderr()[-4000:]
    assert errors[0].startswith("error: ") and "Ray cluster at 127.0.0.1:" in errors[0], errors
    assert not run.summary.exists()
    # The process ended while blocked on the dead cluster: nothing it started is left (Prefect's local API
    # stops on the SIGTERM its parent's death sends it).
    deadline = time.monotonic() + 10
    while (left := [p for p in psutil.process_iter() if _session(p) == run.proc.pid]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert left == [], [p.cmdline() for p in left]

    # Run again while the cluster is still down: one line at once, not minutes in ray.init.
    again = Run(tmp, env, "cluster-still-down", TUNEPIPE_RETRY_DELAY_S="1", **cluster_env)
    assert again.wait(60) == 2
    assert again.error_lines() == [f"error: RAY_ADDRESS {cluster_env['RAY_ADDRESS']}: no Ray cluster answers there "
                                   "(Connection refused); start it, or unset RAY_ADDRESS to tune on a local Ray"]


def _trials_running_on(node: subprocess.Popen) -> list[str]:
    """The trial folders of the trials running on a node: Ray Tune runs each trial in its folder's name."""
    out = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if _session(proc) == node.pid and "ImplicitFunc" in " ".join(proc.cmdline()[:1]):
                out.append(Path(proc.cwd()).name)
    return sorted(n for n in out if n.startswith("trial_"))


def _session(proc: psutil.Process) -> int | None:
    try:
        return os.getsid(proc.pid)
    except OSError:
        return None


def test_worker_node_killed_mid_tune_its_trial_resumes_on_the_head(shared, seaweed_s3):
    """Two trials at once, one per node (one CPU each); the worker node dies after both checkpointed.
    Ray Tune restores the lost trial from its checkpoint on S3 once the head has a free CPU."""
    import uuid

    from infra.storage import boto3_client

    tmp, env = shared
    prefix = f"worker-lost-{uuid.uuid4().hex[:8]}"
    s3 = boto3_client(seaweed_s3.settings())

    def checkpointed() -> set[str]:
        pages = s3.get_paginator("list_objects_v2").paginate(Bucket=seaweed_s3.bucket, Prefix=f"{prefix}/ray/")
        keys = [o["Key"] for page in pages for o in page.get("Contents", [])]
        return {k.split("/checkpoint_")[0] for k in keys if "/checkpoint_" in k}

    with ray_cluster(workers=1) as (cluster_env, (_, worker)):
        run = Run(tmp, {**env, **seaweed_s3.env}, "worker-lost", "--num-samples", "2", "--max-iterations", "300",
                  "--scheduler", "fifo", "--max-concurrent", "2", TUNEPIPE_STORAGE=f"s3://{seaweed_s3.bucket}/{prefix}",
                  TUNEPIPE_RETRY_DELAY_S="1", **cluster_env)
        try:
            # Kill the worker while its own trial runs, right after that trial's first checkpoint reached S3
            # (waiting for both trials' checkpoints instead raced: the worker's trial could finish first).
            on_worker: list[str] = []

            def worker_trial_checkpointed() -> bool:
                on_worker[:] = on_worker or _trials_running_on(worker)
                return bool(on_worker) and any(d.endswith("/" + on_worker[0]) for d in checkpointed())

            wait_for("a checkpoint of the worker node's trial", worker_trial_checkpointed, run)
            assert _trials_running_on(worker) == on_worker  # still running when the node dies
            _kill_node(worker)
            code = run.wait(300)
        finally:
            run.kill()

    assert code == 0, run.stderr()[-4000:]
    summary = json.loads(run.summary.read_text())
    assert summary["tuning"]["num_trials"] == 2 and summary["tuning"]["resumed"] is False  # no stage retry
    assert summary["registry"]["version"] == "1"
    local = tmp / "exp"  # the experiment, copied from S3 to read its state and results
    s3_root = f"{seaweed_s3.bucket}/{prefix}/ray/{summary['tuning']['experiment_uri'].rsplit('/', 1)[-1]}"
    import pyarrow.fs as pafs

    from infra.storage import s3_filesystem

    pafs.copy_files(s3_root, str(local), source_filesystem=s3_filesystem(seaweed_s3.settings()),
                    destination_filesystem=pafs.LocalFileSystem())
    states = _trial_states(local)
    assert all(t["status"] == "TERMINATED" for t in states.values()), states
    (lost,) = [trial_id for trial_id, t in states.items() if t["num_failures"] >= 1]
    assert on_worker == [f"trial_{lost}"], (on_worker, states)
    # Restored from its checkpoint, not started again: its first report (round 10) is there once.
    seen = _iterations(local / f"trial_{lost}")
    assert seen.count(10) == 1 and seen[-1] == 300, seen
    assert sorted(set(mlflow_trial_runs(tmp))) == sorted(states)
