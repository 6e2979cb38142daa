"""Retrain the best configuration on train+valid and evaluate it on the test split.

Returns a ``FinalModel`` that infra logs to MLflow; nothing here talks to MLflow.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tuning_core.errors import ConfigError
from tuning_core.evaluate import binary_metrics, confusion, confusion_png, roc_png
from tuning_core.trainables.xgboost import LABEL, fit_booster, import_xgboost, load_booster

log = logging.getLogger(__name__)

# The untuned reference: xgboost's own defaults with the scikit-learn wrapper's 100 rounds.
DEFAULT_XGB_CONFIG: dict[str, Any] = {}
DEFAULT_XGB_ROUNDS = 100


@dataclass
class FinalModel:
    """A model ready to be logged and registered, with its test evaluation.

    Attributes:
        model: the trained object (xgboost Booster or torch Module).
        rounds: boosting rounds / epochs it was trained for.
        test_metrics / baseline_test_metrics: on the test split; uplift = tuned - baseline.
        plots: file name → PNG bytes (confusion matrix, ROC curve).
        source: "retrained" or "checkpoint" (``retrain: false``).
    """

    model: Any
    rounds: int
    test_metrics: dict[str, float]
    baseline_test_metrics: dict[str, float]
    plots: dict[str, bytes] = field(default_factory=dict)
    source: str = "retrained"
    extra: dict[str, Any] = field(default_factory=dict)
    fit_s: float = 0.0  # seconds of training and predicting (tuned and default), not of plots or logging

    @property
    def uplift(self) -> dict[str, float]:
        return {k: self.test_metrics[k] - self.baseline_test_metrics[k]
                for k in self.test_metrics if k in self.baseline_test_metrics}


def scaled_rounds(best_iteration: int, n_train: int, n_valid: int) -> int:
    """Rounds for retraining on train+valid.

    The best trial peaked at ``best_iteration`` rounds on ``n_train`` rows. With more rows each
    round's trees fit slightly less of the signal, so we scale the round count by the data growth
    (n_train + n_valid) / n_train, the common practice when refitting a boosted model with early
    stopping on the full data (e.g. 1.18x for a 70/15 split).
    """
    return max(1, round(best_iteration * (n_train + n_valid) / max(1, n_train)))


def predict_xgboost(booster: Any, frame: pd.DataFrame, label: str = LABEL) -> np.ndarray:
    xgb = import_xgboost()
    x = frame.drop(columns=[label], errors="ignore")
    return booster.predict(xgb.DMatrix(x, enable_categorical=True))


FitMany = Callable[[list[tuple[dict[str, Any], int]]], list[Any]]


def predict_parts(test: pd.DataFrame | Iterable[pd.DataFrame], *boosters: Any,
                   label: str = LABEL) -> tuple[np.ndarray, ...]:
    """(labels, each booster's predictions) over the test split, given whole or in parts."""
    from tuning_core.workloads.base import parts

    labels, predicted = [], [[] for _ in boosters]
    for part in parts(test):
        labels.append(part[label].to_numpy())
        for out, booster in zip(predicted, boosters, strict=True):
            out.append(predict_xgboost(booster, part, label))
    return np.concatenate(labels), *(np.concatenate(p) for p in predicted)


def fit_in_process(train: pd.DataFrame, valid: pd.DataFrame, nthread: int = 2, label: str = LABEL,
                   task: dict[str, Any] | None = None) -> FitMany:
    """Fit (config, rounds) pairs on train+valid in this process (the single-process retrain)."""
    full = pd.concat([train, valid], ignore_index=True)
    return lambda fits: [fit_booster(config, full, rounds, nthread=nthread, label=label, task=task)
                         for config, rounds in fits]


def retrain_xgboost(best_config: dict[str, Any], best_iteration: int, train: pd.DataFrame | None,
                    valid: pd.DataFrame | None, test: pd.DataFrame | Iterable[pd.DataFrame], *, retrain: bool = True,
                    checkpoint_dir: Path | None = None, nthread: int = 2, fit_many: FitMany | None = None,
                    rows: tuple[int, int] | None = None) -> FinalModel:
    """Retrain (or take the winning checkpoint), evaluate tuned and default models on the test split.

    ``fit_many`` fits the winner and the default on train+valid somewhere else (the data-parallel
    retrain: ``tuning_core.trainables.xgboost_distributed.fit_boosters``); then ``train`` and ``valid``
    are not needed and ``rows`` gives their row counts (for ``scaled_rounds``). ``test``: the split, or
    its parts one after another (``Splits.parts``): the models predict part by part.
    """
    started = time.perf_counter()
    if fit_many is None:
        assert train is not None and valid is not None
        fit_many, rows = fit_in_process(train, valid, nthread=nthread), (len(train), len(valid))
    assert rows is not None
    fits = [(DEFAULT_XGB_CONFIG, DEFAULT_XGB_ROUNDS)]
    if retrain:
        rounds = scaled_rounds(best_iteration, *rows)
        fits.insert(0, (best_config, rounds))
        source = "retrained"
    else:
        if checkpoint_dir is None:
            # A user-facing condition (e.g. no trial reached a checkpoint), not a bug: one-line error.
            raise ConfigError("retrain.retrain false: the best trial has no checkpoint to register; "
                              "set retrain.retrain true or checkpoint more often (tune.checkpoint_every)")
        source = "checkpoint"
    *tuned_fit, baseline = fit_many(fits)
    booster = tuned_fit[0] if retrain else load_booster(checkpoint_dir)
    rounds = rounds if retrain else booster.num_boosted_rounds()
    y_test, p_tuned, p_base = predict_parts(test, booster, baseline)
    fit_s = time.perf_counter() - started
    tuned = binary_metrics(y_test, p_tuned)
    base = binary_metrics(y_test, p_base)
    cm = confusion(y_test, (p_tuned >= 0.5).astype(int), 2)
    plots = {
        "confusion_matrix.png": confusion_png(cm, ["on time", "delayed"], "test confusion matrix (tuned)"),
        "roc_curve.png": roc_png(y_test, {"tuned": p_tuned, "default": p_base}, "test ROC"),
    }
    log.info("retrained %s rounds=%d test auc=%.4f (default %.4f)", source, rounds, tuned["auc"], base["auc"])
    return FinalModel(model=booster, rounds=rounds, test_metrics=tuned, baseline_test_metrics=base, plots=plots,
                      source=source, extra={"confusion": cm}, fit_s=fit_s)
