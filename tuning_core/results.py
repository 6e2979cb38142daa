"""Typed values that cross stage boundaries; the summary JSON is their serialisation."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict


class _Result(BaseModel):
    model_config = ConfigDict(frozen=True)


class DataVersion(_Result):
    """A prepared, validated data version on storage.

    Attributes:
        dataset: "flights" or "fashion-mnist".
        version: content hash (folder name).
        uri: URI of the version folder (local path or s3://...).
        path: the folder as a path inside the storage filesystem.
        schema_name: detected input schema.
        rows: rows (or images) per split.
        manifest: the full manifest.json content.
    """

    dataset: str
    version: str
    uri: str
    path: str
    schema_name: str
    rows: dict[str, int]
    manifest: dict[str, Any]

    def report_rows(self) -> list[dict[str, Any]]:
        """Rows for a validation table (Prefect artifact, CLI)."""
        rows = [{"item": f"rows.{k}", "value": v} for k, v in self.rows.items()]
        for k, v in self.manifest.get("dropped", {}).items():
            rows.append({"item": f"dropped.{k}", "value": v})
        for k in ("schema", "header", "label_rate", "source"):
            if k in self.manifest:
                rows.append({"item": k, "value": self.manifest[k]})
        bad = self.manifest.get("bad_rows") or {}
        if bad:  # rows that did not split into the file's columns (flights), skipped
            rows.append({"item": "bad_rows.skipped", "value": bad.get("skipped", 0)})
            for i, ex in enumerate(bad.get("examples", []), start=1):
                rows.append({"item": f"bad_rows.example_{i}",
                             "value": f"{ex['file']} line {ex['line']}: {ex['problem']}"})
        for k, v in (self.manifest.get("null_rates") or {}).items():
            rows.append({"item": f"null_rate.{k}", "value": v})
        return rows


class TrialRecord(_Result):
    trial_id: str
    config: dict[str, Any]
    status: str
    iterations: int
    metric: float | None
    best_metric: float | None
    metrics: dict[str, float]
    time_s: float
    node_id: str | None = None
    checkpoint_uri: str | None = None
    history: list[dict[str, Any]] = []


class TuningResult(_Result):
    experiment_name: str
    experiment_uri: str
    search: str
    scheduler: str
    metric: str
    mode: str
    num_trials: int
    best_trial_id: str
    best_config: dict[str, Any]
    best_metric: float
    best_iteration: int
    best_checkpoint_uri: str | None
    resumed: bool
    wall_time_s: float
    trials: list[TrialRecord]
    leaderboard_uri: str | None = None
    curves_png_uri: str | None = None
    parallel_png_uri: str | None = None  # parallel-coordinates plot of the trials (tuning_core.plots)

    def leaderboard_rows(self) -> list[dict[str, Any]]:
        key = (lambda t: -(t.best_metric or float("-inf"))) if self.mode == "max" else (
            lambda t: t.best_metric if t.best_metric is not None else float("inf"))
        rows = []
        for rank, t in enumerate(sorted(self.trials, key=key), start=1):
            rows.append({"rank": rank, "trial": t.trial_id, "status": t.status, "iterations": t.iterations,
                         f"best_{self.metric}": t.best_metric, "time_s": round(t.time_s, 2),
                         **{k: v for k, v in t.config.items()}})
        return rows


class RetrainResult(_Result):
    mlflow_run_id: str
    model_uri: str
    test_metrics: dict[str, float]
    baseline_test_metrics: dict[str, float]
    uplift: dict[str, float]
    rounds: int
    fit_s: float = 0.0  # compute of the final fits and their test predictions, apart from logging


class RegistryResult(_Result):
    model_name: str
    version: str
    aliases: list[str]
    promoted: bool
    decision: str
    champion_before: str | None = None
