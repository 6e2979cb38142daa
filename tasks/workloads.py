"""Stage glue: how every stage calls its workload (``tuning_core.workloads``) and infra.

Plain functions (no Prefect here) so the Prefect tasks in ``tasks.stages`` stay a call or two,
and so tests and benchmarks can run a stage body without an orchestrator. Nothing here names a
workload: each stage looks the config's workload up in ``WORKLOADS`` and calls its protocol, which is
what lets one DAG serve them all.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from infra import models as mlmodels
from infra.ray_cluster import check_local_resources, ray_session, wait_until_settled, workers_hold_keys
from infra.settings import Settings
from infra.storage import Storage, build_storage, filesystem_for, redact, source_filesystem
from infra.tracking import TAG_STAGE, Tracker
from tuning_core.config import ParamSpec, config_hash
from tuning_core.errors import ConfigError
from tuning_core.results import DataVersion, RegistryResult, RetrainResult, TrialRecord, TuningResult
from tuning_core.runner import experiment_name, run_tuning, validate
from tuning_core.search import edge_configs
from tuning_core.sources import DataSource
from tuning_core.workloads import WORKLOADS, workload_of
from tuning_core.workloads.base import PART_ROWS, PipelineConfig, Splits, Workload
from tuning_core.workloads.base import plain_features as plain_features  # re-exported: scoring and tests use it

log = logging.getLogger(__name__)

# Any workload's config model (see tuning_core.workloads.base.PipelineConfig).
Pipeline = PipelineConfig

# Extra listeners for tuning progress events (the CLI's progress bar registers one).
PROGRESS_LISTENERS: list[Callable[[dict[str, Any]], None]] = []


@dataclass
class Context:
    """Settings and the clients built from them for one stage."""

    settings: Settings
    storage: Storage

    @classmethod
    def build(cls, settings: Settings) -> Context:
        return cls(settings=settings, storage=build_storage(settings))

    def tracker(self) -> Tracker:
        return Tracker(self.settings, self.storage)

    def source(self, cfg: Pipeline) -> tuple[DataSource, pafs.FileSystem]:
        """The config's data source, parsed once by its workload, and the filesystem that reads it."""
        source = workload_of(cfg).data_source(cfg)
        return source, source_filesystem(source, self.settings)


def tune_config_hash(cfg: Pipeline) -> str:
    """Hash of what determines the tuning experiment (not the registry options)."""
    return config_hash(cfg.tune)


def experiment_for(cfg: Pipeline, version: DataVersion) -> str:
    """Same data + same tuning config (warm-start points included) → same, resumable experiment."""
    return experiment_name(cfg.workload, version.version, tune_config_hash(cfg), cfg.run_id)


def with_warm_start(cfg: Pipeline, warm_start: list[dict[str, Any]] | None) -> Pipeline:
    """The config with the champion's config tried first (``points_to_evaluate``)."""
    if not warm_start:
        return cfg
    space = workload_of(cfg).space(cfg)
    keep = [{k: v for k, v in p.items() if k in space and not isinstance(space[k], (str, int, float, bool))}
            for p in warm_start]
    points = [*keep, *(cfg.tune.points_to_evaluate or [])]
    return cfg.model_copy(update={"tune": cfg.tune.model_copy(update={"points_to_evaluate": points})})


def workload_for_model(ctx: Context, model_name: str, alias: str) -> Workload:
    """The workload whose pipeline registered ``model_name@alias`` (batch scoring picks its reader by it)."""
    name = ctx.tracker().model_workload(model_name, alias)
    if name not in WORKLOADS:
        raise ConfigError(f"model {model_name}@{alias}: registered by workload {name!r}, expected one of "
                          f"{sorted(WORKLOADS)}")
    return WORKLOADS[name]


def mlflow_experiment(cfg: Pipeline) -> str:
    return f"tunepipe-{cfg.workload}"


