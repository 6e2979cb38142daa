"""Soak: consecutive short scheduled runs of the flights deployment through the local stack's worker.

    python -m benchmarks.soak [--runs 20] [--interval 45] [--out FILE.json]

Starts the local stack (``infra.stack``: SeaweedFS S3, MLflow server, Prefect server, process worker)
in a fresh state folder, deploys the flights flow (the entrypoint of ``prefect.yaml``'s nightly
deployment) with a real interval schedule, one run at a time (concurrency limit 1, ENQUEUE), and lets
Prefect's scheduler and the stack's worker run it ``--runs`` times with a tiny budget (2 trials x 5
rounds). Before each run a new file of flights "arrives" in the source folder (a glob), as for a
nightly retraining: each run sees new data, so it tunes, retrains and registers for real instead of
reusing the previous run's experiment. Then ``stack down``.

Reports (a table, and JSON under ``benchmarks/results/<date>-soak.json``):

* runs completed (target: all of them);
* model versions: at most one per run, each from a distinct MLflow run (no duplicates);
* processes left behind after ``stack down``: processes started since the soak began that carry the
  soak's marker variable (set before ``stack up``; every service, flow run and Ray process inherits
  it), so other work on the machine is not counted; plus flow-run processes still alive after their
  run ended, checked while the stack still runs;
* ``/tmp`` entries left behind (``/tmp`` and ``/tmp/ray``, before vs after), split into the soak's
  own (named after the stack, or Ray session folders of its flow-run processes) and others
  (possibly from other work on the machine);
* the servers' RSS (each service's processes, flow runs excluded) after run 1 and after the last run,
  growth in % (target < 10 %).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
ASA_SAMPLE = ROOT.parent / "shared" / "data" / "flights-asa-2008" / "2008_first_22041_rows.csv"
RESULTS_DIR = Path(__file__).resolve().parent / "results"
MARK = "TUNEPIPE_SOAK_MARK"
FLOW_RUN_VAR = "PREFECT__FLOW_RUN_ID"  # set by Prefect's process worker for each flow run's process
MODEL = "soak-flights"
RSS_TARGET_PCT = 10.0
# The first file of flights, then one more file per run (rows of the ASA 2008 sample).
FIRST_ROWS, ROWS_PER_RUN = 2000, 200


# --------------------------------------------------------------------------- what is running, what is in /tmp
def processes() -> dict[tuple[int, float], str]:
    """Every process now: (pid, create time) → command line."""
    import psutil

    out = {}
    for p in psutil.process_iter(["pid", "create_time", "cmdline", "name"]):
        cmd = " ".join(p.info["cmdline"] or []) or p.info["name"] or "?"
        out[(p.info["pid"], p.info["create_time"])] = cmd[:200]
    return out


def marked(mark: str, since: float) -> dict[tuple[int, float], dict[str, str]]:
    """Processes started after ``since`` whose environment carries the soak's marker (not this one)."""
    import psutil

    out = {}
    for p in psutil.process_iter(["pid", "create_time", "cmdline"]):
        if p.info["create_time"] < since - 1 or p.info["pid"] == os.getpid():
            continue
        try:
            env = p.environ()
        except (psutil.Error, OSError):
            continue
        if env.get(MARK) == mark:
            out[(p.info["pid"], p.info["create_time"])] = {
                "cmd": " ".join(p.info["cmdline"] or [])[:200], "flow_run": env.get(FLOW_RUN_VAR, "")}
    return out


def tmp_entries(tmp: Path = Path("/tmp")) -> set[str]:
    """Names in ``tmp`` and in ``tmp/ray`` (Ray keeps a session folder per local cluster there)."""
    names = {p.name for p in tmp.iterdir()} if tmp.is_dir() else set()
    ray = tmp / "ray"
    if ray.is_dir():
        names |= {f"ray/{p.name}" for p in ray.iterdir()}
    return names


def left_behind(before: dict, after: dict) -> list[dict[str, Any]]:
    """Entries of ``after`` (processes keyed by (pid, create time)) that ``before`` did not have."""
    return [{"pid": key[0], "cmd": after[key]} for key in sorted(set(after) - set(before))]


