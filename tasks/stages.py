"""Prefect tasks: one per stage, each a thin wrapper over ``tasks.workloads``.

Every task has retries, a timeout and tags; its retry delays (exponential backoff or a short fixed
wait, with jitter) are applied when a flow runs (``for_run``), scaled by ``TUNEPIPE_RETRY_DELAY_S``.
Bad input (``TunepipeError`` that is not ``retryable``) is never retried: it will not get better. Tasks
whose output is fully determined by their inputs are cached on those inputs (data version,
config hash, storage and tracking location) with persisted results, so re-running a failed
flow skips finished stages; the tune stage additionally resumes its Ray experiment.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable, Iterable
from types import SimpleNamespace
from typing import Any

from prefect import Task, get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE

from infra import lease
from infra.settings import Settings, get_settings
from tasks import workloads as wl
from tuning_core.config import config_hash
from tuning_core.errors import TunepipeError
from tuning_core.results import DataVersion, RegistryResult, RetrainResult, TuningResult
from tuning_core.workloads import workload_of

log = logging.getLogger(__name__)


def _retry_if_transient(task, task_run, state) -> bool:
    """Retry crashes and transient outages, never bad input."""
    try:
        state.result()
    except TunepipeError as err:
        return err.retryable
    except BaseException:  # noqa: BLE001 - anything else (a crash, a network blip) is worth a retry
        return True
    return True


def _ctx() -> wl.Context:
    return wl.Context.build(get_settings())


def _where() -> str:
    """Where results live: storage root (and its instance id) and tracking URI."""
    ctx = _ctx()
    return f"{ctx.storage.uri}|{ctx.storage.instance_id()}|{ctx.tracker().uri}"


def _source_fingerprint(cfg: wl.Pipeline) -> str | None:
    """Size and mtime of local source files; None (no caching) for S3 sources, which we re-read."""
    return workload_of(cfg).data_source(cfg).fingerprint()


def _prepare_key(ctx, params: dict[str, Any]) -> str | None:
    fp = _source_fingerprint(params["cfg"])
    if fp is None:
        return None
    return f"prepare-{config_hash(params['cfg'].data)}-{fp}-{hashlib.sha1(_where().encode()).hexdigest()[:10]}"


def _tune_key(ctx, params: dict[str, Any]) -> str:
    cfg, version = params["cfg"], params["version"]
    return f"tune-{wl.experiment_for(cfg, version)}-{hashlib.sha1(_where().encode()).hexdigest()[:10]}"


def _retrain_key(ctx, params: dict[str, Any]) -> str:
    cfg, tuning = params["cfg"], params["tuning"]
    return (f"retrain-{tuning.experiment_name}-{tuning.best_trial_id}-{tuning.num_trials}-{config_hash(cfg.retrain)}"
            f"-{hashlib.sha1(_where().encode()).hexdigest()[:10]}")


COMMON = dict(retry_jitter_factor=0.5, retry_condition_fn=_retry_if_transient)
# Tasks that are not cached on their inputs say so: Prefect's default cache policy hashes every
# input of every run, and these take the tuning result (every trial's per-round history), whose
# hashing alone held the registry and report stages for ~2 s each.
UNCACHED = dict(**COMMON, cache_policy=NO_CACHE)


def _backoff(retries: int) -> list[float]:
    return [2.0 ** i for i in range(retries)]


def _quick(retries: int) -> list[float]:
    return [0.5] * retries


# Each task's retry delays in units of ``Settings.retry_delay_s`` (10 s by default), by task name: checks
# and the report wait a moment, stages that write to S3, MLflow or Ray back off 1, 2, 4 units.
DELAY_UNITS: dict[str, Callable[[int], list[float]]] = {
    "preflight": _quick, "champion_config": _quick, "prepare_data": _backoff, "tune": _backoff,
    "retrain_best": _backoff, "evaluate_and_register": _backoff, "report": _quick, "batch_score": _backoff,
}


def with_retry_policy(stage: Task, settings: Settings) -> Task:
    """``stage`` with its retry delays for ``settings``, keeping its retry count.

    Applied when a flow runs, not in the ``@task`` decorators: those are evaluated at import, and the
    delays must follow the environment of the run (a test runs this policy with short delays).
    """
    units = DELAY_UNITS.get(stage.name, _backoff)(stage.retries)
    return stage.with_options(retry_delay_seconds=[u * settings.retry_delay_s for u in units] or 0)


def note_tags_without_limits(tags: Iterable[str]) -> bool:
    """Tell Prefect's client, right before a task with ``tags`` starts, that no concurrency limit
    exists on them, when a read of the API's limits says so; returns whether it did.

    A task run with tags asks the API for a slot on each tag (``increment-with-lease``). That is a
    write transaction even when no limit exists, and Prefect's SQLite store (the embedded default's
    API) refuses it at once with "database is locked" whenever its own services are writing the
    run's events: the client then waits ~2 s (its first retry) before the task starts. Seen once or
    twice per ``tunepipe run``, 2-4 s of a ~15-s run. The client skips the request when its own
    cache (5-s TTL) says the tags have no limits; this fills that cache from a read, which SQLite
    never refuses. A limit on any of the tags (``prefect concurrency-limit create ray-tune 1``), a
    failed read, or a Prefect without that cache leaves Prefect's own check to run as before.
    Hand-written: Prefect has no setting for it (PrefectHQ/prefect#18934 on SQLite locking).
    """
    names = frozenset(f"tag:{t}" for t in tags)
    try:
        from prefect.concurrency import services

        cache, lock = services._no_limits_cache, services._cache_lock  # noqa: SLF001 - see above
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            limits = client.read_global_concurrency_limits(limit=_LIMITS_READ)
    except Exception:  # noqa: BLE001 - an optimisation only: Prefect's own check still runs
        log.debug("could not read Prefect's concurrency limits", exc_info=True)
        return False
    if not names or len(limits) >= _LIMITS_READ or any(limit.name in names for limit in limits):
        return False
    with lock:
        cache[names] = True
    return True


_LIMITS_READ = 200  # more limits than this: not all were read, so nothing is assumed


class _Stage:
    """A stage task that notes its tags' absence of limits (``note_tags_without_limits``) right before
    each call; otherwise the task itself."""

    def __init__(self, task_: Task) -> None:
        self.task = task_

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        note_tags_without_limits(self.task.tags)
        return self.task(*args, **kwargs)

    def with_options(self, **options: Any) -> _Stage:
        return _Stage(self.task.with_options(**options))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.task, name)


def experiment_on_storage(cfg: wl.Pipeline, version: DataVersion) -> bool:
    """Whether the tune stage's Ray experiment is on storage. Its cached result (keyed by the experiment's
    name and the storage root) points into that folder: once someone has deleted it, the stage must run
    again (``refresh_cache``) rather than hand on the URIs of deleted files."""
    import pyarrow.fs as pafs

    ctx = _ctx()
    info = ctx.storage.fs.get_file_info(ctx.storage.path("ray", wl.experiment_for(cfg, version)))
    return info.type != pafs.FileType.NotFound


def for_run(settings: Settings | None = None) -> SimpleNamespace:
    """The stage tasks of this module (as they are now: a test may have replaced one) with the retry
    policy of ``settings``, by default the environment's, read now."""
    settings = settings or get_settings()
    return SimpleNamespace(**{name: _Stage(with_retry_policy(globals()[name], settings))
                              for name in ("preflight", "champion_config", "prepare_data", "tune", "retrain_best",
                                           "evaluate_and_register", "report")})


