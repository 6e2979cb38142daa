"""Batch scoring with the registry's champion: read flights, predict, write parquet under the storage root."""

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
from infra.storage import filesystem_for
from tasks.stages import _retry_if_transient
from tasks.workloads import Context, plain_features
from tuning_core.errors import TrackingError


def score(source: str, model_name: str, alias: str, ctx: Context) -> dict[str, Any]:
    """Score every row of ``source`` with ``models:/<model_name>@<alias>``; returns where and how many."""
    from mlflow.exceptions import MlflowException

    from tuning_core.data import flights

    tracker = ctx.tracker()
    try:
        mv = tracker.client.get_model_version_by_alias(model_name, alias)
    except MlflowException:
        raise TrackingError(f"model registry {tracker.uri}: no version of {model_name!r} has alias {alias!r}") from None
    src_fs, src_path = filesystem_for(source, ctx.settings)
    frame, schema = flights.read_canonical(src_fs, src_path)
    model = mlmodels.load_pyfunc(f"models:/{model_name}@{alias}")
    out = plain_features(frame)
    preds = model.predict(out)
    out["delay_probability"] = preds["delay_probability"].to_numpy()
    out["delayed"] = preds["delayed"].to_numpy()
    digest = hashlib.sha256(f"{source}|{model_name}|{mv.version}".encode()).hexdigest()[:12]
    folder = ctx.storage.path("predictions", f"{model_name}-v{mv.version}")
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pandas(out, preserve_index=False), buf)
    if not ctx.storage.is_s3:
        ctx.storage.fs.create_dir(folder, recursive=True)
    with ctx.storage.fs.open_output_stream(f"{folder}/{digest}.parquet") as f:
        f.write(buf.getvalue())
    return {"source": source, "schema": schema, "model": f"{model_name}@{alias}", "version": mv.version,
            "rows": len(out), "delayed_rate": float(out["delayed"].mean()) if len(out) else 0.0,
            "output": ctx.storage.to_uri(f"{folder}/{digest}.parquet")}


# Retry delays: tasks.stages.with_retry_policy, applied by the flow.
@task(name="batch_score", tags=["tunepipe", "scoring"], retries=3, retry_jitter_factor=0.5,
      retry_condition_fn=_retry_if_transient, timeout_seconds=3600)
def batch_score_task(source: str, model_name: str, alias: str = "champion") -> dict[str, Any]:
    result = score(source, model_name, alias, Context.build(get_settings()))
    get_run_logger().info("scored %d rows from %s with %s v%s → %s", result["rows"], source, result["model"],
                          result["version"], result["output"])
    create_table_artifact(key="batch-score", table=[{"item": k, "value": v} for k, v in result.items()])
    return result