def warm_up(settings: Settings | None = None, cfg: Pipeline | None = None) -> None:
    """Start what the tune stage needs ahead of it: the embedded default's local Ray comes up in
    the background while preflight and data preparation run (no-op on a cluster), its workers
    importing ``cfg``'s trainable libraries (``Workload.worker_preload``)."""
    from infra.ray_cluster import start_in_background
    from infra.settings import get_settings

    preload = workload_of(cfg).worker_preload if cfg is not None else ()
    start_in_background(settings or get_settings(), preload=preload)


class StageClock:
    """Wall seconds of each stage of a run, in order: ``with clock("tune_s"): ...``."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.timings: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.monotonic()
        try:
            yield
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.monotonic() - start

    def total(self) -> dict[str, float]:
        return {**self.timings, "total_s": time.monotonic() - self.started}


def preflight(cfg: Pipeline, ctx: Context, warm: bool = False) -> Pipeline:
    """Everything that can be checked before a byte is written: space, names, data source, tracking,
    storage. Returns the config completed from the data (``Workload.resolve``; unchanged for most).

    ``warm``: once the config, space and data source have passed (what bad input gets wrong), start
    the local Ray in the background (``warm_up``), so that its ~3 s of start-up overlap the tracking
    check (MLflow's imports and store, ~1 s) and all that follows before the tune stage. A failing
    tracking check then stops it again (``infra.ray_cluster.stop_started_ahead``, the caller's)."""
    workload = workload_of(cfg)
    workload.check_installed()
    source, source_fs = ctx.source(cfg)
    cfg = workload.resolve(cfg, source, source_fs)
    space = workload.space(cfg)
    validate(cfg.tune, space)
    reported = workload.reported_metrics(cfg)
    if cfg.tune.metric not in reported:
        raise ConfigError(f"tune.metric {cfg.tune.metric!r}: the {cfg.workload} trainable reports {list(reported)}")
    tested = workload.test_metrics(cfg)
    if cfg.registry.metric not in tested:
        raise ConfigError(f"registry.metric {cfg.registry.metric!r}: the {cfg.workload} model is evaluated on the "
                          f"test split with {list(tested)}; expected one of them")
    check_trial_configs(cfg, space)
    res = cfg.tune.resources  # a data-parallel trial holds its workers' CPUs (Ray Train places them)
    cpu, gpu = (res.workers_per_trial * res.cpu_per_worker, 0.0) if res.data_parallel else (res.cpu, res.gpu)
    check_local_resources(ctx.settings, cpu, gpu)
    workload.check_data(cfg, source, source_fs)
    if warm:
        warm_up(ctx.settings, cfg)
    ctx.tracker().check()
    return cfg


def check_trial_configs(cfg: Pipeline, space: dict[str, Any]) -> None:
    """The trainable's own check of the space's edges and of every warm-start point: a misspelt or
    out-of-bounds hyperparameter fails here, not silently ignored or crashing every trial."""
    edges = edge_configs(space)
    configs = list(edges)
    configs += [(f"points_to_evaluate[{i}]", {**edges[0][1], **point})
                for i, point in enumerate(cfg.tune.points_to_evaluate or [])]
    # PBT's explicit mutations put their own names and values into trial configs.
    mutations = cfg.tune.scheduler_options.hyperparam_mutations if cfg.tune.scheduler == "pbt" else None
    as_space = {k: v if isinstance(v, ParamSpec) else ParamSpec(type="choice", values=list(v))
                for k, v in (mutations or {}).items()}
    configs += [(f"scheduler_options.hyperparam_mutations, {where}", {**edges[0][1], **config})
                for where, config in (edge_configs(as_space) if as_space else [])]
    workload_of(cfg).check_configs(configs)


def check_data(cfg: Pipeline, ctx: Context) -> None:
    """Cheap checks of the data source (paths, archives, headers), so bad input fails before Prefect or Ray start."""
    workload_of(cfg).check_data(cfg, *ctx.source(cfg))


# --------------------------------------------------------------------------- prepare
def prepare(cfg: Pipeline, ctx: Context) -> DataVersion:
    source, source_fs = ctx.source(cfg)
    workload = workload_of(cfg)
    with _ray_for_prepare(cfg, ctx, workload, source, source_fs) as ray_fs:
        return workload.prepare(cfg, source, source_fs, ctx.storage.fs, ctx.storage.root, ray_fs=ray_fs)


@contextlib.contextmanager
def _ray_for_prepare(cfg: Pipeline, ctx: Context, workload: Workload, source: DataSource,
                     source_fs: pafs.FileSystem) -> Iterator[pafs.FileSystem | None]:
    """Where the workload reads an S3 source with Ray tasks: Ray, connected as the tune stage connects
    (a cluster joined with the keys in its workers' ``runtime_env``), and the filesystem the tasks get,
    without keys when the workers hold them. Else nothing (None: the workload reads ``source_fs``).

    A Ray already running (the one started ahead of the tune stage, or the caller's) is used as it
    is and left running; one this stage connects is let go when the data is read.
    """
    if not source.is_s3:
        yield None
        return
    # Before asking: whether Ray is running decides data.engine auto and whether a session is needed.
    wait_until_settled()
    if not workload.prepares_on_ray(cfg, source, source_fs):
        yield None
        return
    import ray

    with contextlib.nullcontext() if ray.is_initialized() else ray_session(ctx.settings, ctx.storage):
        keyless = workers_hold_keys(ctx.settings)
        yield source_filesystem(source, ctx.settings, with_keys=not keyless)


def _load(cfg: Pipeline, ctx: Context, version: DataVersion, split: str) -> Any:
    return workload_of(cfg).load_split(ctx.storage.fs, version, split)


def _splits(cfg: Pipeline, ctx: Context, version: DataVersion, names: tuple[str, ...] = ("train", "valid", "test"),
            fs: pafs.FileSystem | None = None) -> Splits:
    # Loaded when a workload asks: data-parallel trials and retrains read their shards from ``fs`` instead.
    workload = workload_of(cfg)
    return Splits(lambda name: _load(cfg, ctx, version, name), names, fs,
                  head=lambda name, rows: workload.load_head(ctx.storage.fs, version, name, rows),
                  in_parts=lambda name, rows: workload.load_parts(ctx.storage.fs, version, name, rows))


def _ray_fs(ctx: Context) -> pafs.FileSystem:
    keyless = ctx.storage.is_s3 and workers_hold_keys(ctx.settings)
    return ctx.storage.fs_for_ray(ctx.settings) if keyless else ctx.storage.fs


# --------------------------------------------------------------------------- tune
def tune(cfg: Pipeline, ctx: Context, version: DataVersion,
         progress: Callable[[dict[str, Any]], None] | None = None) -> TuningResult:
    """Run or resume the Ray Tune experiment, then log one MLflow child run per trial."""
    workload = workload_of(cfg)
    trainable, space = workload.trainable(cfg), workload.space(cfg)
    tune_cfg = cfg.tune
    name = experiment_for(cfg, version)
    tracker = ctx.tracker()

    mutated = []
    if tune_cfg.scheduler == "pbt":
        from tuning_core.schedulers import pbt_mutations

        mutated = sorted(pbt_mutations(tune_cfg, space))
    logged: dict[str, int] = {}  # trial id -> iterations written to its child run during the tuning

    # MLflow is written from one thread while the driver mostly waits on Ray: the parent run while
    # the trials start (in the flow's context, so that it is tagged with the flow run), then each
    # trial's child run as it finishes. What fails there (MLflow unreachable) is written after the
    # tuning, where an error fails the stage.
    with ThreadPoolExecutor(1, thread_name_prefix="tunepipe-mlflow") as pool:
        parent_future = pool.submit(contextvars.copy_context().run, parent_run, cfg, ctx, version, name, tracker)

        def log_live(record: TrialRecord) -> None:
            try:
                tracker.log_trial(parent_future.result(), record, tune_cfg.metric, name, mutated)
                logged[record.trial_id] = record.iterations
            except Exception:  # noqa: BLE001 - the pass after the tuning writes it or fails the stage
                log.debug("trial %s: child run not written during the tuning", record.trial_id, exc_info=True)

        def fan_out(event: dict[str, Any]) -> None:
            if event.get("record") is not None:
                pool.submit(log_live, TrialRecord.model_validate(event["record"]))
            for listener in [progress, *PROGRESS_LISTENERS]:
                if listener is not None:
                    listener(event)

        with ray_session(ctx.settings, ctx.storage):
            fs = _ray_fs(ctx)
            data = workload.tune_data(cfg, version, _splits(cfg, ctx, version, ("train", "valid"), fs))
            result = run_tuning(trainable, data, space, tune_cfg, fs, ctx.storage.path("ray"), name,
                                progress=fan_out, uri_prefix="s3://" if ctx.storage.is_s3 else "")
        parent = parent_future.result()
    tracker.log_trials(parent, result, mutated=mutated, logged=logged)
    tracker.touch(parent)
  # keeps the parent's end time after its trials'
    return result


def parent_run(cfg: Pipeline, ctx: Context, version: DataVersion, name: str, tracker: Tracker) -> str:
    from prefect.runtime import flow_run  # optional context; empty outside a flow

    tags = {
        "data_version": version.version, "data_uri": version.uri, "config_hash": config_hash(cfg),
        "tune_config_hash": tune_config_hash(cfg), "experiment_uri": ctx.storage.to_uri(ctx.storage.path("ray", name)),
        "workload": cfg.workload,
    }
    if flow_run.id:
        tags["prefect_flow_run_id"] = flow_run.id
    return tracker.parent_run(mlflow_experiment(cfg), name, tags, run_name=name)


# --------------------------------------------------------------------------- retrain
def _download_checkpoint(ctx: Context, uri: str, dest: Path) -> Path:
    fs, path = filesystem_for(uri, ctx.settings)
    dest.mkdir(parents=True, exist_ok=True)
    pafs.copy_files(path, str(dest), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return dest


def retrain(cfg: Pipeline, ctx: Context, version: DataVersion, tuning: TuningResult) -> RetrainResult:
    """Retrain (or take the winning checkpoint), evaluate against the default model, log everything."""
    tracker = ctx.tracker()
    parent = parent_run(cfg, ctx, version, tuning.experiment_name, tracker)
    run_id, existed = tracker.child_run(parent, TAG_STAGE, "retrain", "retrain")
    if existed:
        done = tracker.client.get_run(run_id)
        if done.info.status == "FINISHED" and "tunepipe.model_uri" in done.data.tags:
            return _retrain_result(done, tracker)
    # What does not depend on the final model (the winning checkpoint, the search's plots and
    # leaderboard) is logged from a second thread while the model trains in xgboost's or torch's.
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(1, thread_name_prefix="tunepipe-mlflow") as pool:
        ckpt_dir = None
        if tuning.best_checkpoint_uri:
            ckpt_dir = _download_checkpoint(ctx, tuning.best_checkpoint_uri, Path(tmp, "best_checkpoint"))
        views = pool.submit(_log_search_views, ctx, tracker, run_id, parent, tuning, ckpt_dir)
        workload = workload_of(cfg)
        if cfg.tune.resources.data_parallel:  # the winner retrains on the same Ray Train workers
            with ray_session(ctx.settings, ctx.storage):
                splits = _splits(cfg, ctx, version, fs=_ray_fs(ctx))
                final = workload.retrain(cfg, version, tuning, splits, ckpt_dir)
        else:
            splits = _splits(cfg, ctx, version)
            final = workload.retrain(cfg, version, tuning, splits, ckpt_dir)
        model_dir = Path(tmp, "model")
        model_dir.mkdir()
        spec = workload.model_spec(cfg, version, tuning, final, splits, model_dir)
        # The test metrics go in with the model, linked to it and to the test split.
        model_uri = tracker.log_model(run_id, spec)
        views.result()
    params = {**{f"best.{k}": v for k, v in tuning.best_config.items()}, "rounds": final.rounds,
              "source": final.source, "best_trial_id": tuning.best_trial_id}
    tracker.log_params(run_id, params)  # those already there stay (MLflow params are immutable)
    if final.plots:
        tracker.log_files(run_id, final.plots)
    tracker.set_tags(run_id, {"tunepipe.model_uri": model_uri, "tunepipe.best_config": json.dumps(tuning.best_config),
                              "tunepipe.checkpoint_uri": tuning.best_checkpoint_uri or "",
                              "data_version": version.version, "tunepipe.test_metrics": json.dumps(final.test_metrics),
                              "tunepipe.baseline_test_metrics": json.dumps(final.baseline_test_metrics),
                              "tunepipe.fit_s": f"{final.fit_s:.3f}"})
    tracker.finish(run_id)
    tracker.finish(parent)
    return _retrain_result(tracker.client.get_run(run_id), tracker)


def _log_search_views(ctx: Context, tracker: Tracker, run_id: str, parent: str, tuning: TuningResult,
                      ckpt_dir: Path | None) -> None:
    """The winning checkpoint on the parent run; the leaderboard and the search's plots on the retrain
    run (the parallel coordinates also on the parent, whose children are the trials)."""
    if ckpt_dir is not None:
        tracker.log_dir(parent, ckpt_dir, "best_checkpoint")
    board = json.dumps(tuning.leaderboard_rows(), default=str, indent=1).encode()
    plots = {"leaderboard.json": board}
    for name, uri in (("learning_curves.png", tuning.curves_png_uri), ("parallel_coordinates.png",
                                                                      tuning.parallel_png_uri)):
        if uri:
            fs, p = filesystem_for(uri, ctx.settings)
            with fs.open_input_stream(p) as f:
                plots[name] = f.read()
    tracker.log_files(run_id, plots)
    if "parallel_coordinates.png" in plots:
        tracker.log_files(parent, {"parallel_coordinates.png": plots["parallel_coordinates.png"]})


def _retrain_result(run: Any, tracker: Tracker) -> RetrainResult:
    tags = run.data.tags
    test = json.loads(tags["tunepipe.test_metrics"])
    base = json.loads(tags["tunepipe.baseline_test_metrics"])
    return RetrainResult(mlflow_run_id=run.info.run_id, model_uri=tags["tunepipe.model_uri"], test_metrics=test,
                         baseline_test_metrics=base, uplift={k: test[k] - base[k] for k in test if k in base},
                         rounds=int(run.data.params.get("rounds", 0)),
                         fit_s=float(tags.get("tunepipe.fit_s", 0.0)))


# --------------------------------------------------------------------------- register
def score_version(cfg: Pipeline, ctx: Context, version: DataVersion, model_uri: str) -> float:
    """The registry metric of any registered model on today's test split (champion re-evaluation), read
    part by part (``Workload.load_parts``): the driver never holds a large test split whole."""
    workload = workload_of(cfg)
    with mlmodels.loaded_pyfunc(model_uri) as model:
        metrics = workload.score(model, version, workload.load_parts(ctx.storage.fs, version, "test", PART_ROWS))
    return float(metrics[cfg.registry.metric])


def register(cfg: Pipeline, ctx: Context, version: DataVersion, tuning: TuningResult,
             retrained: RetrainResult) -> RegistryResult:
    tracker = ctx.tracker()
    reg = cfg.registry
    if reg.metric not in retrained.test_metrics:
        raise ConfigError(f"registry.metric {reg.metric!r}: not a test metric, expected one of "
                          f"{sorted(retrained.test_metrics)}")
    value = retrained.test_metrics[reg.metric]
    tags = {"data_version": version.version, "parent_run": tracker.client.get_run(retrained.mlflow_run_id)
            .data.tags.get("mlflow.parentRunId", ""), "experiment_uri": tuning.experiment_uri,
            f"test_{reg.metric}": f"{value:.6f}", "tunepipe.best_config": json.dumps(tuning.best_config),
            "tunepipe.checkpoint_uri": tuning.best_checkpoint_uri or "", "tunepipe.workload": cfg.workload}
    mv = tracker.register(reg.model_name, retrained.mlflow_run_id, retrained.model_uri, tags)
    return tracker.gate(reg.model_name, mv, value, reg.metric, reg.mode, reg.promotion_margin,
                        lambda uri: score_version(cfg, ctx, version, uri), force=reg.force_promote)


def champion_warm_start(cfg: Pipeline, ctx: Context) -> list[dict[str, Any]] | None:
    if not cfg.warm_start_from_champion:
        return None
    champ = ctx.tracker().champion_config(cfg.registry.model_name)
    return [champ] if champ else None


# --------------------------------------------------------------------------- report
def summary(cfg: Pipeline, version: DataVersion, tuning: TuningResult, retrained: RetrainResult,
            registry: RegistryResult, ctx: Context, timings: dict[str, float] | None = None) -> dict[str, Any]:
    """The machine-readable summary (``--summary-json``); nothing secret goes in here."""
    tracker = ctx.tracker()
    return {
        "workload": cfg.workload,
        "data": {"version": version.version, "uri": version.uri, "schema": version.schema_name, "rows": version.rows},
        "tuning": {"experiment_uri": tuning.experiment_uri, "num_trials": tuning.num_trials, "search": tuning.search,
                   "scheduler": tuning.scheduler, "best_config": tuning.best_config,
                   "best_metric": {"name": tuning.metric, "value": tuning.best_metric},
                   "best_iteration": tuning.best_iteration, "resumed": tuning.resumed,
                   "wall_time_s": round(tuning.wall_time_s, 2), "leaderboard_uri": tuning.leaderboard_uri},
        "retrain": {"mlflow_run_id": retrained.mlflow_run_id, "model_uri": retrained.model_uri,
                    "test_metrics": retrained.test_metrics, "baseline_test_metrics": retrained.baseline_test_metrics,
                    "uplift": retrained.uplift, "rounds": retrained.rounds, "fit_s": round(retrained.fit_s, 2),
                    "run_url": tracker.run_url(retrained.mlflow_run_id)},
        "registry": {"model_name": registry.model_name, "version": registry.version, "aliases": registry.aliases,
                     "promoted": registry.promoted, "decision": registry.decision,
                     "champion_before": registry.champion_before},
        "mlflow_tracking_uri": redact(tracker.uri),
        "timings": {k: round(v, 2) for k, v in (timings or {}).items()},
    }


def report_markdown(s: dict[str, Any]) -> str:
    t, r, g = s["tuning"], s["retrain"], s["registry"]
    rows = "\n".join(f"| {k} | {r['test_metrics'][k]:.4f} | {r['baseline_test_metrics'].get(k, float('nan')):.4f} | "
                     f"{r['uplift'].get(k, float('nan')):+.4f} |" for k in r["test_metrics"])
    cfg = "\n".join(f"| {k} | {v} |" for k, v in t["best_config"].items())
    times = s.get("timings") or {}
    stage_times = "\n".join(f"| {k.removesuffix('_s')} | {v:.1f} |" for k, v in times.items())
    return f"""# tunepipe {s['workload']}: {g['model_name']} v{g['version']}

**Registry decision:** {g['decision']} (aliases: {', '.join(g['aliases']) or 'none'})

| data version | rows | experiment | trials | search + scheduler | best val {t['best_metric']['name']} | resumed |
|---|---|---|---|---|---|---|
| `{s['data']['version']}` | {s['data']['rows']} | `{t['experiment_uri']}` | {t['num_trials']} | {t['search']} + {t['scheduler']} | {t['best_metric']['value']:.4f} | {t['resumed']} |

## Test metrics (tuned vs untuned default)
| metric | tuned | default | uplift |
|---|---|---|---|
{rows}

## Best configuration
| param | value |
|---|---|
{cfg}

## Stage wall times (s)
| stage | seconds |
|---|---|
{stage_times}

Links: MLflow run `{r['mlflow_run_id']}` ({r['run_url']}); model `models:/{g['model_name']}/{g['version']}`;
experiment `{t['experiment_uri']}`.
"""
