"""Logging trained models to MLflow (models from code, signatures, lineage) and loading them back.

A registered model holds what prediction needs and nothing else: MLflow "models from code" (one
file of ``infra/model_code`` per model kind, importing only mlflow, numpy, pandas and the model's
framework) plus the model's artifacts. No tunepipe package travels with a model or lands on a
consumer's ``sys.path``, and no Python object is pickled. Pip requirements are pinned to the versions
this process trained with.

Each model is linked to what made it (MLflow 3 logged models): its parameters, the training and
test datasets, and the test metrics (logged with the model's id and the test dataset), so the model
page shows them; and to the code, with MLflow's ``mlflow.source.git.commit`` tag.
"""

from __future__ import annotations

import importlib.metadata
import json
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pandas as pd

from infra.tracking import source_tags

MODEL_CODE = Path(__file__).resolve().parent / "model_code"


@dataclass(frozen=True)
class Lineage:
    """What a model was trained and tested on, linked to the logged model.

    Attributes:
        params: hyperparameters and training facts (shown as the model's parameters).
        metrics: this model's metrics on ``test``.
        train: the MLflow dataset it was trained on (``dataset_input``), or None.
        test: the MLflow dataset ``metrics`` were computed on, or None.
    """

    params: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    train: Any | None = None
    test: Any | None = None


def pinned_requirements(*distributions: str) -> list[str]:
    """``name==version`` of each distribution as installed in this process (the training environment).

    The local version label is dropped (torch ``2.13.0+cpu`` → ``torch==2.13.0``): pip matches a
    public-version pin against local builds, so the pin installs from any index that has the version.
    """
    from packaging.version import Version

    return [f"{d}=={Version(importlib.metadata.version(d)).public}" for d in distributions]


def log_flights_model(run_id: str, booster: Any, example: pd.DataFrame, categories: dict[str, list[str]],
                      features: ModuleType, lineage: Lineage | None = None) -> str:
    """Log the booster as a pyfunc taking canonical features or raw flight rows; returns the model URI.

    Args:
        run_id: the run the model belongs to.
        booster: the trained XGBoost booster.
        example: canonical feature rows (training dtypes), the input example.
        categories: the training category set of each categorical feature.
        features: the data stage's feature module (``tuning_core.data.flight_features``); a copy of its
            file ships with the model, which builds features from raw rows with it.
        lineage: parameters, datasets and test metrics to link to the model.
    """
    import mlflow

    with tempfile.TemporaryDirectory() as tmp:
        booster.save_model(str(Path(tmp, "model.ubj")))
        Path(tmp, "categories.json").write_text(json.dumps(categories))
        shutil.copyfile(features.__file__, Path(tmp, "flight_features.py"))
        layouts = {"canonical": list(features.FEATURES),
                   **{s.name: s.feature_columns() for s in features.SCHEMAS.values()}}
        metadata = {"input": "a DataFrame of canonical features, or of raw flight rows with the columns of one "
                             "schema (any others are ignored; names as in 'layouts', any case); one prediction "
                             "per row", "layouts": layouts}
        _activate_experiment_of(run_id)
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name="model", python_model=str(MODEL_CODE / "flight_delay.py"),
                artifacts={"booster": str(Path(tmp, "model.ubj")), "categories": str(Path(tmp, "categories.json")),
                           "features": str(Path(tmp, "flight_features.py"))},
                signature=_flights_signature(), input_example=_plain(example.head(5), categories),
                pip_requirements=pinned_requirements("mlflow", "xgboost", "pandas", "numpy", "pyarrow"),
                metadata=metadata, **_model_extras(lineage),
            )
            _link(info.model_id, lineage)
    return info.model_uri


def _plain(df: pd.DataFrame, categories: dict[str, list[str]]) -> pd.DataFrame:
    """Rows as a consumer's dict, JSON or CSV gives them: strings and 64-bit numbers."""
    out = df.copy()
    for c in out.columns:
        if c in categories:
            out[c] = out[c].astype(str)
        elif pd.api.types.is_integer_dtype(out[c].dtype):
            out[c] = out[c].astype("int64")
        elif pd.api.types.is_float_dtype(out[c].dtype):
            out[c] = out[c].astype("float64")
    # Plain labels too: MLflow compares an example's columns with range(n) when saving it, which
    # pandas 3 deprecates for its string-dtype column index (a Pandas4Warning on every model logged).
    out.columns = pd.Index(list(out.columns), dtype=object)
    return out


def _flights_signature() -> Any:
    """The outputs only; the inputs are described in the model's metadata (``layouts``).

    An input schema would have MLflow drop every column it does not name, with a warning on each call
    (a raw BTS row has over 100 columns), match names case-sensitively where the data stage does not,
    and recast values before the model saw them. The model's feature code checks every value itself
    and names the column it cannot read.
    """
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, DataType, Schema

    outputs = Schema([ColSpec(DataType.float, "delay_probability"), ColSpec(DataType.integer, "delayed")])
    return ModelSignature(inputs=None, outputs=outputs)


