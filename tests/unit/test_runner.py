"""The Ray Tune stage: searchers x schedulers, seeding, fault tolerance, resume after a crash,
S3 storage, and the reports written next to the experiment.

Real parts only: the session's local Ray (2 CPUs), the XGBoost trainable on a small data
version built from the real ASA 2008 sample, local storage in tmp folders and moto for S3.
Budgets are tiny (a few trials of a few boosting rounds): these tests check the plumbing,
not the quality of the models.
"""

from __future__ import annotations

import io
import json
import math
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.fs as pafs
import pytest

from tests.conftest import ASA_SAMPLE, ROOT
from tests.faults import failing
from tuning_core.config import FlightsData, ParamSpec, TuneConfig, build_config
from tuning_core.data import flights
from tuning_core.errors import ConfigError
from tuning_core.results import TuningResult
from tuning_core.runner import run_tuning
from tuning_core.trainables.xgboost import MODEL_FILE, train_xgboost

LOCAL = pafs.LocalFileSystem()

RANGE_SPACE: dict[str, Any] = {
    "max_depth": {"type": "randint", "low": 2, "high": 5},
    "eta": {"type": "loguniform", "low": 0.05, "high": 0.5},
    "subsample": {"type": "uniform", "low": 0.6, "high": 1.0},
    # A tuned max_bin must reach the training matrix too (xgboost rejects a mismatch).
    "max_bin": {"type": "choice", "values": [32, 64]},
    "tree_method": "hist",
}
# Grid search enumerates grid/choice entries only: 3 x 1 = 3 trials per sample.
GRID_SPACE: dict[str, Any] = {
    "max_depth": {"type": "grid", "values": [2, 3, 4]},
    "eta": {"type": "choice", "values": [0.3]},
}


def tune_cfg(**kw: Any) -> TuneConfig:
    # One trial at a time: on 2 cores, starting a second trial actor costs more than these tiny trials.
    base = {"search": "random", "scheduler": "fifo", "num_samples": 3, "max_iterations": 5, "checkpoint_every": 5,
            "space": RANGE_SPACE, "max_failures": 1, "max_concurrent_trials": 1}
    return build_config(TuneConfig, {**base, **kw})


@pytest.fixture(scope="module")
def version(tmp_path_factory) -> Any:
    """A small real flights data version (4,000 labelled rows of the ASA 2008 sample)."""
    root = tmp_path_factory.mktemp("store")
    return flights.prepare(FlightsData(source=str(ASA_SAMPLE), max_rows=4000), LOCAL, str(ASA_SAMPLE), LOCAL,
                           str(root))


@pytest.fixture(scope="module")
def data(version) -> dict[str, pd.DataFrame]:
    return {split: flights.load_split(LOCAL, version.path, split) for split in ("train", "valid")}


@pytest.fixture(scope="module")
def ray_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ray")


@pytest.fixture(scope="module")
def tuned(ray_local, data, ray_dir):
    """Run each (search, scheduler) pair at most once per module; tests share the results."""
    cache: dict[tuple[str, str], TuningResult] = {}

    def run(search: str, scheduler: str) -> TuningResult:
        if (search, scheduler) not in cache:
            cfg = tune_cfg(search=search, scheduler=scheduler, num_samples=1 if search == "grid" else 3,
                           space=GRID_SPACE if search == "grid" else RANGE_SPACE)
            cache[(search, scheduler)] = run_tuning(train_xgboost, data, cfg.space, cfg, LOCAL, str(ray_dir),
                                                    f"m-{search}-{scheduler}")
        return cache[(search, scheduler)]

    return run


