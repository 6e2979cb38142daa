"""Evaluation on the held-out test split: metrics and plots (PNG bytes), model-agnostic."""

from __future__ import annotations

import io
from typing import Any

import numpy as np

# The test metrics each evaluation returns (``registry.metric`` must be one of them).
BINARY_METRICS = ("auc", "logloss", "accuracy", "error")
MULTICLASS_METRICS = ("accuracy", "error", "logloss")
REGRESSION_METRICS = ("rmse", "mae", "r2")


# The metrics are computed here with numpy (and pandas' ranking) rather than scikit-learn: importing
# sklearn.metrics costs ~2 s on 2 cores (scipy.stats and sklearn's own start-up), a whole step of the
# retrain stage; tests/unit/test_evaluate.py checks every value against scikit-learn's.
def roc_auc(y_true: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve, as ``sklearn.metrics.roc_auc_score``: the Mann-Whitney statistic
    with tied scores ranked at their average rank; NaN with a single class."""
    import pandas as pd

    y = np.asarray(y_true).astype(int)
    positives = int(y.sum())
    negatives = len(y) - positives
    if positives == 0 or negatives == 0:
        return float("nan")
    ranks = pd.Series(np.asarray(score, dtype=float)).rank(method="average").to_numpy()
    return float((ranks[y == 1].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def roc_curve(y_true: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False and true positive rates at every distinct threshold, from (0, 0) to (1, 1), as
    ``sklearn.metrics.roc_curve(..., drop_intermediate=False)``."""
    s = np.asarray(score, dtype=float)
    order = np.argsort(-s, kind="mergesort")
    y, s = np.asarray(y_true).astype(int)[order], s[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # the last row of each distinct score
    tps = np.cumsum(y)[last]
    fps = last + 1 - tps
    return np.r_[0.0, fps / max(fps[-1], 1)], np.r_[0.0, tps / max(tps[-1], 1)]


def log_loss(y_true: np.ndarray, proba: np.ndarray) -> float:
    """Mean negative log-likelihood of the true class, as ``sklearn.metrics.log_loss``; ``proba`` one
    column per class (used as given, not renormalised) or, for two classes, P(class 1)."""
    y = np.asarray(y_true).astype(int)
    p = np.asarray(proba, dtype=float)
    if p.ndim == 1:
        p = np.column_stack([1.0 - p, p])
    eps = np.finfo(p.dtype).eps
    return float(-np.log(np.clip(p[np.arange(len(y)), y], eps, 1 - eps)).mean())


def binary_metrics(y_true: np.ndarray, proba: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    y = np.asarray(y_true).astype(int)
    p = np.clip(np.asarray(proba, dtype=float), 1e-7, 1 - 1e-7)
    acc = float(((p >= threshold).astype(int) == y).mean())
    return {"auc": roc_auc(y, p), "logloss": log_loss(y, p), "accuracy": acc, "error": 1.0 - acc}


def multiclass_metrics(y_true: np.ndarray, proba: np.ndarray) -> dict[str, float]:
    y = np.asarray(y_true).astype(int)
    p = np.asarray(proba, dtype=float)
    acc = float((p.argmax(axis=1) == y).mean())
    return {"accuracy": acc, "error": 1.0 - acc, "logloss": log_loss(y, np.clip(p, 1e-7, 1))}


def confusion(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> list[list[int]]:
    cm = np.zeros((n_classes, n_classes), dtype=int)
    np.add.at(cm, (np.asarray(y_true).astype(int), np.asarray(y_pred).astype(int)), 1)
    return cm.tolist()


def _png(fig: Any) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def confusion_png(cm: list[list[int]], labels: list[str], title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arr = np.asarray(cm)
    fig, ax = plt.subplots(figsize=(1.2 + 0.6 * len(labels), 1.0 + 0.6 * len(labels)))
    ax.imshow(arr, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    for i in range(arr.shape[0]):
        for j in range(arr.shape[1]):
            ax.text(j, i, str(arr[i, j]), ha="center", va="center", fontsize=8,
                    color="white" if arr[i, j] > arr.max() / 2 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    return _png(fig)


def roc_png(y_true: np.ndarray, curves: dict[str, np.ndarray], title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    for label, proba in curves.items():
        fpr, tpr = roc_curve(y_true, proba)
        ax.plot(fpr, tpr, label=f"{label} (AUC {roc_auc(y_true, proba):.4f})")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title)
    ax.legend(loc="lower right")
    return _png(fig)
