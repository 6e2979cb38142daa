"""Run every benchmark, each in its own process, and write the combined results.

    python -m benchmarks.run_all [--only NAME ...] [--skip NAME ...] [--results-dir benchmarks/results]
                                 [--wait-idle LOAD] [--quick]

Writes ``<results-dir>/<YYYY-MM-DD>.json`` (top-level sections ``scheduling``, ``pipeline_overhead``,
``search_efficiency``, ``data_stage``, ``fashion_mnist``, plus ``environment`` and ``runs``), a
markdown summary ``<YYYY-MM-DD>.md`` and the plots ``<YYYY-MM-DD>-*.png``. A benchmark whose
module is missing is skipped; one that fails is recorded with its exit code and the others still
run (the exit status is then 1). With ``--only``/``--skip``, the sections run replace theirs in an
existing results file of the same date and the others are kept. ``make bench`` runs this with the
default budgets (about 15 minutes on an idle 2-core machine).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS_DIR, environment, write_json

HERE = Path(__file__).resolve().parent
# section name → (module, extra arguments; "{png}" is replaced by the plot's path)
BENCHMARKS: dict[str, tuple[str, list[str]]] = {
    "peer": ("peer", []),
    "scheduling": ("tune_overhead", []),
    "pipeline_overhead": ("pipeline_overhead", []),
    "search_efficiency": ("search_efficiency", ["--png", "{png}"]),
    "data_stage": ("data_stage", []),
    "fashion_mnist": ("fashion_mnist", []),
    "scale": ("scale", []),
}
# --quick: tiny budgets that only check the plumbing (the numbers mean nothing).
# Not in a default run: their ratios (wall / Σ trial time, flow / bare Ray Tune) divided by a quantity
# that already held the engine's costs; ``peer`` replaces them (run them with --only).
# ``scale`` generates and prepares up to 8M rows (about 15 minutes alone): run it with --only.
NOT_BY_DEFAULT = {"scheduling", "pipeline_overhead", "scale"}
QUICK: dict[str, list[str]] = {
    "peer": ["--quick", "--seeds", "0"],
    "scheduling": ["--max-rows", "10000", "--rounds", "10", "--trials", "4"],
    "pipeline_overhead": ["--max-rows", "10000", "--rounds", "5", "--trials", "2"],
    "search_efficiency": ["--max-rows", "10000", "--rounds", "5", "--trials", "6", "--seeds", "1"],
    "data_stage": ["--rows", "100000"],
    "scale": ["--quick"],
}


def wait_for_idle(max_load: float, max_wait_s: float) -> float:
    """Wait until the 1-minute load average is below ``max_load`` (at most ``max_wait_s``); returns seconds waited.

    Wall-time ratios measured beside other heavy work mostly measure that work; on a shared
    machine this trades waiting for cleaner numbers.
    """
    t0 = time.perf_counter()
    while os.getloadavg()[0] >= max_load and time.perf_counter() - t0 < max_wait_s:
        time.sleep(15)
    return time.perf_counter() - t0


def run_one(section: str, module: str, args: list[str], out_dir: Path, stamp: str) -> tuple[dict[str, Any], dict]:
    """Run ``python -m benchmarks.<module> --out FILE``; returns (its section, run info)."""
    png = out_dir / f"{stamp}-{section.replace('_', '-')}.png"
    argv = [a.replace("{png}", str(png)) for a in args]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / f"{section}.json"
        cmd = [sys.executable, "-m", f"benchmarks.{module}", "--out", str(out), *argv]
        shown = " ".join(["python", "-m", f"benchmarks.{module}", *argv]).replace(str(out_dir), _rel(out_dir))
        print(f"\n=== {section}: {shown}", flush=True)
        load_before = [round(x, 2) for x in os.getloadavg()]
        t0 = time.perf_counter()
        done = subprocess.run(cmd, cwd=HERE.parent)
        wall = time.perf_counter() - t0
        info: dict[str, Any] = {"command": shown, "wall_s": round(wall, 1), "exit_code": done.returncode,
                                "loadavg_before": load_before, "loadavg_after": [round(x, 2) for x in os.getloadavg()]}
        if done.returncode != 0 or not out.exists():
            print(f"=== {section}: FAILED (exit code {done.returncode})", flush=True)
            return {"error": f"exit code {done.returncode}", "command": shown}, info
        data = json.loads(out.read_text())
    print(f"=== {section}: done in {wall:.0f} s", flush=True)
    if png.exists():
        info["png"] = png.name
    return data.get(section, data), info


def _rel(p: Path) -> str:
    try:
        return str(p.resolve().relative_to(HERE.parent))
    except ValueError:
        return str(p)


# --------------------------------------------------------------------------- markdown
def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else "**no**"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _flatten(d: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for k, v in d.items():
        if isinstance(v, dict):
            out += _flatten(v, f"{prefix}{k}: ")
        else:
            out.append((f"{prefix}{k}", v))
    return out


def _headline(results: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(benchmark, measure, value, target/met) rows for the summary table."""
    rows: list[tuple[str, str, str, str]] = []
    peer = results.get("peer") or {}
    if "scales" in peer:
        v, t = peer["verdict"], peer["targets"]
        for name, sc in peer["scales"].items():
            m = sc["median"]
            rows.append(("peer", f"{name}: tune-stage wall / in-process Optuna study's ({sc['trials']} x "
                         f"{sc['rounds']}, median of {len(sc['runs'])} seeds)", _fmt(m["tune_vs_peer"]),
                         f"≤ {t['nyc_tune_vs_peer']} at test AUC within {t['nyc_auc_tolerance']}: "
                         f"{_fmt(v.get('nyc_tune_vs_peer_met'))}" if name == "nyc" else "speed only (leaky table)"))
            rows.append(("peer", f"{name}: tune-stage wall / replay of its own trials in-process",
                         _fmt(m["tune_vs_replay"]), f"≤ {t[name + '_tune_vs_replay']}: "
                         f"{_fmt(v.get(name + '_tune_vs_replay_met'))}"))
            rows.append(("peer", f"{name}: per-trial overhead (s); test AUC tunepipe − peer",
                         f"{_fmt(m['per_trial_overhead_s'])}; {m['test_auc_diff']:+.4f}", ""))
            rows.append(("peer", f"{name}: whole job, tunepipe run / peer script (s)",
                         f"{_fmt(m['job_s'])} / {_fmt(m['peer_job_s'])}", ""))
            rows.append(("peer", f"{name}: fixed start-up = run wall − tune stage − retrain compute (s)",
                         _fmt(m["fixed_startup_s"]), f"≤ {t['fixed_startup_s']}: "
                         f"{_fmt(m['fixed_startup_s'] <= t['fixed_startup_s'])}" if name == "nyc" else ""))
    s = results.get("scheduling") or {}
    if "ray" in s:
        ray = s["ray"]
        rows.append(("scheduling", f"Ray Tune wall / (Σ trial time / {s['config']['max_concurrent_trials']}), "
                     f"{s['config']['trials']} trials HyperOpt+ASHA", _fmt(ray["ratio"]),
                     f"≤ {ray['target']}: {_fmt(ray['meets_target'])}"))
        rows.append(("scheduling", "wall of tuning stage / Σ trial time (s)",
                     f"{ray['wall_s']} / {ray['sum_trial_s']}", ""))
        if "slot_s" in ray:
            sl = ray["slot_s"]
            rows.append(("scheduling", "slot-seconds before the first trial / between trials / tail after the last",
                         f"{sl['before_first_trial_s']} / {sl['between_trials_s']} / {sl['after_last_trial_s']}", ""))
            rows.append(("scheduling", "same ratio without the start and the tail", _fmt(ray["ratio_without_edges"]),
                         ""))
        if "fmin" in s:
            rows.append(("scheduling", f"Ray Tune (2 CPUs, ASHA) / hyperopt fmin (1 CPU, no early stop) wall "
                         f"({ray['wall_s']} s / {s['fmin']['wall_s']} s)", _fmt(s["ray_over_fmin"]), ""))
    p = results.get("pipeline_overhead") or {}
    if "ratio" in p:
        rows.append(("pipeline_overhead", f"Prefect flow / bare Ray Tune wall ({p['pipeline']['wall_s']} s / "
                     f"{p['bare']['wall_s']} s, {p['config']['trials']} trials)", _fmt(p["ratio"]),
                     f"≤ {p['target']}: {_fmt(p['meets_target'])}"))
        rows.append(("pipeline_overhead", "fixed start-up (Prefect ephemeral API + MLflow store) (s)",
                     _fmt(p["startup"]["fixed_startup_s"]), ""))
    e = results.get("search_efficiency") or {}
    if "methods" in e:
        t = e["targets"]
        frac, up = t["hyperopt_asha_cpu_fraction_of_random"], t["hyperopt_asha_uplift_test_auc"]
        reached = e["methods"]["hyperopt+asha"]["reached_random_final"]
        value = _fmt(frac["value"]) if reached.split("/")[0] == reached.split("/")[1] else (
            f"reached in {reached} seeds (median {_fmt(frac['value'])}, unreached seeds at their whole budget)")
        rows.append(("search_efficiency", "HyperOpt+ASHA CPU-s to match random+FIFO's final AUC / random's CPU-s",
                     value, f"≤ {frac['target']}: {_fmt(frac['met'])}"))
        rows.append(("search_efficiency", "HyperOpt+ASHA test AUC uplift over default XGBoost", _fmt(up["value"]),
                     f"≥ {up['target']}: {_fmt(up['met'])}"))
    for name in ("data_stage", "fashion_mnist"):
        sec = results.get(name) or {}
        ratios = sec.get("ratios") if isinstance(sec.get("ratios"), dict) else {}
        for k, v in _flatten(ratios):
            rows.append((name, k, _fmt(v), ""))
    for name, sec in results.items():
        if isinstance(sec, dict) and "error" in sec:
            rows.append((name, "FAILED", sec["error"], ""))
    return rows


