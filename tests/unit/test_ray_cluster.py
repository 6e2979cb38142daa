"""The embedded default's local Ray: its own cluster whatever /tmp/ray says, started ahead of the
tune stage and owned by it."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

_CHILD = textwrap.dedent("""
    import ray
    from infra.ray_cluster import ray_session, start_in_background, wait_for_shutdown
    from infra.settings import Settings
    from infra.storage import build_storage

    settings = Settings(storage=STORAGE, ray_num_cpus=1)
    storage = build_storage(settings)
    if AHEAD:
        start_in_background(settings)
    with ray_session(settings, storage) as where:
        assert ray.cluster_resources().get("CPU") == 1.0, ray.cluster_resources()
        print("session", where, ray.get(ray.remote(lambda: 41 + 1).remote()))
        raylet = ray._private.worker._global_node.all_processes["raylet"][0].process
        # No log monitor (worker output stays in the session's files) and no autoscaler monitor (a
        # fixed local node): two Python processes fewer competing for the cores while the run starts.
        import psutil
        cmdlines = [" ".join(p.cmdline()) for p in psutil.Process().children(recursive=True)]
        print("monitors", [c for c in cmdlines if "log_monitor.py" in c or "autoscaler/_private/monitor.py" in c])
        assert any("raylet" in c for c in cmdlines), cmdlines
    # The driver has left Ray when the session ends, in this thread (a core worker shut down beside
    # other work ends the process silently); only the node's processes stop in the background.
    assert not ray.is_initialized() and not hasattr(ray._private.worker.global_worker, "core_worker")
    wait_for_shutdown()
    assert raylet.poll() is not None, "the session started this Ray: it must stop its processes"
    # A stage that succeeded leaves no session folder behind; one that failed keeps its logs.
    import glob, os
    sessions = lambda: sorted(p for p in glob.glob(os.environ["RAY_TMPDIR"] + "/ray/session_*") if "latest" not in p)
    print("left after success", sessions())
    try:
        with ray_session(settings, storage):
            raise KeyError("the stage failed")
    except KeyError:
        pass
    wait_for_shutdown()
    print("left after failure", len(sessions()))