def classify_tmp(new: set[str], our_pids: set[int], our_ports: set[int], runtime_dir: str,
                 tmp: Path = Path("/tmp")) -> dict[str, list[str]]:
    """New /tmp entries: the soak's own and the rest (other work on a shared machine, or ours under a
    name we cannot tell). Ours: the stack's runtime folder, SeaweedFS sockets of the stack's ports,
    anything named after the pid of one of the soak's processes (Ray session folders, log files), and
    downloaded copies of the soak's registered model (MLflow writes ``registered_model_meta`` into them)."""
    ours, others = [], []
    for name in sorted(new):
        tail = re.split(r"[._-]", name.removesuffix(".sock"))[-1]
        number = int(tail) if tail.isdigit() else None
        meta = tmp / name / "registered_model_meta"
        mine = (name == runtime_dir or (name.startswith("seaweedfs-") and number in our_ports)
                or (not name.startswith("seaweedfs-") and number in our_pids)
                or (meta.is_file() and f"model_name: {MODEL}\n" in meta.read_text(errors="replace")))
        (ours if mine else others).append(name)
    return {"ours": ours, "others": others}


def growth_pct(first: dict[str, float], last: dict[str, float]) -> dict[str, float | None]:
    """RSS growth per service, first → last, in %."""
    return {name: round(100 * (last[name] - mb) / mb, 1) if mb and name in last else None
            for name, mb in first.items()}


def service_rss_mb(pids: dict[str, int]) -> dict[str, float]:
    """RSS of each service: its leader and all descendants, except flow runs (and what they started)."""
    import psutil

    out = {}
    for name, pid in pids.items():
        total = 0
        try:
            leader = psutil.Process(pid)
            for p in [leader, *leader.children(recursive=True)]:
                try:
                    if p is not leader and FLOW_RUN_VAR in p.environ():
                        continue
                    total += p.memory_info().rss
                except psutil.Error:
                    continue
        except psutil.Error:
            pass
        out[name] = round(total / (1 << 20), 1)
    return out


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def check_versions(versions: list[dict[str, str]], completed: int) -> dict[str, Any]:
    """Model versions vs completed runs: at most one per run, none sharing a source run."""
    run_ids = [v["run_id"] for v in versions]
    return {"count": len(versions), "distinct_source_runs": len(set(run_ids)),
            "data_versions": len({v.get("data_version") for v in versions}),
            "ok": len(versions) <= completed and len(set(run_ids)) == len(run_ids)}


# --------------------------------------------------------------------------- the soak
def _entrypoint() -> str:
    """The flights flow as ``prefect.yaml``'s nightly deployment names it."""
    import yaml

    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    return next(d["entrypoint"] for d in spec["deployments"] if d["name"] == "flights-nightly")


def _arrive(folder: Path, index: int, lines: list[str]) -> int:
    """Write the index-th file of flights atomically (a hidden name first: the glob never sees half a file)."""
    start = 0 if index == 0 else FIRST_ROWS + (index - 1) * ROWS_PER_RUN
    rows = lines[1:][start:FIRST_ROWS if index == 0 else start + ROWS_PER_RUN]
    tmp = folder / f".day-{index:03d}.part"
    tmp.write_text(lines[0] + "".join(rows))
    tmp.rename(folder / f"day-{index:03d}.csv")
    return len(rows)


def _params(source: str) -> dict[str, Any]:
    return {"cfg": {"data": {"source": source, "split": "random"},
                    "tune": {"num_samples": 2, "max_iterations": 5, "search": "random", "scheduler": "fifo",
                             "max_concurrent_trials": 2},
                    "registry": {"model_name": MODEL}}}


