"""Legacy: the cloudpickled pyfunc wrapper of flights models registered before models-from-code.

New flights models are logged from ``infra/model_code/flight_delay.py`` and need nothing from here.
Versions logged earlier hold a pickled ``infra.pyfunc_models.FlightDelayModel`` (and a copy of this
package in their ``code/``); in a process that has already imported our ``infra`` (the pipeline,
re-evaluating such a version as the champion) unpickling resolves this module, so it stays until no
such version is in use. Keep it self-contained: only xgboost/pandas/numpy.
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
