"""The tuning DAG shared by every workload: composition only.

    preflight ─► prepare_data ─► tune ─► retrain_best ─► evaluate_and_register ─► report
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from prefect import get_run_logger
from prefect.runtime import flow_run

from tasks import stages
from tasks.workloads import Pipeline, with_warm_start


def rename_run(cfg: Pipeline, version: str) -> None:
    """Flow run names that say what ran: workload, data version, date."""
    if not flow_run.id:
        return
    from prefect.client.orchestration import get_client

    name = f"{cfg.workload}-{version[:10]}-{datetime.now(UTC):%Y%m%d-%H%M}"
    with get_client(sync_client=True) as client:
        client.update_flow_run(flow_run.id, name=name)


def run_pipeline(cfg: Pipeline) -> dict[str, Any]:
    stages.preflight(cfg)
    warm = stages.champion_config(cfg)
    cfg = with_warm_start(cfg, warm)
    if warm:
        get_run_logger().info("warm start: the champion's config is tried first")
    version = stages.prepare_data(cfg)
    rename_run(cfg, version.version)
    tuning = stages.tune(cfg, version)
    retrained = stages.retrain_best(cfg, version, tuning)
    registry = stages.evaluate_and_register(cfg, version, tuning, retrained)
    return stages.report(cfg, version, tuning, retrained, registry)
