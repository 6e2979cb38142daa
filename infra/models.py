"""Logging trained models to MLflow (flavours, signatures, input examples) and loading them back."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

import infra


def log_flights_model(run_id: str, booster: Any, example: pd.DataFrame, categories: dict[str, list[str]],
                      dataset: Any | None = None) -> str:
    """Log the booster as a pyfunc model that accepts canonical flight features; returns the model URI."""
    import mlflow
    from mlflow.models import infer_signature

    from infra.pyfunc_models import FlightDelayModel

    features = [c for c in example.columns]
    schema = {"features": features, "categories": categories,
              "dtypes": {c: str(example[c].dtype) for c in features if c not in categories}}
    with tempfile.TemporaryDirectory() as tmp:
        booster_path = Path(tmp, "model.ubj")
        booster.save_model(str(booster_path))
        schema_path = Path(tmp, "schema.json")
        schema_path.write_text(json.dumps(schema))
        # Consumers send plain strings for categorical columns and pandas' default int64/float64
        # numbers (a frame from a dict, CSV or JSON); the signature says so. A signature inferred
        # from the training dtypes (int8, float32) would make MLflow reject such frames, as
        # int64 -> int32 is not a safe cast. The wrapper casts to the training dtypes itself.
        plain = example.copy()
        for c in plain.columns:
            if c in categories:
                plain[c] = plain[c].astype(str)
            elif pd.api.types.is_integer_dtype(plain[c].dtype):
                plain[c] = plain[c].astype("int64")
            elif pd.api.types.is_float_dtype(plain[c].dtype):
                plain[c] = plain[c].astype("float64")
        wrapper = FlightDelayModel()
        _activate_experiment_of(run_id)
        with mlflow.start_run(run_id=run_id):
            if dataset is not None:
                mlflow.log_input(dataset, context="training")
            sample_out = pd.DataFrame({"delay_probability": np.zeros(len(plain), dtype="float32"),
                                       "delayed": np.zeros(len(plain), dtype="int8")})
            info = mlflow.pyfunc.log_model(
                name="model", python_model=wrapper,
                artifacts={"booster": str(booster_path), "schema": str(schema_path)},
                # Ship our wrapper with the model so consumers need only mlflow + xgboost.
                code_paths=[str(Path(infra.__file__).parent)],
                signature=_consumer_signature(infer_signature(plain, sample_out)), input_example=plain.head(5),
                pip_requirements=["mlflow", "xgboost", "pandas", "numpy"],
            )
    return info.model_uri


def _consumer_signature(signature: Any) -> Any:
    """Float feature columns (distance, flight_number: float only so that they can be missing) as
    MLflow's "any": consumers send them as integers (a dict, JSON or a CSV without gaps gives int64),
    and MLflow refuses int64 where the signature says double. The wrapper converts them to numbers
    itself and names the column when a value is not a number."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import AnyType, ColSpec, DataType, Schema

    cols = [ColSpec(AnyType(), c.name, required=c.required) if c.type in (DataType.double, DataType.float) else c
            for c in signature.inputs.inputs]
    return ModelSignature(inputs=Schema(cols), outputs=signature.outputs, params=signature.params)


def log_torch_model(run_id: str, model: Any, example: np.ndarray, dataset: Any | None = None,
                    preprocessing: dict[str, Any] | None = None) -> str:
    """Log a torch module with mlflow.pytorch (signature, input example); returns the model URI.

    ``preprocessing`` goes into the model's metadata (``MLmodel``; ``mlflow.models.get_model_info(uri)
    .metadata["preprocessing"]``): the model takes normalised images, and a registry consumer holding
    raw pixels needs the training split's statistics to prepare them.
    """
    import mlflow
    import mlflow.pytorch
    import torch
    from mlflow.models import infer_signature

    import tuning_core

    model = model.to("cpu").eval()
    with torch.no_grad():
        out = model(torch.as_tensor(example[:5])).numpy()
    _activate_experiment_of(run_id)
    with mlflow.start_run(run_id=run_id):
        if dataset is not None:
            mlflow.log_input(dataset, context="training")
        info = mlflow.pytorch.log_model(
            model, name="model", signature=infer_signature(example[:5], out), input_example=example[:2],
            code_paths=[str(Path(tuning_core.__file__).parent)],
            pip_requirements=["mlflow", "torch", "numpy"],
            metadata={"preprocessing": preprocessing} if preprocessing else None,
        )
    return info.model_uri


def _activate_experiment_of(run_id: str) -> None:
    """Make the run's experiment the active one: mlflow.start_run(run_id=...) refuses to resume a run
    of another experiment than the one an earlier set_experiment() in this process selected."""
    import mlflow

    mlflow.set_experiment(experiment_id=mlflow.MlflowClient().get_run(run_id).info.experiment_id)


def dataset_input(df: pd.DataFrame, source: str, name: str, digest: str) -> Any:
    """An MLflow dataset entity whose digest is our content hash (same data, same digest)."""
    import mlflow.data

    return mlflow.data.from_pandas(df, source=source, name=name, digest=digest[:36], targets=None)


def load_pyfunc(model_uri: str) -> Any:
    import mlflow.pyfunc

    return mlflow.pyfunc.load_model(model_uri)


def dataset_input_numpy(x: np.ndarray, y: np.ndarray, source: str, name: str, digest: str) -> Any:
    import mlflow.data

    return mlflow.data.from_numpy(x, targets=y, source=source, name=name, digest=digest[:36])