""")


def run_with_own_ray_tmp(code: str, env: dict[str, str] | None = None, drop: tuple[str, ...] = (),
                         stale_cluster_file: bool = False) -> subprocess.CompletedProcess:
    """``python -c code`` in a fresh process with a short temp dir of Ray's own (socket paths are limited
    to ~107 characters), no RAY_ADDRESS (nor the names in ``drop``) and ``env`` on top. With
    ``stale_cluster_file`` that dir holds the file a SIGKILLed cluster leaves behind: its address, where
    nothing listens any more."""
    ray_tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    if stale_cluster_file:
        Path(ray_tmp, "ray").mkdir()
        Path(ray_tmp, "ray", "ray_current_cluster").write_text("127.0.0.1:1")
    full = {**{k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", *drop)}, "RAY_TMPDIR": ray_tmp,
            "RAY_USAGE_STATS_ENABLED": "0", **(env or {})}
    try:
        return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=full, capture_output=True, text=True,
                              timeout=180)
    finally:
        subprocess.run(["rm", "-rf", ray_tmp], check=False)


def _run_child(tmp_path: Path, ahead: bool) -> subprocess.CompletedProcess:
    code = _CHILD.replace("STORAGE", repr(str(tmp_path / "store"))).replace("AHEAD", repr(ahead))
    return run_with_own_ray_tmp(code, stale_cluster_file=True)


def test_embedded_default_starts_its_own_ray_despite_a_stale_cluster_file(tmp_path):
    done = _run_child(tmp_path, ahead=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "session local 42" in done.stdout
    assert "monitors []" in done.stdout
    # The finished session's folder is gone from /tmp/ray; the failed one's logs are kept.
    assert "left after success []" in done.stdout and "left after failure 1" in done.stdout


def test_ray_started_ahead_is_adopted_and_shut_down_by_the_session(tmp_path):
    done = _run_child(tmp_path, ahead=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "session local 42" in done.stdout
    assert "not the main thread" not in done.stderr


def test_a_ray_address_where_nothing_listens_is_one_line_before_anything_starts():
    """ray.init on such an address waits for minutes; the preflight says so at once."""
    import socket

    import pytest

    from infra.ray_cluster import check_local_resources
    from infra.settings import Settings
    from tuning_core.errors import ServiceUnavailable

    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        address = f"127.0.0.1:{listening.getsockname()[1]}"
        check_local_resources(Settings(ray_address=address), cpu=64, gpu=0)  # answers; its nodes are Ray's to check
        check_local_resources(Settings(ray_address="auto"), cpu=1, gpu=0)  # not a host:port: left to Ray
    for given in (address, f"ray://{address}"):
        with pytest.raises(ServiceUnavailable) as err:
            check_local_resources(Settings(ray_address=given), cpu=1, gpu=0)
        assert str(err.value) == (f"RAY_ADDRESS {given}: no Ray cluster answers there (Connection refused); start it, "
                                  "or unset RAY_ADDRESS to tune on a local Ray")


def test_the_local_start_drops_rays_token_auth_enabled_note_but_not_its_auth_off_warning():
    """Ray printed "Token authentication is enabled for this Ray cluster..." as the first line of every run."""
    import logging

    from ray._private.authentication import authentication_token_setup as auth

    from infra.ray_cluster import _quiet_local_start

    class Kept(logging.Handler):  # on Ray's logger itself: whether it propagates depends on who set Ray up
        def __init__(self) -> None:
            super().__init__(logging.WARNING)
            self.messages: list[str] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.messages.append(record.getMessage()[:40])

    _quiet_local_start()
    _quiet_local_start()  # once is enough: no second filter
    kept, level = Kept(), auth.logger.level
    auth.logger.addHandler(kept)
    auth.logger.setLevel(logging.WARNING)
    try:
        auth._warn_token_auth_enabled()
        auth._warn_token_auth_disabled()
    finally:
        auth.logger.removeHandler(kept)
        auth.logger.setLevel(level)
    assert kept.messages == ["Token authentication is disabled for thi"]
    assert len(auth.logger.filters) == len({type(f) for f in auth.logger.filters})


_TRIALS_CHILD = textwrap.dedent("""
    import os, sys, time
    import psutil, ray
    from ray import tune
    from infra.ray_cluster import ray_session, start_in_background
    from infra.settings import Settings
    from infra.storage import build_storage

    settings = Settings(storage=STORAGE, ray_num_cpus=2)
    start_in_background(settings, preload=("tuning_core.trainables.xgboost_preload",))

    def trial(config):
        tune.report({"created": psutil.Process().create_time(), "preloaded": "xgboost" in sys.modules,
                     "env": os.environ.get("AWS_REQUEST_CHECKSUM_CALCULATION"),
                     "runtime_env_vars": sorted(ray.get_runtime_context().runtime_env.get("env_vars") or {})})

    with ray_session(settings, build_storage(settings)):
        time.sleep(2)  # the pre-started workers finish their imports (a run spends this in its other stages)
        # Trials reserve the CPUs before their actors ask for a worker; Ray's reaper kills idle workers beyond
        # the free CPUs once they have idled its threshold (1 s by default): hold the CPUs past it first.
        pg = ray.util.placement_group([{"CPU": 2}])
        ray.get(pg.ready())
        time.sleep(3)
        ray.util.remove_placement_group(pg)
        fit_started = time.time()
        grid = tune.Tuner(trial, param_space={"x": tune.grid_search([1, 2])},
                          tune_config=tune.TuneConfig(reuse_actors=True),
                          run_config=tune.RunConfig(storage_path=STORAGE + "/ray", verbose=0)).fit()
        for r in grid:
            m = r.metrics
            print("trial", m["preloaded"], m["env"], m["runtime_env_vars"], m["created"] < fit_started)
