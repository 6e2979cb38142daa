"""A local Ray that dies under a session's Tune run (its raylet SIGKILLed, as the OOM killer does) fails the
session with one retryable line within seconds, and the next session starts a fresh local Ray."""

from __future__ import annotations

import textwrap

from tests.unit.test_ray_cluster import run_with_own_ray_tmp

_CHILD = textwrap.dedent("""
    import os, signal, threading, time
    import ray
    from ray import tune
    from infra.ray_cluster import ray_session
    from infra.settings import Settings
    from infra.storage import build_storage
    from tuning_core.errors import ServiceUnavailable

    settings = Settings(storage=STORAGE, ray_num_cpus=1)
    storage = build_storage(settings)

    def trainable(config):
        for i in range(600):  # ~2 minutes of work: the watchdog must end it long before
            time.sleep(0.2)
            tune.report({"i": i})

    try:
        with ray_session(settings, storage):
            raylet = ray._private.worker._global_node.all_processes["raylet"][0].process
            threading.Timer(3, os.kill, (raylet.pid, signal.SIGKILL)).start()
            started = time.monotonic()
            tune.Tuner(trainable, run_config=tune.RunConfig(storage_path=STORAGE, verbose=0)).fit()
        print("not interrupted")
    except ServiceUnavailable as err:
        print(f"retryable={err.retryable} after {time.monotonic() - started:.1f}s: {err}")
    with ray_session(settings, storage) as where:
        print("fresh", where, ray.get(ray.remote(lambda: 42).remote()))
""")


def test_local_ray_node_killed_under_a_session_fails_it_retryably_and_a_fresh_one_starts(tmp_path):
    done = run_with_own_ray_tmp(_CHILD.replace("STORAGE", repr(str(tmp_path / "store"))))

    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    (lost,) = [line for line in lines if line.startswith("retryable=")]
    assert lost.startswith("retryable=True"), done.stdout
    assert "the local Ray node died during tuning (its raylet killed by SIGKILL" in lost
    assert float(lost.split(" after ")[1].split("s:")[0]) < 10  # detected at once, not after Ray's own timeouts
    assert "fresh local 42" in lines


def test_joined_cluster_whose_gcs_refuses_connections_ends_the_block_with_one_unretryable_line():
    """The probe of a joined cluster: a GCS port that answers is fine; one that refuses connections
    for the grace period is a lost cluster, named by the address the user gave (RAY_ADDRESS)."""
    import socket
    import time

    import pytest

    from infra.ray_watchdog import watch_joined_cluster
    from tuning_core.errors import ClusterLost

    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        up = f"127.0.0.1:{listening.getsockname()[1]}"
        with watch_joined_cluster(up, "head:6379", interval_s=0.1, grace_s=0.3):
            time.sleep(1)  # answers throughout: nothing happens
    with pytest.raises(ClusterLost) as lost:  # the port is closed now
        with watch_joined_cluster(up, "head:6379", interval_s=0.1, grace_s=0.3):
            time.sleep(1.5)
    assert not lost.value.retryable and lost.value.exit_code == 2
    assert str(lost.value).startswith("the Ray cluster at head:6379 (RAY_ADDRESS) went away during tuning (its head "
                                      f"(GCS at {up}) has refused connections for 0.3 s")
