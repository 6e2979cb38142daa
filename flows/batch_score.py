"""Batch scoring flow: score a CSV / glob / s3:// prefix with the registry champion."""

from __future__ import annotations

from typing import Any

from prefect import flow

from infra.settings import get_settings
from tasks.scoring import batch_score_task
from tasks.stages import with_retry_policy


@flow(name="batch-score", flow_run_name="score-{model_name}-{alias}")
def batch_score(source: str, model_name: str = "tunepipe-flights", alias: str = "champion") -> dict[str, Any]:
    """Write predictions of ``models:/<model_name>@<alias>`` for every row of ``source`` as parquet."""
    return with_retry_policy(batch_score_task, get_settings())(source, model_name, alias)
