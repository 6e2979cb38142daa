"""FashionMNIST flow: IDX files → PyTorch CNN, tuned with Ray Tune, registered in MLflow."""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.pipeline import run_pipeline, start_name
from tuning_core.config import FashionPipeline


@flow(name="fashion-mnist-tuning", flow_run_name=start_name("fashion-mnist"), validate_parameters=True)
def fashion_mnist_tuning(cfg: FashionPipeline) -> dict[str, Any]:
    """Prepare the IDX data, tune the CNN, retrain the best config, register it, report."""
    return run_pipeline(cfg)
