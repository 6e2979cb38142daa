"""Batch scoring flow: score a CSV / glob / s3:// prefix with the registry champion."""

from __future__ import annotations

from typing import Any

from prefect import flow

from tasks.scoring import batch_score_task


@flow(name="batch-score", flow_run_name="score-{model_name}-{alias}")
def batch_score(source: str, model_name: str = "tunepipe-flights", alias: str = "champion") -> dict[str, Any]:
    """Write predictions of ``models:/<model_name>@<alias>`` for every row of ``source`` as parquet."""
    return batch_score_task(source, model_name, alias)
