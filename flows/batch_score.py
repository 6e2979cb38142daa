"""Batch scoring flow: score a file / glob / s3:// prefix of rows with a registered model.

The rows are read by the workload that registered the model (``tasks.scoring``), so this one flow
scores for every workload that scores tables of rows.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from infra.settings import get_settings
from tasks.scoring import batch_score_task
from tasks.stages import with_retry_policy
from tuning_core.config import DEFAULT_MODEL_NAME


@flow(name="batch-score", flow_run_name="score-{model_name}-{alias}")
def batch_score(source: str, model_name: str = DEFAULT_MODEL_NAME, alias: str = "champion") -> dict[str, Any]:
    """Write predictions of ``models:/<model_name>@<alias>`` for every row of ``source`` as parquet."""
    return with_retry_policy(batch_score_task, get_settings())(source, model_name, alias)
