"""A run SIGKILLed while it retrains the winner, then run again: the rerun finishes the job with
exactly one model version and the champion alias on it (issue 16, faults during late stages)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import ASA_SAMPLE, ROOT, process_tree, still_alive

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _cli(storage: Path, log: Path, model: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "PREFECT_API_URL", "MLFLOW_TRACKING_URI", "TUNEPIPE_STORAGE")}
    env.update(TUNEPIPE_STORAGE=str(storage), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    # The console script's entry (what `tunepipe` runs): it ends with os._exit once every exit handler ran.
    argv = [sys.executable, "-c", "from flows.console import main; main()", "run", "flights", "--data", str(ASA_SAMPLE),
            "--num-samples", "2", "--max-iterations", "20", "--seed", "3", "--model-name", model]
    with open(log, "ab") as out:
        return subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _kill_when(run: subprocess.Popen, log: Path, ready: Callable[[], bool], poll_s: float) -> None:
    """Wait (up to 240 s) until ``ready()``, then SIGKILL the run's process group: the run and
    everything it started (Ray, Prefect's API). Nothing of it is left running, whatever happens."""
    procs = []
    try:
        deadline = time.monotonic() + 240
        while not ready():
            assert run.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(poll_s)
        procs = process_tree([run.pid])
        os.killpg(run.pid, signal.SIGKILL)
        run.wait(timeout=30)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
        for p in still_alive(procs):
            p.kill()


def test_sigkill_during_retrain_then_rerun_registers_exactly_one_version(tmp_path):
    from mlflow import MlflowClient

    storage, log, model = tmp_path / "store", tmp_path / "first.log", "kill-retrain"
    first = _cli(storage, log, model)

    def tuned() -> bool:  # the tune stage's closing line: the retrain stage starts right after it
        text = log.read_text(errors="replace")
        return "tuning " in text and " trials, best " in text

    _kill_when(first, log, tuned, poll_s=0.05)
    text = log.read_text(errors="replace")
    assert "retrained:" not in text and "decision" not in text, "the kill landed after the retrain stage"

    again = _cli(storage, tmp_path / "second.log", model)
    assert again.wait(timeout=240) == 0, (tmp_path / "second.log").read_text()[-3000:]
    uri = f"sqlite:///{storage / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    versions = client.search_model_versions(f"name='{model}'")
    assert [str(v.version) for v in versions] == ["1"]
    assert str(client.get_model_version_by_alias(model, "champion").version) == "1"
    # The rerun took over the killed run's lease and reused its tuning rather than tuning again.
    assert "resumed=True" in (tmp_path / "second.log").read_text(errors="replace") or \
        "Cached(type=COMPLETED)" in (tmp_path / "second.log").read_text(errors="replace")


def _registry_rows(db: Path, model: str, mode: str = "ro") -> tuple[list[int], dict[str, int]]:
    """The model's versions and aliases as the MLflow SQLite store holds them right now (read-only while
    a run writes it; ``mode="rw"`` after a kill, when a hot journal left by the killed writer must be
    rolled back first, as the next run's MLflow does: read-only that fails with "readonly database")."""
    import sqlite3

    with contextlib.closing(sqlite3.connect(f"file:{db}?mode={mode}", uri=True, timeout=5)) as con:
        versions = [v for (v,) in con.execute("select version from model_versions where name = ?", (model,))]
        aliases = dict(con.execute("select alias, version from registered_model_aliases where name = ?", (model,)))
    return versions, aliases


def test_sigkill_during_registration_then_rerun_keeps_one_version_and_sets_the_champion(tmp_path):
    import sqlite3

    from mlflow import MlflowClient

    storage, log, model = tmp_path / "store", tmp_path / "first.log", "kill-register"
    db = storage / "mlflow.db"
    first = _cli(storage, log, model)

    def registered() -> bool:  # the version exists: kill before the gate sets its aliases
        with contextlib.suppress(sqlite3.OperationalError):  # no store yet, or locked by a write
            return db.exists() and bool(_registry_rows(db, model)[0])
        return False

    _kill_when(first, log, registered, poll_s=0.002)
    assert _registry_rows(db, model, mode="rw") == ([1], {}), "the kill landed after the registration set the aliases"

    second = tmp_path / "second.log"
    again = _cli(storage, second, model)
    assert again.wait(timeout=240) == 0, second.read_text()[-3000:]
    uri = f"sqlite:///{db}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    (version,) = client.search_model_versions(f"name='{model}'")
    assert str(version.version) == "1"
    assert str(client.get_model_version_by_alias(model, "champion").version) == "1"
    assert version.tags["tunepipe.decision"] in ("first version: promoted", "already champion")
    # The rerun reused the first run's retrained model rather than training and registering another.
    retrains = client.search_runs([version.run_id and client.get_run(version.run_id).info.experiment_id],
                                  "tags.`tunepipe.stage` = 'retrain'")
    assert [r.info.run_id for r in retrains] == [version.run_id]
