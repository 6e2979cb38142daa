"""The tuning DAG shared by every workload: composition only.

    preflight ─► prepare_data ─► tune ─► retrain_best ─► evaluate_and_register ─► report
                                 └────────── experiment lease held ──────────┘
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC
from typing import Any

from prefect import get_run_logger
from prefect.runtime import flow_run

from tasks import stages
from tasks.workloads import Pipeline, StageClock, warm_up, with_warm_start


def _stamp() -> str:
    # The scheduled start, not "now": the name keeps its date when the data stage renames the run,
    # and a scheduled deployment run is named for the time it was meant to run.
    return f"{flow_run.scheduled_start_time.astimezone(UTC):%Y%m%d-%H%M}"


def start_name(workload: str) -> Callable[[], str]:
    """A flow's ``flow_run_name``: workload and date, from the start, so that a run failing before
    the data stage is still told apart in the UI ("<workload>-20261130-0200")."""
    def name() -> str:
        return f"{workload}-{_stamp()}"

    return name


def rename_run(cfg: Pipeline, version: str) -> None:
    """Once the data version is known, the name says what ran: workload, data version, date."""
    if not flow_run.id:
        return
    from prefect.client.orchestration import get_client

    name = f"{cfg.workload}-{version[:10]}-{_stamp()}"
    with get_client(sync_client=True) as client:
        client.update_flow_run(flow_run.id, name=name)


def run_pipeline(cfg: Pipeline) -> dict[str, Any]:
    warm_up(cfg=cfg)  # the local Ray comes up while preflight and data preparation run
    run = stages.for_run()  # the stage tasks with the retry delays of this run's settings
    clock = StageClock()
    with clock("preflight_s"):
        cfg = run.preflight(cfg)
        warm = run.champion_config(cfg)
    cfg = with_warm_start(cfg, warm)
    if warm:
        get_run_logger().info("warm start: the champion's config is tried first")
    with clock("prepare_s"):
        version = run.prepare_data(cfg)
        rename_run(cfg, version.version)
    # One run at a time writes into an experiment (its name is known once the data version is).
    with stages.experiment_lease(cfg, version):
        tune = run.tune if stages.experiment_on_storage(cfg, version) else run.tune.with_options(refresh_cache=True)
        with clock("tune_s"):
            tuning = tune(cfg, version)
        with clock("retrain_s"):
            retrained = run.retrain_best(cfg, version, tuning)
        with clock("register_s"):
            registry = run.evaluate_and_register(cfg, version, tuning, retrained)
    return run.report(cfg, version, tuning, retrained, registry, clock.total())
