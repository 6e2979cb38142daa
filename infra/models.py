"""Building what MLflow logs for a trained model (models from code, signatures, lineage) and loading
models back. The writes themselves happen in ``infra.tracking`` (``log_model``); what a model is comes
from its workload as a plain ``ModelSpec`` (``tuning_core.workloads``).

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
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from infra.tracking import source_tags
from tuning_core.workloads.base import ModelSpec

MODEL_CODE = Path(__file__).resolve().parent / "model_code"


def pinned_requirements(*distributions: str) -> list[str]:
    """``name==version`` of each distribution as installed in this process (the training environment).

    The local version label is dropped (torch ``2.13.0+cpu`` → ``torch==2.13.0``): pip matches a
    public-version pin against local builds, so the pin installs from any index that has the version.
    """
    from packaging.version import Version

    return [f"{d}=={Version(importlib.metadata.version(d)).public}" for d in distributions]


def log_model_kwargs(spec: ModelSpec) -> dict[str, Any]:
    """``mlflow.pyfunc.log_model``'s arguments for a workload's model (``infra.tracking.log_model`` logs it):
    the model-from-code file, the artifacts the workload wrote, the signature's outputs, pinned
    requirements, the lineage's parameters and the code's commit."""
    return {
        "name": "model", "python_model": str(MODEL_CODE / spec.code), "artifacts": dict(spec.artifacts),
        "model_config": spec.model_config, "signature": _signature(spec.outputs),
        "input_example": spec.input_example, "pip_requirements": pinned_requirements(*spec.requirements),
        "metadata": spec.metadata or None, **_model_extras(spec.params),
    }


def _signature(outputs: dict[str, Any]) -> Any:
    """The outputs only; no input schema. An input schema would have MLflow drop every column it does
    not name, with a warning on each call (a raw BTS row has over 100 columns), match names
    case-sensitively where the data stage does not, recast values before the model saw them, and check
    tensors for one exact dtype and shape; each model's code checks its input itself and names what it
    cannot read (``infra/model_code``)."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, DataType, Schema, TensorSpec

    if "tensor" in outputs:
        dtype, shape = outputs["tensor"]
        return ModelSignature(inputs=None, outputs=Schema([TensorSpec(np.dtype(dtype), tuple(shape))]))
    return ModelSignature(inputs=None, outputs=Schema([ColSpec(getattr(DataType, kind), name)
                                                       for name, kind in outputs["columns"]]))


def lineage_datasets(spec: ModelSpec) -> dict[str, Any]:
    """MLflow dataset entities of the model's training and test data, by context ("training", "test")."""
    out = {}
    for context, sample in (("training", spec.train), ("test", spec.test)):
        if sample is None:
            continue
        if sample.frame is not None:
            out[context] = dataset_input(sample.frame, sample.source, sample.name, sample.digest)
        else:
            out[context] = dataset_input_numpy(sample.x, sample.y, sample.source, sample.name, sample.digest)
    return out


def _model_extras(params: dict[str, Any]) -> dict[str, Any]:
    """log_model's params and tags: the lineage's parameters and the code's git commit."""
    params = {k: str(v)[:6000] for k, v in params.items()}
    return {"params": params or None, "tags": source_tags() or None}


@contextmanager
def dataset_warnings_off() -> Iterator[None]:
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

    with dataset_warnings_off():
        dataset = mlflow.data.from_pandas(df, source=source, name=name, digest=digest[:36], targets=None)
    # MLflow infers the record's schema value by value when it is logged (1.5 s on 278k flights, most
    # of the model-logging time); the column types of a sample and pandas' vectorised null check give
    # the same schema (checked against the full inference) in milliseconds.
    from mlflow.types.schema import ColSpec, Schema
    from mlflow.types.utils import _infer_schema

    with dataset_warnings_off():
        sample = _infer_schema(df.head(1000))
    dataset.__dict__["schema"] = Schema([ColSpec(c.type, c.name, required=not bool(df[c.name].isna().any()))
                                         for c in sample.inputs])
    return dataset


def dataset_input_numpy(x: np.ndarray, y: np.ndarray, source: str, name: str, digest: str) -> Any:
    import mlflow.data

    with dataset_warnings_off():
        return mlflow.data.from_numpy(x, targets=y, source=source, name=name, digest=digest[:36])


@contextmanager
def loaded_pyfunc(model_uri: str) -> Iterator[Any]:
    """The model at ``model_uri``, downloaded into a temporary folder removed once the block ends.
    (``mlflow.pyfunc.load_model`` alone downloads into a folder of its own that it never removes:
    one per champion re-evaluation and batch scoring, left in /tmp.)"""
    import mlflow.pyfunc

    with tempfile.TemporaryDirectory(prefix="tunepipe-model-") as folder:
        yield mlflow.pyfunc.load_model(model_uri, dst_path=folder)