@task(name="preflight", tags=["tunepipe", "preflight"], retries=2, timeout_seconds=300, **UNCACHED)
def preflight(cfg: wl.Pipeline) -> wl.Pipeline:
    """Check config, storage and tracking before anything is written; the config completed from the data."""
    return wl.preflight(cfg, _ctx())


@task(name="prepare_data", tags=["tunepipe", "data"], retries=3, timeout_seconds=3600,
      cache_key_fn=_prepare_key, persist_result=True, **COMMON)
def prepare_data(cfg: wl.Pipeline) -> DataVersion:
    version = wl.prepare(cfg, _ctx())
    create_table_artifact(key=f"{cfg.workload}-data-report", table=version.report_rows(),
                          description=f"Validation report of data version {version.version}")
    get_run_logger().info("data version %s at %s: %s", version.version, version.uri, version.rows)
    return version


class LatestValue:
    """Sends the latest value put, from a thread of its own, skipping those superseded meanwhile.

    The tune stage's progress artifact is updated this way, off Ray Tune's driver loop: an HTTP
    call per finished trial held the loop, and while the Prefect API was down (its client retries
    for ~30 s) trials waited on it (one took 21 s instead of 8).

    Sends are at least ``min_interval_s`` apart (``close`` sends what is pending at once): an update
    costs ~30 ms of this process's CPU and as much of the API server's, and on 2 cores a run of short
    trials (32 in ~4 s) sent one per trial, CPU the trials ran short of (sampled: ~1 s of a 7-s tune stage).
    """

    def __init__(self, send: Callable[[Any], None], min_interval_s: float = 1.0) -> None:
        self._send, self._value, self._closed = send, None, False
        self._interval = min_interval_s
        self._cv = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="tunepipe-progress", daemon=True)
        self._thread.start()

    def put(self, value: Any) -> None:
        with self._cv:
            self._value = value
            self._cv.notify()

    def close(self, timeout_s: float = 30.0) -> None:
        """Send what is pending (waiting up to ``timeout_s``), then stop."""
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join(timeout_s)

    def _run(self) -> None:
        while True:
            with self._cv:
                while self._value is None and not self._closed:
                    self._cv.wait()
                value, self._value = self._value, None
                if value is None:
                    return
            try:
                self._send(value)
            except Exception:  # noqa: BLE001 - progress is best-effort; the stage's result is what counts
                log.debug("progress update failed", exc_info=True)
            with self._cv:
                self._cv.wait_for(lambda: self._closed, timeout=self._interval)


