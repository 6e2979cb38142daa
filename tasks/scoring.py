"""Batch scoring with the registry's champion: read rows, predict, write parquet under the storage root.

The rows are read by the workload whose pipeline registered the model (``Tracker.model_workload``), so
scoring takes whatever rows that workload's data stage reads.
"""

from __future__ import annotations

import contextlib
import hashlib
import tempfile
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact

from infra import models as mlmodels
from infra.settings import get_settings
from infra.storage import redact, source_filesystem
from tasks.stages import _retry_if_transient
from tasks.workloads import PART_ROWS, Context, workload_for_model
from tuning_core.errors import DataError, storage_failure
from tuning_core.sources import DataSource


def score(source: str, model_name: str, alias: str, ctx: Context) -> dict[str, Any]:
    """Score every row of ``source`` with ``models:/<model_name>@<alias>``; returns where and how many.

    The rows are read and scored a part at a time (one file's rows, ``PART_ROWS`` rows a prediction call)
    into a local parquet file, which goes to the storage root once the whole source has been scored: a
    source of many files is never held whole, and one that fails (a bad file, too many malformed rows)
    leaves no predictions behind.
    """
    tracker = ctx.tracker()
    workload = workload_for_model(ctx, model_name, alias)
    mv = tracker.client.get_model_version_by_alias(model_name, alias)
    src = DataSource.parse(source, where="--data")
    digest = hashlib.sha256(f"{source}|{model_name}|{mv.version}".encode()).hexdigest()[:12]
    target = f"{ctx.storage.path('predictions', f'{model_name}-v{mv.version}')}/{digest}.parquet"
    with mlmodels.loaded_pyfunc(f"models:/{model_name}@{alias}") as model, \
            tempfile.TemporaryDirectory(prefix="tunepipe-score-") as tmp:
        out = _Predictions(Path(tmp) / "predictions.parquet")

        def consume(rows: Any) -> None:
            for start in range(0, len(rows), PART_ROWS):
                part = rows.iloc[start:start + PART_ROWS]
                out.add(*workload.scored(part, model.predict(part)))

        try:
            schema = workload.rows_to_score(src, source_filesystem(src, ctx.settings), consume)
        finally:
            out.close()
        if not out.rows:
            raise DataError(f"{source}: no rows to score")
        _publish(out.path, ctx, target)
    return {"source": source, "schema": schema, "model": f"{model_name}@{alias}", "version": mv.version,
            "rows": out.rows, **out.figures(), "output": ctx.storage.to_uri(target)}


class _Predictions:
    """The scored parts, appended to one parquet file; the report's figures averaged over the rows."""

    def __init__(self, path: Path) -> None:
        self.path, self.rows = path, 0
        self._writer: pq.ParquetWriter | None = None
        self._sums: dict[str, float] = {}

    def add(self, scored: Any, figures: dict[str, Any]) -> None:
        table = pa.Table.from_pandas(scored, preserve_index=False)
        if self._writer is None:
            # A column without a value in the first part (all missing) is null-typed there: text later on.
            schema = pa.schema([f.with_type(pa.string()) if pa.types.is_null(f.type) else f for f in table.schema])
            self._writer = pq.ParquetWriter(self.path, schema)
        self._writer.write_table(table.cast(self._writer.schema) if table.schema != self._writer.schema else table)
        for key, value in figures.items():  # per-row rates (e.g. delayed_rate): weighted by the part's rows
            self._sums[key] = self._sums.get(key, 0.0) + float(value) * len(scored)
        self.rows += len(scored)

    def figures(self) -> dict[str, float]:
        return {k: v / self.rows for k, v in self._sums.items()} if self.rows else {}

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def _publish(local: Path, ctx: Context, target: str) -> None:
    """Put the finished file at ``target`` whole: copied next to it under a temporary name, then moved
    (a rename on a local root; on S3 a server-side copy, so readers never see a partial object)."""
    fs = ctx.storage.fs
    folder, partial = target.rsplit("/", 1)[0], f"{target}.partial"
    if not ctx.storage.is_s3:
        fs.create_dir(folder, recursive=True)
    try:
        pafs.copy_files(str(local), partial, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
        fs.move(partial, target)
    except BaseException as err:
        with contextlib.suppress(Exception):
            fs.delete_file(partial)
        if isinstance(err, OSError):
            raise storage_failure(f"{ctx.storage.to_uri(target)}: cannot write the predictions "
                                  f"({redact(str(err).splitlines()[0] if str(err) else type(err).__name__)})", err) \
                from None
        raise


# Retry delays: tasks.stages.with_retry_policy, applied by the flow.
@task(name="batch_score", tags=["tunepipe", "scoring"], retries=3, retry_jitter_factor=0.5,
      retry_condition_fn=_retry_if_transient, timeout_seconds=3600)
def batch_score_task(source: str, model_name: str, alias: str = "champion") -> dict[str, Any]:
    result = score(source, model_name, alias, Context.build(get_settings()))
    get_run_logger().info("scored %d rows from %s with %s v%s → %s", result["rows"], source, result["model"],
                          result["version"], result["output"])
    create_table_artifact(key="batch-score", table=[{"item": k, "value": v} for k, v in result.items()])
    return result