def markdown(results: dict[str, Any], stamp: str) -> str:
    env = results.get("environment", {})
    lines = [f"# tunepipe benchmarks, {stamp}", "",
             f"{env.get('cpus')} CPUs ({env.get('processor')}), Python {env.get('python')}, "
             + ", ".join(f"{k} {v}" for k, v in (env.get("versions") or {}).items() if v)
             + f"; load average before/after: {env.get('loadavg_before')} / {env.get('loadavg_after')}.", "",
             "| benchmark | measure | value | target |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in _headline(results)]
    e = results.get("search_efficiency") or {}
    if "methods" in e:
        c = e["config"]
        lines += ["", f"## Search efficiency ({c['trials']} trials x {c['rounds']} rounds, {c['seeds']} seeds, "
                  f"{c['max_rows']} earliest flights, time split; medians over seeds)", "",
                  f"Default XGBoost test AUC: {e['default_xgboost_test_auc']}.", "",
                  "| method | best valid AUC | test AUC (retrained) | uplift | CPU-s | wall-s | reached random's "
                  "final | CPU-s to reach / random's CPU-s | random+FIFO's AUC at the same CPU-s |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for m, s in e["methods"].items():
            lines.append(f"| {m} | {_fmt(s['median_best_valid_auc'])} | {_fmt(s['median_test_auc'])} | "
                         f"{s['median_uplift_test_auc']:+.4f} | {_fmt(s['median_cpu_s'])} | {_fmt(s['median_wall_s'])} "
                         f"| {s['reached_random_final']} | {_fmt(s['median_cpu_to_reach_random_fraction'])} | "
                         f"{_fmt(s.get('median_random_auc_at_same_cpu'))} |")
        w = e.get("random_winner_at_asha_rungs")
        if w:
            lines += ["", "Where random+FIFO's eventual winner stood among its own trials at ASHA's rungs (share "
                      "of trials with a higher validation AUC at that round; ASHA keeps about the top "
                      f"{w['asha_keeps']}):",
                      "", "| seed | " + " | ".join(f"round {k}" for k in w["rungs"]) + " |",
                      "|---|" + "---|" * len(w["rungs"])]
            lines += [f"| {seed} | " + " | ".join(_fmt(ranks.get(str(k), ranks.get(k))) for k in w["rungs"]) + " |"
                      for seed, ranks in w["share_of_trials_ahead_per_seed"].items()]
        for run in results.get("runs", {}).values():
            if run.get("png"):
                lines += ["", f"![AUC vs CPU-seconds]({run['png']})"]
    p = results.get("pipeline_overhead") or {}
    if "pipeline" in p:
        lines += ["", "## Pipeline overhead", "",
                  "| part | seconds |", "|---|---|",
                  f"| empty flow, cold (starts Prefect's ephemeral API) | {p['startup']['empty_flow_cold_s']} |",
                  f"| empty flow, warm | {p['startup']['empty_flow_warm_s']} |",
                  *(f"| MLflow store creation | {p['startup']['mlflow_store_init_s']} |"
                    for _ in [0] if "mlflow_store_init_s" in p["startup"]),
                  f"| pipeline wall (API up) | {p['pipeline']['wall_s']} |",
                  *(f"| &nbsp; task {k} | {v} |" for k, v in p["pipeline"]["tasks_s"].items()),
                  f"| bare Ray Tune (ray.init + run_tuning) | {p['bare']['wall_s']} |"]
    lines += ["", "## Commands", ""]
    lines += [f"- `{run['command']}` ({run['wall_s']} s, exit {run['exit_code']}, load average "
              f"{run['loadavg_before'][0]} before / {run['loadavg_after'][0]} after)"
              for run in results.get("runs", {}).values()]
    lines += ["", "Full results: the JSON file of the same name."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", nargs="*", choices=list(BENCHMARKS), help="run only these sections")
    p.add_argument("--skip", nargs="*", default=[], choices=list(BENCHMARKS), help="skip these sections")
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--date", default=dt.date.today().isoformat(), help="file stem (default: today)")
    p.add_argument("--quick", action="store_true", help="tiny budgets: checks the plumbing, numbers mean nothing")
    p.add_argument("--wait-idle", type=float, metavar="LOAD",
                   help="before each benchmark, wait until the 1-min load average is below LOAD")
    p.add_argument("--wait-max", type=float, default=1800, help="longest wait per benchmark, seconds (default 1800)")
    a = p.parse_args(argv)
    a.results_dir.mkdir(parents=True, exist_ok=True)
    env = environment()
    env["loadavg_before"] = env.pop("loadavg_1_5_15")
    json_path = a.results_dir / f"{a.date}.json"
    md_path = a.results_dir / f"{a.date}.md"
    results: dict[str, Any] = {"date": a.date, "quick": a.quick, "environment": env, "runs": {}}
    if (a.only or a.skip) and json_path.exists():
        # A partial rerun updates its sections of the day's results and keeps the others.
        previous = json.loads(json_path.read_text())
        results = {**previous, "environment": env, "runs": dict(previous.get("runs", {}))}
    failed = False
    started = time.perf_counter()
    for section, (module, args) in BENCHMARKS.items():
        if (a.only and section not in a.only) or section in a.skip or (not a.only and section in NOT_BY_DEFAULT):
            continue
        if not (HERE / f"{module}.py").exists():
            print(f"\n=== {section}: benchmarks/{module}.py not present, skipped", flush=True)
            results[section] = {"skipped": f"benchmarks/{module}.py not present"}
            continue
        if a.wait_idle:
            waited = wait_for_idle(a.wait_idle, a.wait_max)
            print(f"\n=== {section}: waited {waited:.0f} s for load < {a.wait_idle} "
                  f"(now {os.getloadavg()[0]:.2f})", flush=True)
        extra = QUICK.get(section, []) if a.quick else []
        results[section], info = run_one(section, module, [*args, *extra], a.results_dir, a.date)
        results["runs"][section] = info
        failed |= info["exit_code"] != 0
    results["environment"]["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    results["total_wall_s"] = round(time.perf_counter() - started, 1)
    write_json(json_path, results)
    md_path.write_text(markdown(results, a.date))
    print(f"\nwrote {_rel(json_path)} and {_rel(md_path)} (total {results['total_wall_s']} s)")
    print(markdown(results, a.date))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