""")


def test_trial_actors_can_take_the_prestarted_workers_with_the_trainables_imports_done(tmp_path):
    """Ray Tune gives each trial actor a runtime_env of its own, so on our local Ray every trial actor was
    a new Python process importing Ray and xgboost after the trials were due (~2.5 s of a 6-s tune stage).
    Now they carry none, as the workers Ray starts with the node, which have imported the workload's
    modules while the driver was busy elsewhere; the S3 settings still reach them (inherited, not through
    a runtime_env). And Ray keeps those workers while the trials' reservations hold every CPU: its reaper
    killed them a second after the CPUs were reserved, then started new ones for the trial actors."""
    done = run_with_own_ray_tmp(_TRIALS_CHILD.replace("STORAGE", repr(str(tmp_path / "store"))),
                                drop=("AWS_REQUEST_CHECKSUM_CALCULATION",))
    assert done.returncode == 0, done.stderr[-3000:]
    trials = [line for line in done.stdout.splitlines() if line.startswith("trial")]
    assert trials == ["trial True when_required [] True"] * 2, done.stdout


def test_tune_keeps_its_own_actor_runtime_env_on_a_ray_that_is_not_ours(monkeypatch):
    """Only where the workers inherit this process's environment (our local Ray) is Tune's env dropped."""
    from ray.tune.execution.class_cache import _ActorClassCache

    from infra import ray_cluster

    ray_cluster._trial_actors_on_prestarted_workers()

    class Trainable:
        pass

    def env_of(cls: type) -> dict:
        return (_ActorClassCache().get(cls)._default_options.get("runtime_env") or {}).get("env_vars") or {}

    monkeypatch.setattr(ray_cluster, "_LOCAL_ENV", {})  # joined a cluster, or a Ray the caller started
    assert env_of(type("A", (Trainable,), {}))["PL_DISABLE_FORK"] == "1"
    monkeypatch.setattr(ray_cluster, "_LOCAL_ENV", {**os.environ, "PL_DISABLE_FORK": "1"})
    assert env_of(type("B", (Trainable,), {})) == {}
    # A key the driver holds now but our Ray's workers did not inherit: Tune passes it on itself.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIA-NOT-INHERITED")
    assert env_of(type("C", (Trainable,), {}))["AWS_ACCESS_KEY_ID"] == "AKIA-NOT-INHERITED"


_FAILED_CHECKS_CHILD = textwrap.dedent("""
    import glob, os
    import ray
    from infra.ray_cluster import stop_started_ahead
    from infra.settings import get_settings
    from tasks import workloads
    from tuning_core.workloads.flights import FlightsPipeline

    cfg = FlightsPipeline.model_validate({"tune": {"num_samples": 1, "max_iterations": 1}})
    try:
        workloads.preflight(cfg, workloads.Context.build(get_settings()), warm=True)
    except Exception as err:
        print("failed:", type(err).__name__)
        stop_started_ahead()
    sessions = [p for p in glob.glob(os.environ["RAY_TMPDIR"] + "/ray/session_*") if "latest" not in p]
    print("ray", ray.is_initialized(), "sessions", sessions)
""")


def test_checks_that_fail_after_the_local_ray_started_leave_no_ray_behind(tmp_path):
    """The CLI starts the local Ray once config, space and data have passed, while MLflow's check runs:
    an unreachable tracking server then stops it again, processes and session folder both."""
    from tests.conftest import free_port

    done = run_with_own_ray_tmp(_FAILED_CHECKS_CHILD, env={
        "TUNEPIPE_STORAGE": str(tmp_path / "store"), "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}",
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "failed: ServiceUnavailable" in done.stdout and "ray False sessions []" in done.stdout, done.stdout
