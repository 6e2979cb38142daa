"""Batch scoring with the registry's champion: read rows, predict, write parquet under the storage root.

The rows are read by the workload whose pipeline registered the model (``Tracker.model_workload``), so
scoring takes whatever rows that workload's data stage reads.
"""

from __future__ import annotations

import hashlib
import io
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact

from infra import models as mlmodels
from infra.settings import get_settings
from infra.storage import source_filesystem
from tasks.stages import _retry_if_transient
from tasks.workloads import Context, workload_for_model
from tuning_core.sources import DataSource


def score(source: str, model_name: str, alias: str, ctx: Context) -> dict[str, Any]:
    """Score every row of ``source`` with ``models:/<model_name>@<alias>``; returns where and how many."""
    tracker = ctx.tracker()
    workload = workload_for_model(ctx, model_name, alias)
    mv = tracker.client.get_model_version_by_alias(model_name, alias)
    src = DataSource.parse(source, where="--data")
    rows, schema = workload.read_for_scoring(src, source_filesystem(src, ctx.settings))
    with mlmodels.loaded_pyfunc(f"models:/{model_name}@{alias}") as model:
        out, figures = workload.scored(rows, model.predict(rows))
    digest = hashlib.sha256(f"{source}|{model_name}|{mv.version}".encode()).hexdigest()[:12]
    folder = ctx.storage.path("predictions", f"{model_name}-v{mv.version}")
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pandas(out, preserve_index=False), buf)
    if not ctx.storage.is_s3:
        ctx.storage.fs.create_dir(folder, recursive=True)
    with ctx.storage.fs.open_output_stream(f"{folder}/{digest}.parquet") as f:
        f.write(buf.getvalue())
    return {"source": source, "schema": schema, "model": f"{model_name}@{alias}", "version": mv.version,
            "rows": len(out), **figures, "output": ctx.storage.to_uri(f"{folder}/{digest}.parquet")}


# Retry delays: tasks.stages.with_retry_policy, applied by the flow.
@task(name="batch_score", tags=["tunepipe", "scoring"], retries=3, retry_jitter_factor=0.5,
      retry_condition_fn=_retry_if_transient, timeout_seconds=3600)
def batch_score_task(source: str, model_name: str, alias: str = "champion") -> dict[str, Any]:
    result = score(source, model_name, alias, Context.build(get_settings()))
    get_run_logger().info("scored %d rows from %s with %s v%s → %s", result["rows"], source, result["model"],
                          result["version"], result["output"])
    create_table_artifact(key="batch-score", table=[{"item": k, "value": v} for k, v in result.items()])
    return result