def in_space(config: dict[str, Any], space: dict[str, ParamSpec | Any]) -> bool:
    """True when every key of ``space`` is in ``config`` with a value the entry can produce."""
    for key, entry in space.items():
        if key not in config:
            return False
        value = config[key]
        if not isinstance(entry, ParamSpec):
            if value != entry:
                return False
        elif entry.type in ("choice", "grid"):
            if value not in entry.values:
                return False
        elif entry.type == "randint":
            if int(value) != value or not entry.low <= value < entry.high:
                return False
        elif not entry.low <= value <= entry.high:
            return False
    return True


def config_key(config: dict[str, Any]) -> tuple:
    return tuple(sorted((k, round(v, 12) if isinstance(v, float) else v) for k, v in config.items()))


def latest_checkpoint(trial_dir: Path) -> Path:
    return max(trial_dir.glob("checkpoint_*"), key=lambda p: p.name)


# --------------------------------------------------------------------------- searchers x schedulers


@pytest.mark.parametrize("scheduler", ["asha", "fifo"])
@pytest.mark.parametrize("search", ["random", "grid", "hyperopt", "optuna"])
def test_every_searcher_finishes_with_a_best_config_inside_the_space(tuned, search, scheduler):
    result = tuned(search, scheduler)
    cfg = tune_cfg(space=GRID_SPACE if search == "grid" else RANGE_SPACE)
    assert result.search == search and result.scheduler == scheduler
    assert result.num_trials == 3 == len(result.trials)
    assert not result.resumed
    assert in_space(result.best_config, cfg.space), result.best_config
    assert all(in_space(t.config, cfg.space) for t in result.trials)
    # Control keys (_max_iterations, ...) never leak into reported configs.
    assert not any(k.startswith("_") for t in result.trials for k in t.config)
    assert 0.5 < result.best_metric <= 1.0  # validation AUC of a real model
    assert 1 <= result.best_iteration <= 5
    assert all(t.status == "TERMINATED" for t in result.trials)
    if scheduler == "fifo":
        assert all(t.iterations == 5 for t in result.trials)
    else:
        assert max(t.iterations for t in result.trials) == 5
    if search == "grid":
        assert sorted(t.config["max_depth"] for t in result.trials) == [2, 3, 4]


@pytest.mark.parametrize("search", ["random", "hyperopt", "optuna"])
def test_same_seed_proposes_the_same_configs(tuned, search):
    # Two experiments (different names) with the same seed. They differ in scheduler too, which
    # must not matter here: 3 trials stay within the searchers' random start-up points (>= 4), so
    # the proposals do not depend on the (scheduler-dependent) results.
    first, again = tuned(search, "fifo"), tuned(search, "asha")
    assert first.experiment_name != again.experiment_name
    assert {t.trial_id for t in again.trials}.isdisjoint({t.trial_id for t in first.trials})
    assert sorted(config_key(t.config) for t in again.trials) == sorted(config_key(t.config) for t in first.trials)


def test_another_seed_proposes_other_configs(tuned, data, ray_dir):
    first = tuned("random", "fifo")
    cfg = tune_cfg(search="random", seed=1, max_iterations=1)
    other = run_tuning(train_xgboost, data, cfg.space, cfg, LOCAL, str(ray_dir), "seed-other")
    assert sorted(config_key(t.config) for t in other.trials) != sorted(config_key(t.config) for t in first.trials)


