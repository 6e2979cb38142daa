"""The tuning runner: the one owner of ``ray.tune.Tuner``.

Builds the experiment from a ``TuneConfig``, resumes it if a restorable experiment already
exists at its deterministic location (that is what makes a retried stage cheap), and turns
Ray's ResultGrid into a typed ``TuningResult`` with a leaderboard and learning curves.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.fs as pafs

from tuning_core.config import ParamSpec, Scalar, TuneConfig
from tuning_core.errors import ConfigError
from tuning_core.results import TrialRecord, TuningResult
from tuning_core.schedulers import DECISION_POINTS, create_scheduler, report_cadence
from tuning_core.search import build_space, create_searcher

log = logging.getLogger(__name__)

Progress = Callable[[dict[str, Any]], None]


def experiment_name(workload: str, data_version: str, cfg_hash: str, run_id: str | None = None) -> str:
    """Deterministic experiment name: same data + same config → same experiment (resumable)."""
    if run_id:
        return run_id
    return f"{workload}-{data_version[:10]}-{cfg_hash[:10]}"


@dataclass(frozen=True)
class SearchPlan:
    """The Ray param space, searcher and scheduler of one ``TuneConfig``, each built once."""

    param_space: dict[str, Any]
    searcher: Any
    scheduler: Any


# The plan a preflight built and nobody used yet (one slot): run_tuning takes it instead of building
# the same objects again, so a CLI run (its own preflight, the flow's, the tune stage) builds each once.
_UNUSED: dict[str, SearchPlan] = {}


def _plan_key(cfg: TuneConfig, space: dict[str, ParamSpec | Scalar]) -> str:
    entries = {k: v.model_dump() if isinstance(v, ParamSpec) else v for k, v in space.items()}
    return json.dumps([cfg.model_dump(mode="json"), entries], sort_keys=True, default=str)


def plan_search(cfg: TuneConfig, space: dict[str, ParamSpec | Scalar]) -> SearchPlan:
    """Build the space, searcher and scheduler, failing with a ConfigError before Ray starts.

    ``run_tuning`` hands these very objects to the Tuner: building them is the check, so it is done
    once (a plan that ``validate`` built for the same config is taken, not built again).
    """
    unused = _UNUSED.pop(_plan_key(cfg, space), None)
    if unused is not None:
        return unused
    param_space = build_space(space, cfg.search)
    plan = SearchPlan(param_space, create_searcher(cfg, param_space), create_scheduler(cfg, space))
    if cfg.search == "grid" and cfg.num_samples != 1:
        log.info("grid search: num_samples=%d repeats the whole grid that many times", cfg.num_samples)
    return plan


def validate(cfg: TuneConfig, space: dict[str, ParamSpec | Scalar]) -> dict[str, Any]:
    """Check the space, searcher and scheduler before Ray starts (preflight); returns the Ray param space.

    The plan is kept for ``run_tuning`` of the same config in this process (a second check reuses it too).
    """
    key = _plan_key(cfg, space)
    if key not in _UNUSED:
        plan = plan_search(cfg, space)
        _UNUSED.clear()
        _UNUSED[key] = plan
    return _UNUSED[key].param_space


def _driver_callbacks(cfg: TuneConfig, progress: Progress | None, extra: list[Any] | None) -> list[Any]:
    from ray.tune import Callback

    class DriverOnly(Callback):
        """Wrap a callback so it is not pickled into the experiment state (tuner.pkl).

        Our callbacks hold live clients (MLflow, Prefect loggers); the runner re-attaches fresh
        ones when an experiment is restored.
        """

        def __init__(self, inner: Any) -> None:
            self.inner = inner

        def __getstate__(self) -> dict[str, Any]:
            return {"inner": None}

        def _call(self, hook: str, *args: Any, **kwargs: Any) -> None:
            fn = getattr(self.inner, hook, None) if self.inner is not None else None
            if fn is None:
                return
            try:
                fn(*args, **kwargs)
            except Exception:  # noqa: BLE001 - Ray would mark the trial as errored; observers must not
                log.warning("tuning callback %s.%s failed", type(self.inner).__name__, hook, exc_info=True)

        def on_trial_start(self, *args, **kwargs):
            self._call("on_trial_start", *args, **kwargs)

        def on_trial_result(self, *args, **kwargs):
            self._call("on_trial_result", *args, **kwargs)

        def on_trial_complete(self, *args, **kwargs):
            self._call("on_trial_complete", *args, **kwargs)

        def on_trial_error(self, *args, **kwargs):
            self._call("on_trial_error", *args, **kwargs)

    class ProgressCallback:
        """Summarise trial progress on the driver (Ray worker logs do not reach Prefect by themselves)."""

        def __init__(self) -> None:
            self.best: float | None = None
            self.finished: set[str] = set()
            # Every result seen on this driver, per trial: the history's backstop (see _history).
            self.rows: dict[str, list[dict[str, Any]]] = {}

        def _better(self, value: float) -> bool:
            if self.best is None:
                return True
            return value > self.best if cfg.mode == "max" else value < self.best

        def on_trial_result(self, iteration, trials, trial, result, **info):
            self.rows.setdefault(trial.trial_id, []).extend(_history_rows(result, cfg.metric))
            value = result.get(cfg.metric)
            if isinstance(value, (int, float)) and not math.isnan(value) and self._better(value):
                self.best = float(value)

        def record(self, trial: Any) -> TrialRecord | None:
            """What the driver saw of a finished trial, as the final result will hold it (listeners log
            it while other trials still run); None when it reported nothing here (a resumed trial)."""
            rows = _by_iteration(self.rows.get(trial.trial_id, []))
            if not rows:
                return None
            last = trial.last_result or {}
            values = [v for h in rows if (v := _num(h.get(cfg.metric))) is not None]
            return TrialRecord(
                trial_id=str(trial.trial_id), config=_clean_config(trial.config or {}), status="TERMINATED",
                iterations=int(last.get("training_iteration", 0)), metric=_num(last.get(cfg.metric)),
                best_metric=(max if cfg.mode == "max" else min)(values) if values else None,
                metrics={k: float(v) for k, v in last.items() if k in _HISTORY_METRICS and _num(v) is not None},
                time_s=float(last.get("time_total_s", 0.0)), history=rows)

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.finished.add(trial.trial_id)
            done = len(self.finished | {t.trial_id for t in trials if t.status in ("TERMINATED", "ERROR")})
            event = {"done": done, "total": cfg.num_samples, "best": self.best, "metric": cfg.metric,
                     "trial_id": trial.trial_id, "record": self.record(trial)}
            if event["record"] is not None:  # plain data: listeners may write events out as JSON
                event["record"] = event["record"].model_dump(mode="json")
            log.info("trials %d/%d done, best %s=%s", done, cfg.num_samples, cfg.metric, self.best)
            if progress is not None:
                progress(event)

    return [DriverOnly(ProgressCallback()), *(DriverOnly(c) for c in (extra or []))]


def _trial_dirname(trial: Any) -> str:
    # Short, stable folder names (Ray's default embeds the whole config, long keys on S3).
    return f"trial_{trial.trial_id}"


def _stopper(cfg: TuneConfig) -> Callable[[str, dict[str, Any]], bool]:
    threshold = cfg.stop_metric_threshold

    def stop(trial_id: str, result: dict[str, Any]) -> bool:
        if result.get("training_iteration", 0) >= cfg.max_iterations:
            return True
        if threshold is None or cfg.metric not in result:
            return False
        value = result[cfg.metric]
        return value >= threshold if cfg.mode == "max" else value <= threshold

    return stop


def _file_loggers() -> list[Any]:
    """The result-file loggers Ray Tune would add by itself, without its TensorBoard one.

    ``result.json`` is what the ResultGrid reads back for each trial's history; ``progress.csv`` is
    for people. Ray's default TensorBoard logger is left out: it imports tensorboardX and with it
    torch on the driver (about 4.5 s before the first trial starts, and ~300 MB) and writes an
    event file per result, which the leaderboard, the curves and MLflow already cover
    (measured by ``benchmarks/tune_overhead.py``).
    """
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    return [_keeping_local_history(CSVLoggerCallback)(), _keeping_local_history(JsonLoggerCallback)()]


def _keeping_local_history(logger_cls: type) -> type:
    """``logger_cls`` that, when a failed trial restarts from its checkpoint, keeps the history the
    driver has written so far instead of replacing it with the copy on storage.

    Ray's loggers copy ``result.json``/``progress.csv`` from storage over the driver's file whenever a
    trial with a checkpoint starts (``LoggerCallback._restore_from_remote``). Within one ``Tuner.fit``
    the driver's file is the one being written and storage only holds the copy made at the last
    experiment snapshot: a trial killed a second after its first checkpoint lost every result before
    the snapshot (its result.json began at round 30). A restored experiment runs in a new staging
    folder, where no file exists yet, and still gets storage's copy. Overrides a private method: Ray
    has no option for it.
    """

    class KeepingLocalHistory(logger_cls):  # type: ignore[misc,valid-type]
        def _restore_from_remote(self, file_name: str, trial: Any) -> None:
            if Path(trial.local_path, file_name).exists():
                return
            super()._restore_from_remote(file_name, trial)

    return KeepingLocalHistory


@contextlib.contextmanager
def _only_our_loggers() -> Iterator[None]:
    """Keep ``Tuner.fit`` from adding its default loggers; ours come from ``_file_loggers``."""
    key = "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"  # read once, when fit builds its callbacks
    before = os.environ.get(key)
    os.environ[key] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before


def run_tuning(
    trainable: Callable[..., None],
    data: dict[str, Any],
    space: dict[str, ParamSpec | Scalar],
    cfg: TuneConfig,
    storage_fs: pafs.FileSystem,
    storage_path: str,
    name: str,
    callbacks: list[Any] | None = None,
    progress: Progress | None = None,
    uri_prefix: str = "",
) -> TuningResult:
    """Run (or resume) one Ray Tune experiment.

    Args:
        trainable: a function trainable ``f(config, **data)``.
        data: large objects handed to trials through the object store (``tune.with_parameters``).
        space: the search space from the config.
        cfg: searcher, scheduler, budget and resources.
        storage_fs: filesystem of the experiment storage (local or S3).
        storage_path: folder inside ``storage_fs`` that holds experiments (``<root>/ray``).
        name: experiment name (see ``experiment_name``).
        callbacks: extra Tune callbacks running on the driver (e.g. MLflow logging from infra).
        progress: called with a small dict whenever a trial completes.
        uri_prefix: prefix that turns a path in ``storage_fs`` into a URI ("s3://" or "").
    """
    from ray import tune

    _check_a_node_fits(cfg)
    resources: Any = {"cpu": cfg.resources.cpu, "gpu": cfg.resources.gpu}
    if cfg.resources.data_parallel:
        cfg, resources = _data_parallel(cfg)
    _warn_hyperband_capped(cfg)
    plan = plan_search(cfg, space)
    report_at, every = report_cadence(cfg)
    param_space = {**plan.param_space, "_max_iterations": cfg.max_iterations, "_checkpoint_every": every,
                   "_report_at": report_at}
    exp_path = f"{storage_path.rstrip('/')}/{name}"
    wrapped = tune.with_resources(tune.with_parameters(trainable, **data), resources)
    started = time.monotonic()
    cbs = _driver_callbacks(cfg, progress, callbacks)
    if cfg.resources.data_parallel:
        from tuning_core.trainables.distributed import stopped_run_releaser

        cbs.append(stopped_run_releaser())
    resumed = tune.Tuner.can_restore(exp_path, storage_filesystem=storage_fs)
    if resumed:
        log.info("resuming experiment %s%s (finished trials are kept)", uri_prefix, exp_path)
        tuner = tune.Tuner.restore(exp_path, wrapped, resume_errored=True, storage_filesystem=storage_fs)
        # Our callbacks are not pickled with the experiment (see DriverOnly); re-attach fresh ones.
        # Tuner.restore has no callbacks argument, hence the private attribute.
        tuner._local_tuner.get_run_config().callbacks = [*cbs, *_file_loggers()]  # noqa: SLF001
    else:
        if isinstance(storage_fs, pafs.LocalFileSystem):
            storage_fs.create_dir(storage_path, recursive=True)
        tuner = tune.Tuner(
            wrapped,
            param_space=param_space,
            tune_config=tune.TuneConfig(
                metric=cfg.metric, mode=cfg.mode,
                search_alg=plan.searcher, scheduler=plan.scheduler,
                num_samples=cfg.num_samples,
                # Searchers get their limit themselves (ConcurrencyLimiter / BasicVariantGenerator).
                max_concurrent_trials=None,
                time_budget_s=cfg.time_budget_s, reuse_actors=True,
                trial_dirname_creator=_trial_dirname,
            ),
            run_config=tune.RunConfig(
                name=name, storage_path=storage_path, storage_filesystem=storage_fs,
                failure_config=tune.FailureConfig(max_failures=cfg.max_failures),
                # Ray always keeps the latest checkpoint too, so a crashed trial resumes from it.
                # PBT clones another trial's checkpoint later on; pruning can delete it first.
                checkpoint_config=tune.CheckpointConfig(num_to_keep=_checkpoints_to_keep(cfg),
                                                        checkpoint_score_attribute=cfg.metric,
                                                        checkpoint_score_order=cfg.mode),
                stop=_stopper(cfg), callbacks=[*cbs, *_file_loggers()], verbose=0,
            ),
        )
    # The reports' plotting libraries (~0.4 s of imports) load while the driver waits on the trials.
    threading.Thread(target=_import_plotting, name="tunepipe-plot-imports", daemon=True).start()
    with _only_our_loggers():
        grid = tuner.fit()
    if cfg.resources.data_parallel:
        from tuning_core.trainables.distributed import release_leftovers

        release_leftovers(storage_fs, exp_path)
    wall = time.monotonic() - started
    live_rows = cbs[0].inner.rows
    return _collect(grid, cfg, name, uri_prefix + exp_path, resumed, wall, storage_fs, exp_path, live_rows)


def _checkpoints_to_keep(cfg: TuneConfig) -> int | None:
    """How many checkpoints each trial keeps: all of them under PBT (it clones others' later on),
    else as many as the trial's cadence writes, between 2 and 8.

    Ray snapshots the whole experiment state (searcher included) whenever a trial has written
    ``num_to_keep`` checkpoints since the last snapshot; ASHA trials checkpoint at rungs 1, 3 and 9
    within a fraction of a second, so a keep of 2 forced a snapshot every few results.
    """
    if cfg.scheduler == "pbt":
        return None
    _, every = report_cadence(cfg)
    points = DECISION_POINTS[cfg.scheduler](cfg) or frozenset()
    writes = {i for i in range(every, cfg.max_iterations + 1, every)} | set(points) | {cfg.max_iterations}
    return max(2, min(8, len(writes)))


def _warn_hyperband_capped(cfg: TuneConfig) -> None:
    """HyperBand halves a bracket among the trials in it, and needs them proposed together (see
    ``search._max_concurrent``). A cap on trials at a time (``max_concurrent_trials``) lets them out a
    few at a time: they refill the first bracket, which never halves, and few are ever stopped early."""
    cap = cfg.max_concurrent_trials
    if cfg.scheduler == "hyperband" and cap and cap < cfg.num_samples:
        log.warning("scheduler hyperband with at most %d trials at a time: the trials arrive a few at a time and "
                    "refill HyperBand's first bracket, which stops nothing early; asha has no such limit", cap)


def _data_parallel(cfg: TuneConfig) -> tuple[TuneConfig, Any]:
    """The config and trial resources of data-parallel trials (``workers_per_trial`` > 1).

    The trial process reserves no CPU (its Train run reserves the workers), so Tune cannot see what a
    trial really holds: concurrent trials are capped here so that their workers fit the cluster's
    CPUs together (else a started trial would wait for workers that others hold).

    Except under HyperBand (unless ``max_concurrent_trials`` is set): it halves a bracket among the
    trials in it, which must all be alive together, and a capped run lets them out a few at a time (see
    ``search._max_concurrent``). There every trial starts at once; those whose workers do not fit yet
    wait in their Train run (Ray Train retries placing its workers, without limit) and get them when a
    trial ahead reaches its rung and pauses, which frees its workers (``stopped_run_releaser``). Each
    waiting trial holds a trial process and a Train controller (~0.3 GB together), no CPU.
    """
    import ray

    from tuning_core.trainables.distributed import Workers, concurrent_trials, trial_resources

    workers = Workers(cfg.resources.workers_per_trial, cfg.resources.cpu_per_worker)
    cpus = float(ray.cluster_resources().get("CPU", 0)) if ray.is_initialized() else float(os.cpu_count() or 1)
    cap = concurrent_trials(cpus, workers, cfg.max_concurrent_trials)
    if cfg.scheduler == "hyperband" and not cfg.max_concurrent_trials:
        log.info("data-parallel trials under hyperband: all %d start at once (HyperBand halves among the trials "
                 "of a bracket); %d at a time hold workers (%d x %g CPU each, %g CPUs), the others wait for theirs",
                 cfg.num_samples, cap, workers.count, workers.cpu, cpus)
        return cfg.model_copy(update={"max_concurrent_trials": cfg.num_samples}), trial_resources()
    if cfg.scheduler == "pbt" and cap < 2:
        # PBT exploits among trials that run side by side; one at a time, no trial ever has a peer.
        raise ConfigError(f"scheduler pbt with resources.workers_per_trial={workers.count} x cpu_per_worker="
                          f"{workers.cpu:g}: the cluster's {cpus:g} CPUs hold only one such trial at a time, and PBT "
                          "needs at least 2 side by side; lower workers_per_trial or cpu_per_worker")
    if cap != cfg.max_concurrent_trials:
        log.info("data-parallel trials: %d at a time (%d workers x %g CPU each, %g CPUs in the cluster)",
                 cap, workers.count, workers.cpu, cpus)
    return cfg.model_copy(update={"max_concurrent_trials": cap}), trial_resources()


def _check_a_node_fits(cfg: TuneConfig) -> None:
    """Fail before tuning when the cluster cannot hold one trial: Tune would wait for it forever.

    A single-process trial needs one node with its CPUs and GPUs; a data-parallel trial needs
    ``workers_per_trial`` workers of ``cpu_per_worker`` CPUs, which Ray Train may place on several nodes.
    Checked against the nodes up now; on an autoscaling cluster, start a node of that shape first.
    Without a running Ray there is nothing to check (Tune starts a local one sized to this machine,
    and an impossible request then fails the same way on the next run).
    """
    import ray

    if not ray.is_initialized():
        return
    if cfg.resources.data_parallel:
        _check_workers_fit(cfg, [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")])
        return
    need = {"CPU": cfg.resources.cpu, "GPU": cfg.resources.gpu}
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    if any(all(node.get(k, 0.0) >= v for k, v in need.items() if v > 0) for node in nodes):
        return
    have = "; ".join(f"{node.get('CPU', 0):g} CPU, {node.get('GPU', 0):g} GPU" for node in nodes) or "none"
    raise ConfigError(f"resources: one trial needs cpu={need['CPU']:g}, gpu={need['GPU']:g}, but no Ray node has "
                      f"that (live nodes: {have}); expected resources that fit one node: lower them in the "
                      "tune config or add such a node")


def _check_workers_fit(cfg: TuneConfig, nodes: list[dict[str, float]]) -> None:
    need, per = cfg.resources.workers_per_trial, cfg.resources.cpu_per_worker
    slots = sum(math.floor(node.get("CPU", 0.0) / per + 1e-9) for node in nodes)
    if slots >= need:
        return
    have = "; ".join(f"{node.get('CPU', 0):g} CPU" for node in nodes) or "none"
    raise ConfigError(f"resources: one trial needs workers_per_trial={need} workers of cpu_per_worker={per:g} CPU, "
                      f"but the cluster holds only {slots} such workers (live nodes: {have}); expected fewer "
                      "workers per trial, fewer CPUs per worker, or more nodes")


def _clean_config(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if not k.startswith("_")}


_HISTORY_METRICS = ("auc", "logloss", "error", "mlogloss", "merror", "rmse", "mae", "mean_accuracy", "loss",
                    "train_loss")


def _history_rows(result: dict[str, Any], metric: str) -> list[dict[str, Any]]:
    """A result as history rows, one per iteration: the rounds its ``curve`` covers (trainables
    that report sparsely send each round's values since their previous report), then the result's
    own iteration with its metrics and the (possibly PBT-mutated) config."""
    row = {k: v for k, v in result.items() if k in ("training_iteration", metric, *_HISTORY_METRICS)}
    row.update({f"config/{k}": v for k, v in (result.get("config") or {}).items()
                if not k.startswith("_") and isinstance(v, (int, float, str, bool))})
    curve = _curve(result)
    last = _num(result.get("training_iteration"))
    rows = []
    if curve and last is not None:
        length = max(len(v) for v in curve.values())
        for j in range(length - 1):  # the last value is the result's own row
            point = {name: values[j] for name, values in curve.items() if j < len(values)}
            rows.append({**point, "training_iteration": int(last) - length + 1 + j})
    return [*rows, row]


def _curve(result: dict[str, Any]) -> dict[str, list[float]]:
    """The per-round values of a result, whether it came live (a dict of lists) or from Ray's CSV
    (flattened ``curve/<name>`` columns holding the list as text)."""
    curve = result.get("curve")
    if not isinstance(curve, dict):
        curve = {k.split("/", 1)[1]: v for k, v in result.items() if k.startswith("curve/")}
    out = {}
    for name, values in curve.items():
        if isinstance(values, str):
            try:
                values = json.loads(values.replace("nan", "NaN"))
            except ValueError:
                continue
        if isinstance(values, (list, tuple)) and name in _HISTORY_METRICS:
            out[name] = [float(v) for v in values]
    return out


def _history(result: Any, metric: str, live: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per iteration, from the trial's result files and the results seen live on this driver.

    Ray's result files lose or repeat rows when a trial restarts (PBT exploit or pause, retry,
    resume): its logger re-downloads a stale copy from storage and appends to it. The live rows
    fill the gaps, and the last report of an iteration wins, since a restarted trial re-runs the
    iterations after its checkpoint (after a PBT exploit: on the cloned model).
    """
    df = result.metrics_dataframe
    rows: list[dict[str, Any]] = []
    if df is not None and not df.empty:
        # Config columns are kept too: under PBT they change during a trial (mutations).
        keep = [c for c in df.columns if c in ("training_iteration", metric, *_HISTORY_METRICS)
                or (c.startswith("config/") and not c.startswith("config/_"))]
        curves = [c for c in df.columns if c.startswith("curve/")]
        rows = [r for rec in df[keep + curves].to_dict(orient="records") for r in _history_rows(
            {**{k: v for k, v in rec.items() if not k.startswith("config/")}, "config": {
                k.removeprefix("config/"): v for k, v in rec.items() if k.startswith("config/")}}, metric)]
    return _by_iteration([*rows, *live])


def _by_iteration(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per iteration, in order; the last report of an iteration wins."""
    by_iteration: dict[int, dict[str, Any]] = {}
    for row in rows:
        if _num(row.get("training_iteration")) is not None:
            by_iteration[int(row["training_iteration"])] = {**row, "training_iteration": int(row["training_iteration"])}
    return [by_iteration[i] for i in sorted(by_iteration)]


def _collect(grid: Any, cfg: TuneConfig, name: str, exp_uri: str, resumed: bool, wall: float,
             fs: pafs.FileSystem, exp_path: str, live_rows: dict[str, list[dict[str, Any]]]) -> TuningResult:
    trials: list[TrialRecord] = []
    better = max if cfg.mode == "max" else min
    for result in grid:
        metrics = result.metrics or {}
        trial_id = metrics.get("trial_id") or (result.path.rstrip("/").rsplit("/", 1)[-1])
        history = _history(result, cfg.metric, live_rows.get(str(trial_id), []))
        values = [h[cfg.metric] for h in history if h.get(cfg.metric) is not None
                  and not (isinstance(h[cfg.metric], float) and math.isnan(h[cfg.metric]))]
        ckpt = result.get_best_checkpoint(cfg.metric, cfg.mode) if result.best_checkpoints else result.checkpoint
        trials.append(TrialRecord(
            trial_id=str(trial_id), config=_clean_config(result.config or {}),
            status="ERROR" if result.error else "TERMINATED",
            iterations=int(metrics.get("training_iteration", 0)),
            metric=_num(metrics.get(cfg.metric)), best_metric=better(values) if values else None,
            metrics={k: float(v) for k, v in metrics.items()
                     if k in _HISTORY_METRICS and _num(v) is not None},
            time_s=float(metrics.get("time_total_s", 0.0)), node_id=metrics.get("node_id") or metrics.get("node_ip"),
            checkpoint_uri=(("s3://" if exp_uri.startswith("s3://") else "") + ckpt.path) if ckpt else None,
            history=history,
        ))
    ok = [t for t in trials if t.best_metric is not None]
    if not ok:
        errors = [_error_line(r.error) for r in grid if r.error][:1]
        # Every trial crashed: a bug or broken data rather than bad input (metric names are checked up front).
        raise RuntimeError(f"tuning {name}: no trial reported {cfg.metric!r}" + (f" (first error: {errors[0]})"
                                                                                   if errors else ""))
    best = (max if cfg.mode == "max" else min)(ok, key=lambda t: t.best_metric)
    best_iter = _best_iteration(best, cfg)
    result = TuningResult(
        experiment_name=name, experiment_uri=exp_uri, search=cfg.search, scheduler=cfg.scheduler,
        metric=cfg.metric, mode=cfg.mode, num_trials=len(trials), best_trial_id=best.trial_id,
        best_config=best.config, best_metric=float(best.best_metric), best_iteration=best_iter,
        best_checkpoint_uri=best.checkpoint_uri, resumed=resumed, wall_time_s=wall, trials=trials,
    )
    return _write_reports(result, fs, exp_path)


def _error_line(err: BaseException) -> str:
    """The trial's own exception in one line (Ray's first line is only its task header)."""
    cause = getattr(err, "cause", None)
    text = f"{type(cause).__name__}: {cause}" if isinstance(cause, BaseException) else str(err)
    lines = [ln.strip() for ln in re.sub(r"\x1b\[[0-9;]*m", "", text).splitlines() if ln.strip()]
    return (lines[0] if isinstance(cause, BaseException) else lines[-1]) if lines else type(err).__name__


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v):
        return None
    return float(v)


def _best_iteration(trial: TrialRecord, cfg: TuneConfig) -> int:
    """The iteration (round/epoch) at which the best trial peaked on the validation metric."""
    pts = [(h["training_iteration"], h[cfg.metric]) for h in trial.history if _num(h.get(cfg.metric)) is not None]
    if not pts:
        return max(1, trial.iterations)
    pick = max if cfg.mode == "max" else min
    return int(pick(pts, key=lambda p: p[1])[0])


def _import_plotting() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401

    import tuning_core.plots  # noqa: F401


def _write_reports(result: TuningResult, fs: pafs.FileSystem, exp_path: str) -> TuningResult:
    """Leaderboard (parquet + CSV) and learning curves (PNG) next to the experiment."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tuning_core.plots import parallel_coordinates_png

    board = pd.DataFrame(result.leaderboard_rows())
    prefix = "s3://" if result.experiment_uri.startswith("s3://") else ""
    buf = io.BytesIO()
    board.to_parquet(buf, index=False)
    with fs.open_output_stream(f"{exp_path}/leaderboard.parquet") as out:
        out.write(buf.getvalue())
    with fs.open_output_stream(f"{exp_path}/leaderboard.csv") as out:
        out.write(board.to_csv(index=False).encode())
    fig, ax = plt.subplots(figsize=(7, 4))
    for t in result.trials:
        xs = [h["training_iteration"] for h in t.history if _num(h.get(result.metric)) is not None]
        ys = [h[result.metric] for h in t.history if _num(h.get(result.metric)) is not None]
        ax.plot(xs, ys, lw=1.5 if t.trial_id == result.best_trial_id else 0.8,
                label=t.trial_id if t.trial_id == result.best_trial_id else None)
    ax.set_xlabel("iteration")
    ax.set_ylabel(f"validation {result.metric}")
    ax.set_title(f"{result.experiment_name}: {result.search} + {result.scheduler}")
    ax.legend(loc="best")
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    with fs.open_output_stream(f"{exp_path}/learning_curves.png") as out:
        out.write(png.getvalue())
    with fs.open_output_stream(f"{exp_path}/parallel_coordinates.png") as out:
        out.write(parallel_coordinates_png(result))
    return result.model_copy(update={"leaderboard_uri": f"{prefix}{exp_path}/leaderboard.parquet",
                                     "curves_png_uri": f"{prefix}{exp_path}/learning_curves.png",
                                     "parallel_png_uri": f"{prefix}{exp_path}/parallel_coordinates.png"})
