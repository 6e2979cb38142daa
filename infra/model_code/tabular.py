"""A tabular model as a registry consumer runs it (MLflow models-from-code; see infra.model_code).

Artifacts: the XGBoost booster and ``schema.json`` (the label, the task, the classes, every feature with
its kind, the category set of each string feature) written by the tabular workload. Input: records as a
consumer has them (a DataFrame, a list of row dicts, {column: values} or one row as {column: value});
columns other than the features are ignored. Each feature is typed exactly as the data stage typed it
for training (``tuning_core.data.tabular.typed_features``): numbers as float64, strings as categories
of the training set (an unseen value is missing, which XGBoost handles). Output: the class and its
probability (binary), the class and each class's probability (multiclass), or the prediction.
"""

import json
from typing import Any

import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import set_model
from mlflow.pyfunc import PythonModel


def _frame(data: Any) -> pd.DataFrame:
    if isinstance(data, pd.DataFrame):
        return data
    if isinstance(data, dict) and all(np.ndim(v) == 0 for v in data.values()):
        return pd.DataFrame([data])
    return pd.DataFrame(data)


class TabularModel(PythonModel):
    def load_context(self, context: Any) -> None:
        import xgboost as xgb

        self.booster = xgb.Booster(model_file=context.artifacts["booster"])
        with open(context.artifacts["schema"]) as f:
            self.schema = json.load(f)

    def features(self, data: Any) -> pd.DataFrame:
        """The feature columns, in training order and types; a missing column or a non-number where a
        number belongs is refused by name (MLflow's scoring server answers it with 400)."""
        df = _frame(data)
        features = self.schema["features"]
        missing = [c for c in features if c not in df.columns]
        if missing:
            raise MlflowException.invalid_parameter_value(
                f"tabular input: missing columns {missing}; expected the columns {list(features)}")
        out = pd.DataFrame(index=df.index)
        for name, kind in features.items():
            if kind == "category":
                values = df[name].map(lambda v: None if pd.isna(v) else str(v))
                out[name] = pd.Categorical(values, categories=self.schema["categories"][name])
                continue
            numbers = pd.to_numeric(df[name], errors="coerce")
            bad = df[name][numbers.isna() & df[name].notna()]
            if len(bad):
                raise MlflowException.invalid_parameter_value(
                    f"tabular input: column {name!r}: {bad.iloc[0]!r} is not a number (missing values are fine)")
            out[name] = numbers.astype("float64")
        return out

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        import xgboost as xgb

        frame = self.features(model_input)
        pred = self.booster.predict(xgb.DMatrix(frame, enable_categorical=True))
        task, classes = self.schema["task"], self.schema["classes"]
        if task == "regression":
            return pd.DataFrame({"prediction": pred.astype("float64")})
        if task == "binary":
            labels = np.asarray(classes, dtype=object)[(pred >= 0.5).astype(int)]
            return pd.DataFrame({"label": pd.Series(labels).astype(type(classes[0])),
                                 "probability": pred.astype("float64")})
        pred = pred.reshape(len(frame), len(classes))
        labels = np.asarray(classes, dtype=object)[pred.argmax(axis=1)]
        out = pd.DataFrame({"label": pd.Series(labels).astype(type(classes[0]))})
        for i, c in enumerate(classes):
            out[f"probability_{c}"] = pred[:, i].astype("float64")
        return out


set_model(TabularModel())