def test_one_run_builds_its_searcher_and_scheduler_once_and_tunes_with_them(ray_local, data, tmp_path,
                                                                             monkeypatch):
    from tuning_core.runner import validate
    from tuning_core.schedulers import SCHEDULERS
    from tuning_core.search import SEARCHERS

    built: dict[str, list[Any]] = {"searcher": [], "scheduler": []}

    def counting(kind: str, make: Any) -> Any:
        def build(*args: Any) -> Any:
            built[kind].append(make(*args))
            return built[kind][-1]
        return build

    monkeypatch.setitem(SEARCHERS, "hyperopt", counting("searcher", SEARCHERS["hyperopt"]))
    monkeypatch.setitem(SCHEDULERS, "asha", counting("scheduler", SCHEDULERS["asha"]))
    cfg = tune_cfg(search="hyperopt", scheduler="asha", num_samples=2, max_iterations=2)
    # As a CLI run does: its own preflight, the flow's preflight, then the tune stage.
    assert validate(cfg, cfg.space) == validate(cfg, cfg.space)
    result = run_tuning(train_xgboost, data, cfg.space, cfg, LOCAL, str(tmp_path / "ray"), "built-once")
    assert result.num_trials == 2
    assert [len(built["searcher"]), len(built["scheduler"])] == [1, 1]
    # The one searcher built is the one that proposed the trials (TPE saw their results).
    assert len(built["searcher"][0].searcher._hpopt_trials.trials) == 2  # noqa: SLF001
    # Used plans are not handed out again: a second run builds its own.
    run_tuning(train_xgboost, data, cfg.space, cfg, LOCAL, str(tmp_path / "ray2"), "built-again")
    assert [len(built["searcher"]), len(built["scheduler"])] == [2, 2]


@pytest.mark.parametrize("scheduler", ["hyperband", "median"])
def test_early_stopping_schedulers_run_to_a_result(ray_local, data, tmp_path, scheduler):
    cfg = tune_cfg(scheduler=scheduler, num_samples=3, max_iterations=6)
    result = run_tuning(train_xgboost, data, cfg.space, cfg, LOCAL, str(tmp_path / "ray"), f"s-{scheduler}")
    assert result.num_trials == 3
    assert all(1 <= t.iterations <= 6 for t in result.trials)
    assert max(t.iterations for t in result.trials) == 6
    assert in_space(result.best_config, cfg.space)


def test_hyperband_with_a_model_based_searcher_stops_the_poor_trial(ray_local, data, tmp_path):
    """HyperOpt proposes HyperBand's trials together (its usual cap of 2 would refill the first bracket,
    which never halves): max_t 4, eta 4 puts the first two trials in that bracket and the next two in one
    that halves at round 1, where the poor configuration stops."""
    good, poor = {"max_depth": 4, "eta": 0.5}, {"max_depth": 2, "eta": 0.05}
    cfg = tune_cfg(search="hyperopt", scheduler="hyperband", num_samples=4, max_iterations=4, checkpoint_every=1,
                   max_concurrent_trials=None, metric="logloss", mode="min",
                   space={k: RANGE_SPACE[k] for k in ("max_depth", "eta", "tree_method")},
                   scheduler_options={"reduction_factor": 4}, points_to_evaluate=[good, good, good, poor])
    result = run_tuning(train_xgboost, data, cfg.space, cfg, LOCAL, str(tmp_path / "ray"), "hb-hyperopt")
    iterations = sorted((round(t.config["eta"], 2), t.iterations) for t in result.trials)
    assert iterations == [(0.05, 1), (0.5, 4), (0.5, 4), (0.5, 4)], iterations


def test_pbt_exploits_and_xgboost_continues_from_the_cloned_checkpoint(ray_local, data, tmp_path):
    import xgboost as xgb

    # Each trial takes both CPUs, so the two trials take turns: PBT pauses a trial at every
    # perturbation while the other waits, so they are compared at every perturbation instead of
    # one racing to the end while the other's actor starts (then nothing would be exploited).
    cfg = tune_cfg(scheduler="pbt", num_samples=2, max_iterations=8, checkpoint_every=2, resources={"cpu": 2},
                   max_concurrent_trials=None,  # the population is the set of live trials
                   scheduler_options={"perturbation_interval": 2, "quantile_fraction": 0.5})
    result = run_tuning(train_xgboost, data, cfg.space, cfg, LOCAL, str(tmp_path / "ray"), "pbt")
    assert result.num_trials == 2
    assert all(t.status == "TERMINATED" and t.iterations == 8 for t in result.trials)
    exp_dir = Path(result.experiment_uri)
    # PBT's log of exploits: [target, clone, target_iter, clone_iter, old_config, new_config] per line.
    exploits = [json.loads(line) for line in (exp_dir / "pbt_global.txt").read_text().splitlines()]
    assert exploits
    assert any(old["eta"] != new["eta"] for *_, old, new in exploits)
    for t in result.trials:
        # One history row per iteration, although the trials were paused, restored and cloned.
        assert [h["training_iteration"] for h in t.history] == list(range(1, 9))
        assert in_space(t.config, cfg.space), t.config  # perturbations stay inside the ranges
        # An exploiting trial continues from the clone's booster, so boosting rounds keep pace with
        # iterations: the last checkpoint holds exactly as many rounds as the trial ran iterations.
        ckpt = latest_checkpoint(exp_dir / f"trial_{t.trial_id}")
        assert xgb.Booster(model_file=str(ckpt / MODEL_FILE)).num_boosted_rounds() == 8


