"""MLflow pyfunc wrappers that registry consumers load with ``mlflow.pyfunc.load_model``.

This file is shipped with each logged model (``code_paths``), so it must stay self-contained:
no imports of tunepipe modules, only xgboost/pandas/numpy. A consumer passes a DataFrame of
the canonical flight features (strings for carrier/origin/dest are fine) and gets back the
delay probability and the predicted label.
"""

from __future__ import annotations

import json
from typing import Any

import mlflow.pyfunc


class FlightDelayModel(mlflow.pyfunc.PythonModel):
    """XGBoost booster + the training feature schema (column order, category sets)."""

    def load_context(self, context: Any) -> None:
        import xgboost as xgb

        self.booster = xgb.Booster(model_file=context.artifacts["booster"])
        with open(context.artifacts["schema"]) as f:
            self.schema = json.load(f)

    def _frame(self, model_input: Any) -> Any:
        import pandas as pd

        df = pd.DataFrame(model_input).copy()
        missing = [c for c in self.schema["features"] if c not in df.columns]
        if missing:
            raise ValueError(f"input is missing feature columns {missing}; expected {self.schema['features']}")
        df = df[self.schema["features"]]
        for col, cats in self.schema["categories"].items():
            # Same category set and order as in training; unseen values become missing.
            df[col] = pd.Categorical(df[col].astype("string").astype(object), categories=cats)
        for col in self.schema["features"]:
            if col not in self.schema["categories"]:
                # Exactly the training dtype: xgboost checks feature types as well as names.
                numbers = pd.to_numeric(df[col], errors="coerce")
                bad = df[col][numbers.isna() & df[col].notna()]
                if len(bad):
                    raise ValueError(f"input column {col!r}: {bad.iloc[0]!r} is not a number; expected numbers "
                                     f"(missing values are fine)")
                df[col] = numbers.astype(self.schema["dtypes"][col])
        return df

    def predict(self, context, model_input, params=None):  # no hints: MLflow would infer a signature from them
        import pandas as pd
        import xgboost as xgb

        proba = self.booster.predict(xgb.DMatrix(self._frame(model_input), enable_categorical=True))
        return pd.DataFrame({"delay_probability": proba, "delayed": (proba >= 0.5).astype("int8")})