def log_image_model(run_id: str, model: Any, example: np.ndarray, preprocessing: dict[str, Any],
                    lineage: Lineage | None = None) -> str:
    """Log a torch image classifier as a pyfunc taking raw 0-255 pixels or normalised images; returns the URI.

    The network ships as a ``torch.export`` program (graph and weights, no model class to import);
    ``preprocessing`` (the training split's ``mean`` and ``std``) is both the model's config, which
    normalises raw pixels at prediction time, and its metadata (``mlflow.models.get_model_info(uri)
    .metadata["preprocessing"]``) for consumers who prepare images themselves.

    Args:
        example: normalised float32 images, N x C x H x W (a few are the input example).
    """
    import mlflow
    import torch

    model = model.to("cpu").eval()
    x = torch.as_tensor(example[:2])
    with torch.no_grad():
        num_classes = int(model(x).shape[1])
    # Any batch size: the first dimension is dynamic.
    program = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    config = {"mean": float(preprocessing["mean"]), "std": float(preprocessing["std"]),
              "image_shape": [int(n) for n in example.shape[1:]], "num_classes": num_classes}
    with tempfile.TemporaryDirectory() as tmp:
        torch.export.save(program, str(Path(tmp, "model.pt2")))
        _activate_experiment_of(run_id)
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name="model", python_model=str(MODEL_CODE / "image_classifier.py"),
                artifacts={"program": str(Path(tmp, "model.pt2"))}, model_config=config,
                # No input schema: MLflow checks tensors for one exact dtype and shape, and this model
                # takes raw integer pixels and normalised floats in three layouts (checked by the model).
                signature=_image_signature(num_classes), input_example=np.asarray(example[:2], dtype=np.float32),
                pip_requirements=pinned_requirements("mlflow", "torch", "numpy", "pandas"),
                metadata={"preprocessing": preprocessing,
                          "input": "raw integer pixels 0-255 or normalised float32 images, N x H x W, "
                                   "N x C x H x W or N x C*H*W; returns N x classes logits"},
                **_model_extras(lineage),
            )
            _link(info.model_id, lineage)
    return info.model_uri


def _image_signature(num_classes: int) -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    return ModelSignature(inputs=None, outputs=Schema([TensorSpec(np.dtype("float32"), (-1, num_classes))]))


def _model_extras(lineage: Lineage | None) -> dict[str, Any]:
    """log_model's params and tags: the lineage's parameters and the code's git commit."""
    params = {k: str(v)[:6000] for k, v in (lineage.params if lineage else {}).items()}
    return {"params": params or None, "tags": source_tags() or None}


def _link(model_id: str, lineage: Lineage | None) -> None:
    """Log the datasets as the active run's inputs and the metrics with the model's id and the test
    dataset: MLflow shows metrics logged with ``model_id`` on the logged model's page."""
    import mlflow

    if lineage is None:
        return
    with _dataset_warnings_off():  # logging a dataset infers its schema
        if lineage.train is not None:
            mlflow.log_input(lineage.train, context="training")
        if lineage.test is not None:
            mlflow.log_input(lineage.test, context="test")
    if lineage.metrics:
        mlflow.log_metrics({k: float(v) for k, v in lineage.metrics.items()}, step=0, model_id=model_id,
                           dataset=lineage.test)


def _activate_experiment_of(run_id: str) -> None:
    """Make the run's experiment the active one: mlflow.start_run(run_id=...) refuses to resume a run
    of another experiment than the one an earlier set_experiment() in this process selected."""
    import mlflow

    mlflow.set_experiment(experiment_id=mlflow.MlflowClient().get_run(run_id).info.experiment_id)


@contextmanager
def _dataset_warnings_off() -> Iterator[None]:
    """Two warnings MLflow raises for any dataset record, neither about our data:

    * a local path "can be interpreted in multiple ways: LocalArtifactDatasetSource,
      LocalArtifactDatasetSource": MLflow registers its local source for both the "" and the "file"
      scheme, so every local path matches it twice;
    * "Hint: Inferred schema contains integer column(s)": advice for model signatures (missing values
      at inference time), printed when a dataset record's schema is inferred.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted in multiple ways",
                                category=UserWarning)
        warnings.filterwarnings("ignore", message="Hint: Inferred schema contains integer column", category=UserWarning)
        yield


def dataset_input(df: pd.DataFrame, source: str, name: str, digest: str) -> Any:
    """An MLflow dataset entity whose digest is our content hash (same data, same digest)."""
    import mlflow.data

    with _dataset_warnings_off():
        dataset = mlflow.data.from_pandas(df, source=source, name=name, digest=digest[:36], targets=None)
    # MLflow infers the record's schema value by value when it is logged (1.5 s on 278k flights, most
    # of the model-logging time); the column types of a sample and pandas' vectorised null check give
    # the same schema (checked against the full inference) in milliseconds.
    from mlflow.types.schema import ColSpec, Schema
    from mlflow.types.utils import _infer_schema

    with _dataset_warnings_off():
        sample = _infer_schema(df.head(1000))
    dataset.__dict__["schema"] = Schema([ColSpec(c.type, c.name, required=not bool(df[c.name].isna().any()))
                                         for c in sample.inputs])
    return dataset


def dataset_input_numpy(x: np.ndarray, y: np.ndarray, source: str, name: str, digest: str) -> Any:
    import mlflow.data

    with _dataset_warnings_off():
        return mlflow.data.from_numpy(x, targets=y, source=source, name=name, digest=digest[:36])


def load_pyfunc(model_uri: str) -> Any:
    import mlflow.pyfunc

    return mlflow.pyfunc.load_model(model_uri)