# --------------------------------------------------------------------------- faults


def test_failing_trial_is_retried_and_completes(ray_local, data, tmp_path):
    marker = tmp_path / "failed-once"
    cfg = tune_cfg(num_samples=1, max_iterations=4, max_failures=1)
    result = run_tuning(failing(train_xgboost, marker), data, cfg.space, cfg, LOCAL, str(tmp_path / "ray"), "fault")
    assert marker.exists()  # the first attempt did raise
    (trial,) = result.trials
    assert trial.status == "TERMINATED"
    assert trial.iterations == 4
    assert [h["training_iteration"] for h in trial.history] == [1, 2, 3, 4]
    trial_dir = Path(result.experiment_uri) / f"trial_{trial.trial_id}"
    assert "injected trial failure" in (trial_dir / "error.txt").read_text()


def test_trial_failing_beyond_max_failures_is_reported_not_hidden(ray_local, data, tmp_path):
    # max_failures=0: the injected failure is final; with no trial reporting, the run is an error.
    cfg = tune_cfg(num_samples=1, max_iterations=3, max_failures=0)
    with pytest.raises(RuntimeError) as err:
        run_tuning(failing(train_xgboost, tmp_path / "m"), data, cfg.space, cfg, LOCAL, str(tmp_path / "ray"),
                   "fault-final")
    # One readable line naming the trial's own exception (not Ray's task header with colour codes).
    msg = str(err.value)
    assert "no trial reported 'auc' (first error: RuntimeError: injected trial failure" in msg, msg
    assert "\n" not in msg and "\x1b" not in msg


class _RestartedTrial:
    """What Ray's file loggers read of a trial that restarts from its checkpoint after a failure."""

    def __init__(self, staging: Path, storage: Path) -> None:
        self.config, self.local_path, self.checkpoint = {"eta": 0.1}, str(staging), object()
        self.storage = type("Storage", (), {"trial_fs_path": str(storage), "storage_filesystem": LOCAL})()
        self.init_local_path()

    def init_local_path(self) -> None:
        Path(self.local_path).mkdir(parents=True, exist_ok=True)


def _restart_and_log(logger: Any, trial: _RestartedTrial, iteration: int) -> list[int]:
    logger.log_trial_start(trial)
    logger.log_trial_result(iteration, trial, {"training_iteration": iteration})
    logger.log_trial_end(trial)
    return [json.loads(ln)["training_iteration"] for ln in (Path(trial.local_path) / "result.json").open()]


