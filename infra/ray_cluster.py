"""Ray connection: join an existing cluster (RAY_ADDRESS) or start a local one.

We only ever shut down a Ray instance that we started ourselves.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from infra.ray_watchdog import watch_joined_cluster, watch_local_node
from infra.settings import Settings
from infra.storage import Storage
from tuning_core.errors import ConfigError

log = logging.getLogger(__name__)

# Quiet Ray's console: the pipeline reports progress itself (logs, Prefect artifacts).
_RAY_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AIR_NEW_OUTPUT": "0",
    "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0",
    "RAY_DEDUP_LOGS": "0",
}


def _storage_env(settings: Settings) -> dict[str, str]:
    """Env the Ray workers need to reach the same S3 endpoint (trials write checkpoints there)."""
    env = {"AWS_REQUEST_CHECKSUM_CALCULATION": "when_required", "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required"}
    if settings.s3_endpoint_url:
        env["AWS_ENDPOINT_URL_S3"] = settings.s3_endpoint_url
    # The filesystem Ray pickles into the experiment state carries no keys (infra.storage), so the
    # workers read them from their environment. Held by Ray's GCS for this job, never written to storage.
    if settings.aws_access_key_id and settings.aws_secret_access_key:
        env["AWS_ACCESS_KEY_ID"] = settings.aws_access_key_id.get_secret_value()
        env["AWS_SECRET_ACCESS_KEY"] = settings.aws_secret_access_key.get_secret_value()
    env["AWS_DEFAULT_REGION"] = settings.aws_region
    return env


def check_local_resources(settings: Settings, cpu: float, gpu: float) -> None:
    """Before anything is written: a local Ray (no RAY_ADDRESS) must be able to hold one trial.

    The local Ray gets ``TUNEPIPE_RAY_NUM_CPUS`` or all CPUs, and the GPUs CUDA shows (Ray honours
    CUDA_VISIBLE_DEVICES too). A remote cluster must answer at its address (``check_cluster_answers``);
    its nodes are checked when the tuning stage connects to it (``tuning_core.runner``), since they are
    only known then.
    """
    if settings.ray_address:
        check_cluster_answers(settings.ray_address)
        return
    cpus = settings.ray_num_cpus or os.cpu_count() or 1
    gpus = _visible_gpus() if gpu > 0 else 0
    if cpu > cpus or gpu > gpus:
        raise ConfigError(f"tune.resources: one trial needs cpu={cpu:g}, gpu={gpu:g}, but the local Ray gets "
                          f"{cpus} CPU, {gpus} GPU; expected at most that per trial (or set RAY_ADDRESS to a "
                          "cluster with such nodes)")


def check_cluster_answers(address: str, timeout_s: float = 5.0) -> None:
    """A ``host:port`` RAY_ADDRESS must accept a connection (``tuning_core.ray_address.check_answers``)."""
    from tuning_core.ray_address import check_answers

    check_answers(address, "unset RAY_ADDRESS to tune on a local Ray", timeout_s)


def _visible_gpus() -> int:
    """CUDA devices this process can use (0 without torch or CUDA); torch is only imported when a GPU is asked for."""
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        return 0
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _local_init_args(settings: Settings, num_cpus: int | None = None,
                     preload: tuple[str, ...] = ()) -> dict[str, Any]:
    """``ray.init`` arguments of the embedded default's local Ray.

    ``address="local"`` always starts a Ray of our own: a plain ``ray.init()`` would try to join
    whatever cluster ``/tmp/ray/ray_current_cluster`` names, and a file left there by a dead
    cluster made it fail ("When connecting to an existing cluster, num_cpus and num_gpus must
    not be provided").

    No ``runtime_env``: the workers inherit the environment instead (``_init_local``), because Ray
    hands a task or actor only a worker started with the same runtime env, and those it pre-starts
    with the node have none. ``preload``: modules every Python worker imports when it starts, before
    it takes work (Ray's ``preload_python_modules``): the pre-started workers import the trainable's
    libraries while the driver runs preflight and data preparation, not once the trials are due.
    """
    # No timeline events (``enable_timeline``): with no dashboard and a Ray that ends with the stage, no
    # one can read them, and the driver's core worker waited ~0.25 s at each shutdown to send them.
    # Idle workers kept for a minute (``idle_worker_killing_time_threshold_ms``, 1 s by default): Ray's
    # reaper keeps no more idle workers than free CPUs, and the trials reserve every CPU (placement
    # groups) a moment before their actors ask for a worker; it killed the pre-started workers, their
    # imports done, in between, and started new ones that imported it all again (2-4 s of the tune stage).
    system: dict[str, Any] = {"enable_timeline": False, "idle_worker_killing_time_threshold_ms": 60_000}
    if preload:
        system["preload_python_modules"] = list(preload)
    return dict(address="local", num_cpus=num_cpus or settings.ray_num_cpus or os.cpu_count(),
                include_dashboard=False, log_to_driver=False, configure_logging=False, _system_config=system)


# Ray Tune gives every trial actor a runtime_env of its own (``ray.tune.execution.class_cache``:
# env_vars PL_DISABLE_FORK=1, plus the AWS keys and Train settings found in the driver's environment),
# so Ray never hands a trial one of the workers it pre-started: each trial actor was a new Python
# process importing Ray, pandas and xgboost from scratch after the trials were due (~2.5 s of a 6-s
# tune stage on 2 cores, measured in benchmarks/peer.py). On our local Ray the workers inherit the
# driver's environment, Tune's defaults included, so its env_vars change nothing there.
_TUNE_ACTOR_ENV = {"PL_DISABLE_FORK": "1"}
# The environment the running local Ray of ours was started with (its workers inherit it); empty otherwise.
_LOCAL_ENV: dict[str, str] = {}


@contextlib.contextmanager
def _environ(extra: dict[str, str]) -> Iterator[None]:
    """``os.environ`` with ``extra`` for the duration (the local Ray's processes inherit it at start).
    A variable another thread has set meanwhile (this runs beside the CLI's checks) keeps that value."""
    saved = {k: os.environ.get(k) for k in extra}
    os.environ.update(extra)
    try:
        yield
    finally:
        for k, v in saved.items():
            if os.environ.get(k) != extra[k]:
                continue
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _init_local(settings: Settings, num_cpus: int | None = None, preload: tuple[str, ...] = ()) -> None:
    """Start the embedded default's local Ray: the S3 settings and Tune's actor env reach every worker
    through the environment its raylet inherits (held by the local processes, never written anywhere)."""
    import ray

    with _environ({**_TUNE_ACTOR_ENV, **_storage_env(settings)}), _without_monitor_processes():
        ray.init(**_local_init_args(settings, num_cpus, preload))
        _LOCAL_ENV.clear()
        _LOCAL_ENV.update(os.environ)
    _trial_actors_on_prestarted_workers()


@contextlib.contextmanager
def _without_monitor_processes() -> Iterator[None]:
    """The head node ``ray.init`` starts here, without its log monitor and autoscaler monitor.

    Both are Python processes that import Ray and then poll (~2 CPU-s of a 2-core start-up, while
    the driver, Prefect's API and the pre-started workers need the cores): the log monitor ships
    worker output to drivers that asked for it (``log_to_driver``, off here: worker logs stay in
    the session's log files) and the autoscaler monitor scales a cluster, while this one is a fixed
    local node. ``ray.init`` has no option for either (``ray start`` has ``--include-log-monitor``
    and ``--no-monitor``), so the parameters it builds get them for the duration of the call.
    A Ray without these names starts as it always does."""
    from ray._private import parameter

    params = getattr(parameter, "RayParams", None)
    if params is None or not {"include_log_monitor", "no_monitor"} <= set(params.__init__.__code__.co_varnames):
        yield
        return

    class _Params(params):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.setdefault("include_log_monitor", False)
            kwargs.setdefault("no_monitor", True)
            super().__init__(*args, **kwargs)

    parameter.RayParams = _Params
    try:
        yield
    finally:
        parameter.RayParams = params


def _tune_actor_env() -> dict[str, str]:
    """The env_vars Ray Tune would give a trial actor now (``_ActorClassCache.get``)."""
    from ray.tune.execution import class_cache

    env = dict(getattr(class_cache, "DEFAULT_ENV_VARS", _TUNE_ACTOR_ENV))
    env.update({k: os.environ[k] for k in getattr(class_cache, "ENV_VARS_TO_PROPAGATE", ()) if k in os.environ})
    return env


def _trial_actors_on_prestarted_workers() -> None:
    """Let Tune's trial actors run on Ray's pre-started workers when they would inherit the same env
    anyway (see ``_TUNE_ACTOR_ENV``): while our local Ray runs and every env var Tune would set holds
    the same value in the workers' inherited environment, the trainable is registered without a
    runtime_env; otherwise, and on any other Ray, Tune's own registration. Hand-written because Tune
    has no option for it; a Ray without the class leaves Tune's behaviour as it is."""
    import ray

    try:
        from ray.tune.execution import class_cache
    except ImportError:
        return
    cache = getattr(class_cache, "_ActorClassCache", None)
    if cache is None or getattr(cache.get, "tunepipe", False):
        return
    tunes_own = cache.get

    def get(self: Any, trainable_cls: Any) -> Any:
        inherited = dict(_LOCAL_ENV)
        if not inherited or any(inherited.get(k) != v for k, v in _tune_actor_env().items()):
            return tunes_own(self, trainable_cls)
        if trainable_cls not in self._cache:  # noqa: SLF001 - Tune's own cache, keyed as Tune keys it
            self._cache[trainable_cls] = ray.remote(trainable_cls)  # noqa: SLF001
        return self._cache[trainable_cls]  # noqa: SLF001

    get.tunepipe = True  # type: ignore[attr-defined]
    cache.get = get


class _NotMainThread(logging.Filter):
    """Drop Ray's note that a driver started off the main thread sets no SIGTERM handler:
    ``start_in_background`` sets the same one itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "current thread is not the main thread" not in record.getMessage()


class _TokenAuthOn(logging.Filter):
    """Drop Ray's note, printed on every start of a local Ray, that token authentication is on (the first
    line a user saw of each run). Asking for it with RAY_AUTH_MODE=token would silence it too, but then the
    driver's first call to its own GCS was refused ("InvalidAuthToken"). Its warning that authentication is
    *off* still shows."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Token authentication is enabled" not in record.getMessage()


def _quiet_local_start() -> None:
    for name, note in (("ray._private.worker", _NotMainThread),
                       ("ray._private.authentication.authentication_token_setup", _TokenAuthOn)):
        logger = logging.getLogger(name)
        if not any(isinstance(f, note) for f in logger.filters):
            logger.addFilter(note())


# The local Ray started ahead of the tune stage (``start_in_background``): whether it is ours, and
# the events of the thread that started it.
_AHEAD: dict[str, Any] = {}


def start_in_background(settings: Settings, preload: tuple[str, ...] = ()) -> None:
    """Start the embedded default's local Ray in a thread, so that it comes up while the caller
    does other work (imports, Prefect's API, preflight, data preparation): ``ray.init`` spends its
    ~2-3 s waiting on Ray's own processes. ``ray_session`` waits for it and owns it. Does nothing
    with ``RAY_ADDRESS`` set (a cluster is joined when the stage needs it) or when Ray is up.

    The thread lives until that session ends: Ray starts its GCS and raylet with a parent-death
    signal, which Linux sends when the *thread* that spawned them exits.
    """
    wait_for_shutdown()
    if settings.ray_address or _AHEAD:
        return
    for k, v in _RAY_ENV.items():
        os.environ.setdefault(k, v)
    if threading.current_thread() is threading.main_thread() and \
            signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        # What ray.init does on the main thread: SIGTERM exits through atexit, which stops the local Ray.
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(signum))
    _quiet_local_start()
    ready, done = threading.Event(), threading.Event()

    def start() -> None:
        import ray

        try:
            if not ray.is_initialized():
                _init_local(settings, preload=preload)
                _AHEAD["ours"] = True
        except Exception:  # noqa: BLE001 - ray_session starts Ray itself and reports the error there
            log.debug("starting Ray ahead of the tune stage failed", exc_info=True)
        finally:
            ready.set()
        done.wait()

    _AHEAD.update(ready=ready, done=done)
    threading.Thread(target=start, name="tunepipe-ray", daemon=True).start()


def wait_until_settled() -> None:
    """Block until whether Ray runs in this process is settled: a shutdown that a session left running
    in the background is done, and ``start_in_background``'s Ray is up (or has failed to start; the
    tune stage's ``ray_session`` still adopts it). Code that looks at ``ray.is_initialized()`` outside a
    ``ray_session`` waits here first, or it may see a Ray that is going away or start a second one."""
    wait_for_shutdown()
    ready = _AHEAD.get("ready")
    if ready is not None:
        ready.wait()


def _adopt_ray_started_ahead() -> threading.Event | None:
    """Wait for ``start_in_background``; if it started the running Ray, the event that ends its
    thread (set it after ``ray.shutdown``)."""
    ready = _AHEAD.pop("ready", None)
    if ready is None:
        return None
    ready.wait()
    done = _AHEAD.pop("done")
    if _AHEAD.pop("ours", False):
        return done
    done.set()
    return None


def stop_started_ahead() -> None:
    """Stop the local Ray that ``start_in_background`` started if no session has taken it over, and remove
    its session folder: a run that fails its checks leaves no Ray processes or logs behind."""
    if "ready" not in _AHEAD:
        return
    ahead = _adopt_ray_started_ahead()
    if ahead is None:
        return
    import ray

    session = _session_dir()
    _LOCAL_ENV.clear()
    try:
        ray.shutdown()
    finally:
        ahead.set()
    if session is not None:
        _remove_session(session)


def _session_dir() -> Path | None:
    """The running local Ray's session folder (its logs and sockets under /tmp/ray)."""
    import ray

    node = getattr(ray._private.worker, "_global_node", None)  # noqa: SLF001 - Ray has no public accessor
    try:
        return Path(node.get_session_dir_path()) if node is not None else None
    except Exception:  # noqa: BLE001 - only a clean-up hint
        return None


def _remove_session(folder: Path) -> None:
    """Remove a finished local Ray's session folder (and /tmp/ray/session_latest if it names it):
    a run of the embedded default otherwise leaves ~1 MB of logs in /tmp each time."""
    latest = folder.parent / "session_latest"
    if latest.is_symlink() and latest.resolve() == folder.resolve():
        latest.unlink(missing_ok=True)
    shutil.rmtree(folder, ignore_errors=True)


def _shut_down_in_background(ahead: threading.Event | None, remove: Path | None = None) -> None:
    """End this driver's Ray session now and stop a local Ray's processes off the caller's path.

    The driver's side of ``ray.shutdown()`` (its core worker) runs here, in the stage's thread: run in
    another thread, it raced whatever this process still did with Ray, and Ray ends a process that
    touches a core worker being shut down (an ObjectRef freed, a Ray Data thread) at once with exit
    code 1 and no word on stderr (seen in the data-parallel run on a joined cluster). Only stopping
    the local node's processes (~1.1 s, which the next stage need not wait for) runs in the
    background; the next Ray start in this process waits for it. ``remove``: the session folder to
    delete once Ray is down.
    """
    import ray
    from ray._private import worker

    node = worker._global_node  # noqa: SLF001 - the local processes ray.init started (None on a joined cluster)
    worker._global_node = None  # noqa: SLF001 - so that ray.shutdown() below only disconnects this driver
    try:
        _LOCAL_ENV.clear()
        ray.shutdown()
    except BaseException:
        worker._global_node = worker._global_node or node  # noqa: SLF001 - let a later ray.shutdown() stop them
        if ahead is not None:
            ahead.set()
        raise

    def stop() -> None:
        try:
            if node is not None:
                if node.is_head():
                    node.destroy_external_storage()
                node.kill_all_processes(check_alive=False, allow_graceful=True)
            if remove is not None:
                _remove_session(remove)
        finally:
            if ahead is not None:
                ahead.set()

    thread = threading.Thread(target=stop, name="tunepipe-ray-shutdown", daemon=False)
    _AHEAD["stopping"] = thread
    thread.start()


def wait_for_shutdown() -> None:
    """Block until a ``ray.shutdown`` that a session left running in the background is done."""
    thread = _AHEAD.pop("stopping", None)
    if thread is not None:
        thread.join()


@contextlib.contextmanager
def ray_session(settings: Settings, storage: Storage, num_cpus: int | None = None) -> Iterator[str]:
    """Connect to Ray for the duration of a stage.

    Yields a short description ("existing", "local", or the address). A multi-node cluster with a
    local-folder storage root is refused: Ray Tune needs shared storage (S3) across nodes.
    """
    import ray

    for k, v in _RAY_ENV.items():
        os.environ.setdefault(k, v)
    wait_for_shutdown()
    ahead = _adopt_ray_started_ahead()
    started = ahead is not None and ray.is_initialized()
    if started:
        where = "local"
    elif ray.is_initialized():
        where = "existing"
    elif settings.ray_address:
        check_cluster_answers(settings.ray_address)  # again: a stage retry may come long after the preflight
        ray.init(address=settings.ray_address, log_to_driver=False, configure_logging=False,
                 runtime_env={"env_vars": _storage_env(settings)})
        where = settings.ray_address
        started = True  # our connection, not the cluster: shutdown() only disconnects this driver
    else:
        _quiet_local_start()
        _init_local(settings, num_cpus)
        where = "local"
        started = True
    finished: Path | None = None  # the session folder to remove: set once the stage's body has succeeded
    try:
        alive = [n for n in ray.nodes() if n.get("Alive")]
        if len(alive) > 1 and not storage.is_s3:
            raise ConfigError(
                f"Ray cluster has {len(alive)} nodes but the storage root {storage.uri} is a local folder; "
                "multi-node tuning needs shared storage: set TUNEPIPE_STORAGE=s3://bucket/prefix"
            )
        log.info("Ray: %s, %d node(s), %s CPUs", where, len(alive), ray.cluster_resources().get("CPU"))
        # A local Ray of ours keeps its logs in /tmp/ray only when the stage fails (to read why).
        session = _session_dir() if started and where == "local" else None
        # A local Ray of ours that dies under the stage fails it, retryably; a joined cluster whose head
        # goes away fails it with one line (infra.ray_watchdog). A Ray the caller started is theirs to watch.
        if where == "local":
            watch = watch_local_node()
        elif where == "existing":
            watch = contextlib.nullcontext()
        else:
            watch = watch_joined_cluster(ray.get_runtime_context().gcs_address, settings.ray_address)
        with watch:
            yield where
        finished = session
    finally:
        if started:
            _shut_down_in_background(ahead, remove=finished)
        elif ahead is not None:
            ahead.set()


def workers_hold_keys(settings: Settings) -> bool:
    """Whether Ray's workers already have this S3 key pair in their environment.

    Then Ray Tune gets a filesystem without keys (``Storage.fs_for_ray``) and none are pickled into
    the experiment state on S3. True whenever we started or joined Ray ourselves (``runtime_env``);
    a Ray that the caller initialised without the keys gets a filesystem carrying them (documented
    in docs/SECURITY.md). Only a yes/no crosses back from the worker, never the key.
    """
    import hashlib

    import ray

    if not (settings.aws_access_key_id and settings.aws_secret_access_key):
        return True  # nothing secret to carry: the default chain (profile, role) is all there is
    want = hashlib.sha256((settings.aws_access_key_id.get_secret_value() + ":" +
                           settings.aws_secret_access_key.get_secret_value()).encode()).hexdigest()

    @ray.remote(num_cpus=0)
    def _same_keys(expected: str) -> bool:
        import hashlib
        import os

        pair = os.environ.get("AWS_ACCESS_KEY_ID", "") + ":" + os.environ.get("AWS_SECRET_ACCESS_KEY", "")
        return hashlib.sha256(pair.encode()).hexdigest() == expected

    try:
        same = bool(ray.get(_same_keys.remote(want), timeout=60))
        if not same:
            log.warning("Ray workers do not hold the S3 keys in their environment: the filesystem handed to "
                        "Ray Tune carries them, and Ray pickles it into the experiment state (docs/SECURITY.md)")
        return same
    except Exception:  # noqa: BLE001 - cannot tell: carry the keys rather than fail the stage
        log.warning("could not check the S3 keys of Ray workers; the filesystem carries them", exc_info=True)
        return False
