"""Evaluation on the held-out test split: metrics and plots (PNG bytes), model-agnostic."""

from __future__ import annotations

import io
from typing import Any

import numpy as np

# The test metrics each evaluation returns (``registry.metric`` must be one of them).
BINARY_METRICS = ("auc", "logloss", "accuracy", "error")
MULTICLASS_METRICS = ("accuracy", "error", "logloss")
REGRESSION_METRICS = ("rmse", "mae", "r2")


def binary_metrics(y_true: np.ndarray, proba: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    from sklearn.metrics import log_loss, roc_auc_score

    y = np.asarray(y_true).astype(int)
    p = np.clip(np.asarray(proba, dtype=float), 1e-7, 1 - 1e-7)
    acc = float(((p >= threshold).astype(int) == y).mean())
    auc = float(roc_auc_score(y, p)) if len(np.unique(y)) > 1 else float("nan")
    return {"auc": auc, "logloss": float(log_loss(y, p, labels=[0, 1])), "accuracy": acc, "error": 1.0 - acc}


def multiclass_metrics(y_true: np.ndarray, proba: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import log_loss

    y = np.asarray(y_true).astype(int)
    p = np.asarray(proba, dtype=float)
    acc = float((p.argmax(axis=1) == y).mean())
    return {"accuracy": acc, "error": 1.0 - acc,
            "logloss": float(log_loss(y, np.clip(p, 1e-7, 1), labels=list(range(p.shape[1]))))}


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
    from sklearn.metrics import roc_auc_score, roc_curve

    fig, ax = plt.subplots(figsize=(5, 5))
    for label, proba in curves.items():
        fpr, tpr, _ = roc_curve(y_true, proba)
        ax.plot(fpr, tpr, label=f"{label} (AUC {roc_auc_score(y_true, proba):.4f})")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title)
    ax.legend(loc="lower right")
    return _png(fig)