def test_a_trial_restarted_from_its_checkpoint_keeps_the_results_the_driver_logged_before(tmp_path):
    from ray.tune.logger import JsonLoggerCallback

    from tuning_core.runner import _file_loggers

    def restarted(where: str) -> _RestartedTrial:
        # Storage holds the copy of the last experiment snapshot (taken before any result); the
        # driver's staging file already has the rounds 10 and 20 the trial reported before its worker died.
        trial = _RestartedTrial(tmp_path / where / "staging", tmp_path / where / "storage")
        Path(trial.storage.trial_fs_path).mkdir(parents=True)
        (Path(trial.storage.trial_fs_path) / "result.json").write_text("")
        (Path(trial.local_path) / "result.json").write_text('{"training_iteration": 10}\n{"training_iteration": 20}\n')
        return trial

    (json_logger,) = [cb for cb in _file_loggers() if isinstance(cb, JsonLoggerCallback)]
    assert _restart_and_log(json_logger, restarted("ours"), 30) == [10, 20, 30]
    # Ray's own logger replaces the driver's file with storage's stale copy (the case this guards).
    assert _restart_and_log(JsonLoggerCallback(), restarted("ray"), 30) == [30]
    # A restored experiment starts in a new staging folder: there storage's copy is the history.
    fresh = _RestartedTrial(tmp_path / "fresh" / "staging", tmp_path / "ours" / "storage")
    (Path(fresh.storage.trial_fs_path) / "result.json").write_text('{"training_iteration": 10}\n')
    assert _restart_and_log(json_logger, fresh, 20) == [10, 20]


# --------------------------------------------------------------------------- resume after a crash


def _terminated(exp_dir: Path) -> set[str]:
    """Trials recorded as TERMINATED in the newest experiment state (what a restore reads)."""
    states = sorted(exp_dir.glob("experiment_state-*.json"))
    if not states:
        return set()
    try:
        state = json.loads(states[-1].read_text())
    except (ValueError, OSError):  # caught mid-write; the next poll reads a whole file
        return set()
    done = set()
    for trial_json, _ in state.get("trial_data", []):
        trial = json.loads(trial_json)
        if trial.get("status") == "TERMINATED":
            done.add(trial["trial_id"])
    return done


_CHILD_MARK = "TUNEPIPE_TEST_CHILD"


def _marked(mark: str) -> list[Any]:
    """Live processes that inherited ``_CHILD_MARK=mark``: the child and its whole Ray cluster.

    Ray's workers start their own sessions (a process-group kill misses them) and rename
    themselves, but they keep the environment they were started with.
    """
    import psutil

    found = []
    for proc in psutil.process_iter(["pid", "status"]):
        try:
            if proc.info["status"] != psutil.STATUS_ZOMBIE and proc.environ().get(_CHILD_MARK) == mark:
                found.append(proc)
        except psutil.Error:
            continue
    return found


def _kill_child(proc: subprocess.Popen, mark: str) -> None:
    """SIGKILL the child's process group, then every process of its Ray cluster (gcs, raylet, workers)."""
    import psutil

    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)
    deadline = time.monotonic() + 30
    while alive := _marked(mark):
        assert time.monotonic() < deadline, f"processes of the killed child survived: {alive}"
        for p in alive:
            try:
                p.kill()
            except psutil.Error:
                pass
        time.sleep(0.2)


class _ResultLog:
    """A driver-side Tune callback that records (trial_id, training_iteration) of every result."""

    def __init__(self) -> None:
        self.results: list[tuple[str, int]] = []

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        self.results.append((trial.trial_id, int(result["training_iteration"])))