@task(name="tune", tags=["tunepipe", "ray-tune"], retries=2, timeout_seconds=6 * 3600,
      cache_key_fn=_tune_key, persist_result=True, **COMMON)
def tune(cfg: wl.Pipeline, version: DataVersion) -> TuningResult:
    logger = get_run_logger()
    artifact = create_progress_artifact(0.0, key=f"{cfg.workload}-tuning-progress",
                                        description=f"trials finished of {cfg.tune.num_samples}")

    sender = LatestValue(lambda pct: update_progress_artifact(artifact, pct))

    def progress(event: dict[str, Any]) -> None:
        logger.info("trials %d/%d done, best %s=%s", event["done"], event["total"], event["metric"], event["best"])
        sender.put(min(100.0, 100.0 * event["done"] / max(1, event["total"])))

    try:
        result = wl.tune(cfg, _ctx(), version, progress=progress)
    finally:
        sender.close()
    update_progress_artifact(artifact, 100.0)
    create_table_artifact(key=f"{cfg.workload}-leaderboard", table=result.leaderboard_rows(),
                          description=f"Ray Tune leaderboard of {result.experiment_uri}")
    logger.info("tuning %s: %d trials, best %s=%.4f, resumed=%s", result.experiment_uri, result.num_trials,
                result.metric, result.best_metric, result.resumed)
    return result


@task(name="retrain_best", tags=["tunepipe", "retrain"], retries=2, timeout_seconds=3 * 3600,
      cache_key_fn=_retrain_key, persist_result=True, **COMMON)
def retrain_best(cfg: wl.Pipeline, version: DataVersion, tuning: TuningResult) -> RetrainResult:
    result = wl.retrain(cfg, _ctx(), version, tuning)
    get_run_logger().info("retrained: test %s, default %s", result.test_metrics, result.baseline_test_metrics)
    return result


@task(name="evaluate_and_register", tags=["tunepipe", "registry"], retries=3, timeout_seconds=1800, **UNCACHED)
def evaluate_and_register(cfg: wl.Pipeline, version: DataVersion, tuning: TuningResult,
                          retrained: RetrainResult) -> RegistryResult:
    result = wl.register(cfg, _ctx(), version, tuning, retrained)
    get_run_logger().info("registry %s v%s: %s", result.model_name, result.version, result.decision)
    return result


@task(name="report", tags=["tunepipe", "report"], retries=2, timeout_seconds=600, **UNCACHED)
def report(cfg: wl.Pipeline, version: DataVersion, tuning: TuningResult, retrained: RetrainResult,
           registry: RegistryResult, timings: dict[str, float] | None = None) -> dict[str, Any]:
    summary = wl.summary(cfg, version, tuning, retrained, registry, _ctx(), timings)
    create_markdown_artifact(key=f"{cfg.workload}-report", markdown=wl.report_markdown(summary),
                             description="tunepipe run report")
    return summary


def experiment_lease(cfg: wl.Pipeline, version: DataVersion) -> lease.ExperimentLease:
    """The exclusive lease on this run's experiment (``infra.lease``), for a ``with`` block around the
    stages that write into it: its name is deterministic, so a second run of the same config would
    otherwise write into the same Ray experiment, MLflow runs and registry."""
    from prefect.runtime import flow_run

    ctx = _ctx()
    return lease.experiment_lease(ctx.storage, ctx.settings, wl.experiment_for(cfg, version), flow_run_id=flow_run.id)


@task(name="champion_config", tags=["tunepipe", "registry"], retries=2, **UNCACHED)
def champion_config(cfg: wl.Pipeline) -> list[dict[str, Any]] | None:
    return wl.champion_warm_start(cfg, _ctx())