def soak(runs: int, interval_s: int, state_dir: Path, run_timeout_s: float) -> dict[str, Any]:
    from infra import stack

    mark = uuid.uuid4().hex
    os.environ[MARK] = mark  # inherited by every service, flow run and Ray process the stack starts
    t0 = time.time()
    procs_before, tmp_before = processes(), tmp_entries()
    data_dir = state_dir / "soak-data"
    data_dir.mkdir(parents=True)
    lines = ASA_SAMPLE.read_text().splitlines(keepends=True)
    rows = [_arrive(data_dir, 0, lines)]
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    report: dict[str, Any] = {"commit": commit, "runs_wanted": runs, "interval_s": interval_s,
                              "trigger": "interval schedule", "entrypoint": _entrypoint(), "runs": [], "rss_mb": {}}
    seen: dict[tuple[int, float], dict[str, str]] = {}
    ports: set[int] = set()
    try:
        started = time.monotonic()
        stack.up(state_dir, timeout_s=180)
        report["stack_up_s"] = round(time.monotonic() - started, 1)
        state = stack.StackState(state_dir)
        state.load()
        ports = set(state.data["ports"].values())
        env = stack.env(state_dir, show_secrets=True)
        os.environ.update(env)  # before Prefect is imported: it reads PREFECT_API_URL once
        report.update(_drive(runs, interval_s, state_dir, data_dir, lines, rows, mark, t0, seen, run_timeout_s))
        time.sleep(5)  # the last run's processes (its local Ray) have a few seconds to exit
        seen.update(marked(mark, t0))
        ended = {r["id"] for r in report["runs"]}
        report["flow_run_processes_alive_after_their_run"] = [
            {"pid": k[0], **v} for k, v in marked(mark, t0).items() if v["flow_run"] in ended]
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"], registry_uri=env["MLFLOW_TRACKING_URI"])
        versions = [{"version": v.version, "run_id": v.run_id, "data_version": v.tags.get("data_version", "")}
                    for v in client.search_model_versions(f"name = '{MODEL}'")]
        report["model_versions"] = {**check_versions(versions, report["runs_completed"]), "versions": versions}
    finally:
        stack.down(state_dir)
    time.sleep(2)  # let the last processes be reaped
    after = marked(mark, t0)
    report["processes_left_after_down"] = [{"pid": k[0], **v} for k, v in after.items()]
    report["new_processes_not_ours"] = len(left_behind(procs_before, processes())) - len(after)
    tmp_left = classify_tmp(tmp_entries() - tmp_before, {k[0] for k in seen}, ports, stack.runtime_dir(state_dir).name)
    ours_mb = sum(_size(Path("/tmp", n)) for n in tmp_left["ours"]) / 2**20
    report["tmp_left"] = {**tmp_left, "ours_mb": round(ours_mb, 1)}
    return report


def _drive(runs: int, interval_s: int, state_dir: Path, data_dir: Path, lines: list[str], rows: list[int],
           mark: str, t0: float, seen: dict, run_timeout_s: float) -> dict[str, Any]:
    """Deploy with an interval schedule, follow the runs, add data between them, measure after each."""
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
    from prefect.client.schemas.sorting import FlowRunSort
    from prefect.exceptions import ObjectNotFound

    from infra import stack

    deployment_id = flow.from_source(source=str(ROOT), entrypoint=_entrypoint()).deploy(
        name="soak", work_pool_name=stack.WORK_POOL, interval=interval_s, parameters=_params(str(data_dir / "*.csv")),
        concurrency_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE),
        job_variables={"env": {"RAY_USAGE_STATS_ENABLED": "0"}}, tags=["soak"], print_next_steps=False,
        ignore_warnings=True)
    done: dict[str, dict[str, Any]] = {}
    rss: dict[int, dict[str, float]] = {}
    paused = False
    deadline = time.monotonic() + runs * (interval_s + run_timeout_s)
    with get_client(sync_client=True) as client:
        while len(done) < runs and time.monotonic() < deadline:
            flow_runs = client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
                sort=FlowRunSort.EXPECTED_START_TIME_ASC, limit=runs + 10)
            seen.update(marked(mark, t0))
            active = [r for r in flow_runs if r.state and not r.state.is_scheduled() and not r.state.is_pending()]
            if not paused and len(active) >= runs:
                client.pause_deployment(deployment_id)  # no run beyond the wanted ones
                for r in flow_runs:
                    if r.id not in {a.id for a in active[:runs]} and r.state and r.state.is_scheduled():
                        with contextlib.suppress(ObjectNotFound):  # pausing may have deleted it already
                            client.delete_flow_run(r.id)
                paused = True
            for r in active[:runs]:
                if str(r.id) in done or not r.state.is_final():
                    continue
                n = len(done) + 1
                rss[n] = service_rss_mb(stack.status(state_dir).pids())
                lateness = (r.start_time - r.expected_start_time).total_seconds() if r.start_time else None
                done[str(r.id)] = {"n": n, "id": str(r.id), "name": r.name, "state": r.state.type.value,
                                   "expected_start": r.expected_start_time.isoformat(),
                                   "start_late_s": round(lateness, 1) if lateness is not None else None,
                                   "run_s": round(r.total_run_time.total_seconds(), 1),
                                   "rows_in_source": sum(rows), "rss_mb": rss[n]}
                print(f"run {n}/{runs}: {r.name} {r.state.type.value} in {r.total_run_time.total_seconds():.0f} s, "
                      f"started {lateness or 0:+.0f} s from its slot", flush=True)
                if n < runs:
                    rows.append(_arrive(data_dir, n, lines))  # the next run's new data
            time.sleep(1)
    completed = sum(r["state"] == "COMPLETED" for r in done.values())
    first, last = rss.get(1, {}), rss.get(max(rss) if rss else 1, {})
    return {"runs": sorted(done.values(), key=lambda r: r["n"]), "runs_completed": completed,
            "timed_out": len(done) < runs,
            "rss_mb": {"after_run_1": first, "after_last_run": last, "growth_pct": growth_pct(first, last)}}