def test_resume_after_sigkill_keeps_finished_trials(ray_local, version, data, tmp_path):
    storage, name = tmp_path / "ray", "crash"
    exp_dir = storage / name
    # One trial at a time, long enough (80 reports each) that the kill lands while a trial runs.
    samples, rounds, every = 3, 80, 20
    tune_dict = {"search": "random", "scheduler": "fifo", "num_samples": samples, "max_iterations": rounds,
                 "checkpoint_every": every, "max_concurrent_trials": 1, "space": RANGE_SPACE}
    cfg = tune_cfg(**tune_dict)
    spec = {"version_path": version.path, "tune": tune_dict, "storage_path": str(storage), "name": name,
            "progress_file": str(tmp_path / "progress.jsonl")}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    mark = uuid.uuid4().hex
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, _CHILD_MARK: mark}
    with open(tmp_path / "child.log", "wb") as log:
        child = subprocess.Popen([sys.executable, "-m", "tests.unit._tune_child", str(tmp_path / "spec.json")],
                                 cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 240
            finished: set[str] = set()
            while not finished:
                assert child.poll() is None, "child exited before it was killed:\n" + _tail(tmp_path / "child.log")
                assert time.monotonic() < deadline, "no trial finished in time:\n" + _tail(tmp_path / "child.log")
                time.sleep(0.1)
                finished = _terminated(exp_dir)
        finally:
            _kill_child(child, mark)
    assert len(finished) < samples, "the child finished every trial before the kill: nothing to resume"
    progress_before = {tid: (exp_dir / f"trial_{tid}" / "progress.csv").read_bytes() for tid in finished}
    had_checkpoint = {p.name.removeprefix("trial_"): any(p.glob("checkpoint_*")) for p in exp_dir.glob("trial_*")}
    events_before = [json.loads(line) for line in (tmp_path / "progress.jsonl").read_text().splitlines()]
    assert {e["trial_id"] for e in events_before} >= finished

    events: list[dict[str, Any]] = []
    seen = _ResultLog()
    result = run_tuning(train_xgboost, data, cfg.space, cfg, LOCAL, str(storage), name, callbacks=[seen],
                        progress=events.append)

    assert result.resumed
    assert result.num_trials == samples
    by_id = {t.trial_id: t for t in result.trials}
    assert finished <= set(by_id)
    assert all(t.status == "TERMINATED" and t.iterations == rounds for t in result.trials)
    assert all(t.history[-1]["training_iteration"] == rounds for t in result.trials)
    # Finished trials were not run again: no results, no completion event, their files untouched.
    assert not finished & {tid for tid, _ in seen.results}
    assert not finished & {e["trial_id"] for e in events}
    for tid in finished:
        assert (exp_dir / f"trial_{tid}" / "progress.csv").read_bytes() == progress_before[tid]
        assert [h["training_iteration"] for h in by_id[tid].history] == list(range(1, rounds + 1))
    # An interrupted trial with a checkpoint continues right after one; only one without restarts at 1.
    first_seen: dict[str, int] = {}
    for tid, it in seen.results:
        first_seen.setdefault(tid, it)
    assert set(first_seen) == set(by_id) - finished
    # FIFO trials report only on their checkpoint cadence: an interrupted trial's first result is
    # one cadence step after the checkpoint it resumed from, or the first step if it started over
    # (no checkpoint, or one the killed driver had not yet recorded in the experiment state).
    for tid, it in first_seen.items():
        assert it % every == 0, (tid, it)
        if it > every:
            assert had_checkpoint.get(tid), (tid, it)
    # The unfinished ones completed in this run, and the progress callback was re-attached.
    assert {e["trial_id"] for e in events} == set(by_id) - finished
    assert events[-1]["done"] == samples and events[-1]["total"] == samples


def _tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


# --------------------------------------------------------------------------- storage and reports


def test_reports_and_best_checkpoint_are_written_next_to_the_experiment(tuned):
    result = tuned("random", "fifo")
    exp_dir = Path(result.experiment_uri)
    assert result.leaderboard_uri == str(exp_dir / "leaderboard.parquet")
    board = pd.read_parquet(result.leaderboard_uri)
    assert len(board) == result.num_trials
    assert board.iloc[0]["trial"] == result.best_trial_id
    assert list(board["rank"]) == [1, 2, 3]
    assert board["best_auc"].is_monotonic_decreasing
    assert (exp_dir / "leaderboard.csv").stat().st_size > 0
    for png in (Path(result.curves_png_uri), Path(result.parallel_png_uri)):
        assert png.parent == exp_dir
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ckpt = Path(result.best_checkpoint_uri)
    assert ckpt.parent.parent == exp_dir and ckpt.parent.name == f"trial_{result.best_trial_id}"
    assert (ckpt / MODEL_FILE).stat().st_size > 0
    # Every finished trial's record points at a checkpoint that exists.
    assert all(Path(t.checkpoint_uri, MODEL_FILE).exists() for t in result.trials)


def test_best_metric_and_iteration_come_from_the_history(tuned):
    result = tuned("hyperopt", "fifo")
    best = next(t for t in result.trials if t.trial_id == result.best_trial_id)
    values = [h["auc"] for h in best.history]
    assert result.best_metric == max(values) == max(t.best_metric for t in result.trials)
    assert best.history[result.best_iteration - 1]["auc"] == result.best_metric
    assert all(not math.isnan(v) for v in values)


def test_s3_experiment_is_written_to_the_bucket_and_resumed(ray_local, data, s3_settings):
    from infra.storage import boto3_client, build_storage

    storage = build_storage(s3_settings)
    bucket, root = storage.root.split("/", 1)
    cfg = tune_cfg(num_samples=2, max_iterations=3, checkpoint_every=3)
    result = run_tuning(train_xgboost, data, cfg.space, cfg, storage.fs, storage.path("ray"), "on-s3",
                        uri_prefix="s3://")
    assert not result.resumed
    assert result.experiment_uri == f"s3://{bucket}/{root}/ray/on-s3"
    client = boto3_client(s3_settings)
    keys = {o["Key"] for page in client.get_paginator("list_objects_v2").paginate(
        Bucket=bucket, Prefix=f"{root}/ray/on-s3/") for o in page.get("Contents", [])}
    prefix = f"{root}/ray/on-s3/"
    assert any(k.startswith(prefix + "experiment_state-") for k in keys), sorted(keys)
    assert prefix + "leaderboard.parquet" in keys and prefix + "learning_curves.png" in keys
    for t in result.trials:
        assert t.checkpoint_uri.startswith(f"s3://{bucket}/{root}/ray/on-s3/trial_{t.trial_id}/checkpoint_")
        assert t.checkpoint_uri.removeprefix(f"s3://{bucket}/") + f"/{MODEL_FILE}" in keys
    board = pd.read_parquet(io.BytesIO(client.get_object(Bucket=bucket, Key=prefix + "leaderboard.parquet")
                                       ["Body"].read()))
    assert set(board["trial"]) == {t.trial_id for t in result.trials}

    again = run_tuning(train_xgboost, data, cfg.space, cfg, storage.fs, storage.path("ray"), "on-s3",
                       uri_prefix="s3://")
    assert again.resumed
    assert {t.trial_id for t in again.trials} == {t.trial_id for t in result.trials}
    assert again.best_trial_id == result.best_trial_id
    keys_again = {o["Key"] for page in client.get_paginator("list_objects_v2").paginate(
        Bucket=bucket, Prefix=prefix) for o in page.get("Contents", [])}
    trial_dirs = {k[len(prefix):].split("/", 1)[0] for k in keys_again if k[len(prefix):].startswith("trial_")}
    assert trial_dirs == {f"trial_{t.trial_id}" for t in result.trials}


# --------------------------------------------------------------------------- nothing starts on bad input


@pytest.mark.parametrize(
    ("update", "space", "match"),
    [
        ({"search": "bayesopt"}, RANGE_SPACE, r"search: one of \['grid', 'hyperopt', 'optuna', 'random'\]"),
        ({"scheduler": "pb2"}, RANGE_SPACE, r"scheduler: one of \['asha', 'fifo', 'hyperband', 'median', 'pbt'\]"),
        ({"search": "hyperopt"}, GRID_SPACE, r"hyperopt cannot sample grid entries \['max_depth'\]"),
        ({"search": "grid"}, RANGE_SPACE, r"grid search needs grid/choice entries"),
        ({"scheduler": "pbt"}, {"max_depth": {"type": "randint", "low": 2, "high": 5}}, "no float range"),
        ({"points_to_evaluate": [{"etta": 0.1}]}, RANGE_SPACE, r"keys \['etta'\] are not in the search space"),
    ],
    ids=["unknown-search", "unknown-scheduler", "grid-for-hyperopt", "ranges-for-grid", "pbt-no-floats",
         "bad-point"],
)
def test_bad_config_fails_before_anything_starts(data, tmp_path, update, space, match):
    import ray

    from infra.ray_cluster import wait_for_shutdown

    wait_for_shutdown()
    was_running = ray.is_initialized()
    # model_copy skips validation: run_tuning itself must refuse (configs can be built in code).
    cfg = tune_cfg(space=space).model_copy(update=update)
    with pytest.raises(ConfigError, match=match):
        run_tuning(train_xgboost, data, cfg.space, cfg, LOCAL, str(tmp_path / "ray"), "bad")
    assert not (tmp_path / "ray").exists()
    assert ray.is_initialized() == was_running


def test_trial_resources_no_node_can_hold_fail_before_tuning(ray_local, data, tmp_path):
    # Tune would keep such a trial PENDING forever; no machine here has 64 GPUs (nor CI's any).
    cfg = tune_cfg(resources={"cpu": 1, "gpu": 64})
    with pytest.raises(ConfigError, match=r"resources: one trial needs cpu=1, gpu=64, but no Ray node has that "
                                          r"\(live nodes: 2 CPU, \d+ GPU\)"):
        run_tuning(train_xgboost, data, cfg.space, cfg, LOCAL, str(tmp_path / "ray"), "too-big")
    assert not (tmp_path / "ray").exists()
    # Fractions that fit a node pass the check (and CPU-only trials never ask for a GPU).
    ok = tune_cfg(resources={"cpu": 0.5, "gpu": 0}, num_samples=1, max_iterations=2)
    assert run_tuning(train_xgboost, data, ok.space, ok, LOCAL, str(tmp_path / "ray"), "fits").trials


def test_xgboost_boosts_on_the_gpu_only_when_the_trial_was_granted_one():
    from tuning_core.trainables.xgboost import xgb_params

    assert "device" not in xgb_params({"max_depth": 3.0}, nthread=2)
    on_gpu = xgb_params({"max_depth": 3.0}, nthread=2, gpu=True)
    assert on_gpu["device"] == "cuda" and on_gpu["max_depth"] == 3 and on_gpu["nthread"] == 2
    # A device named in the search space (a constant) wins over the automatic choice.
    assert xgb_params({"device": "cuda:1"}, gpu=True)["device"] == "cuda:1"


def test_driver_callbacks_forward_trial_start_result_and_complete_and_are_not_pickled():
    """Extra callbacks (MLflow, benchmark recorders) see every trial hook, and a failing one cannot fail the run."""
    from ray import cloudpickle  # what Ray uses to store the experiment state

    from tuning_core.runner import _driver_callbacks

    class Seen:
        def __init__(self) -> None:
            self.calls: list[str] = []

        def on_trial_start(self, iteration, trials, trial, **info):
            self.calls.append("start")

        def on_trial_result(self, iteration, trials, trial, result, **info):
            self.calls.append("result")
            raise RuntimeError("an observer that breaks")

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.calls.append("complete")

    seen = Seen()
    wrapped = _driver_callbacks(TuneConfig(), None, [seen])[-1]
    wrapped.on_trial_start(iteration=1, trials=[], trial=None)
    wrapped.on_trial_result(iteration=1, trials=[], trial=None, result={})
    wrapped.on_trial_complete(iteration=2, trials=[], trial=None)
    assert seen.calls == ["start", "result", "complete"]
    assert cloudpickle.loads(cloudpickle.dumps(wrapped)).inner is None
