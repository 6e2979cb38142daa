"""Flights flow: flight-delay CSVs → XGBoost, tuned with Ray Tune, registered in MLflow."""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.pipeline import run_pipeline, start_name
from tuning_core.config import FlightsPipeline


@flow(name="flights-tuning", flow_run_name=start_name("flights"), validate_parameters=True)
def flights_tuning(cfg: FlightsPipeline = FlightsPipeline()) -> dict[str, Any]:  # noqa: B008 - a frozen model
    """Prepare the flights data, tune XGBoost, retrain the best config, register it, report."""
    return run_pipeline(cfg)