# --------------------------------------------------------------------------- report
def table(report: dict[str, Any]) -> str:
    """The report as a few aligned lines."""
    mv, rss = report.get("model_versions", {}), report["rss_mb"]
    lines = [
        f"runs completed               {report['runs_completed']}/{report['runs_wanted']} "
        f"({report['trigger']}, every {report['interval_s']} s)",
        f"model versions               {mv.get('count')} from {mv.get('distinct_source_runs')} distinct runs, "
        f"{mv.get('data_versions')} data versions ({'ok' if mv.get('ok') else 'DUPLICATES or too many'})",
        f"processes left after down    {len(report['processes_left_after_down'])}",
        f"flow-run processes after run {len(report['flow_run_processes_alive_after_their_run'])}",
        f"/tmp entries left (ours)     {len(report['tmp_left']['ours'])} {report['tmp_left']['ours'][:5]}",
        f"/tmp entries left (others)   {len(report['tmp_left']['others'])}",
        f"{'service':<12}{'RSS run 1 MB':>14}{'RSS last MB':>13}{'growth %':>10}",
    ]
    for name, mb in rss.get("after_run_1", {}).items():
        pct = rss["growth_pct"].get(name)
        flag = "" if pct is None or pct < RSS_TARGET_PCT else f"  (over {RSS_TARGET_PCT:g} %)"
        shown = "-" if pct is None else f"{pct:+.1f}"
        lines.append(f"{name:<12}{mb:>14,.0f}{rss['after_last_run'].get(name, 0):>13,.0f}{shown:>10}{flag}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20, help="scheduled runs to wait for (default 20)")
    parser.add_argument("--interval", type=int, default=45, help="the deployment's schedule interval, seconds")
    parser.add_argument("--run-timeout", type=float, default=600, help="seconds one run may take at most")
    parser.add_argument("--out", help="JSON file (default benchmarks/results/<date>-soak.json)")
    parser.add_argument("--keep", action="store_true", help="keep the stack's state folder (logs, databases)")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.interval < 1:
        print("soak: --runs and --interval must be at least 1", file=sys.stderr)
        return 2
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    state_dir = ROOT / ".tunepipe" / f"soak-{dt.datetime.now():%Y%m%d-%H%M%S}"
    started = time.monotonic()
    try:
        report = soak(args.runs, args.interval, state_dir, args.run_timeout)
    finally:
        if not args.keep:
            shutil.rmtree(state_dir, ignore_errors=True)
    report["wall_s"] = round(time.monotonic() - started, 1)
    report["date"] = dt.date.today().isoformat()
    print(table(report))
    out = Path(args.out) if args.out else RESULTS_DIR / f"{report['date']}-soak.json"
    out.write_text(json.dumps({"soak": report}, indent=2, default=str) + "\n")
    print(f"written {out}")
    return 0 if report["runs_completed"] == args.runs else 1


if __name__ == "__main__":
    raise SystemExit(main())
