"""Test metrics computed without scikit-learn (tuning_core.evaluate) agree with scikit-learn's, and the
driver's lean imports hold: the retrain's metrics and the HyperOpt searcher load neither scikit-learn
nor scipy.stats (~3 s of a 2-core ``tunepipe run`` between them)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from sklearn import metrics as skm

pytestmark = pytest.mark.filterwarnings("ignore:The y_prob values do not sum to one")

from tuning_core import evaluate

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("ties", [False, True])
def test_binary_metrics_match_scikit_learn(ties: bool) -> None:
    rng = np.random.default_rng(7)
    y = rng.integers(0, 2, 5_000)
    p = np.clip(0.3 * y + rng.normal(0.35, 0.25, 5_000), 0, 1)
    if ties:  # rounded scores: many rows share a score, as a shallow tree's leaves do
        p = np.round(p, 1)
    got = evaluate.binary_metrics(y, p)
    pc = np.clip(p, 1e-7, 1 - 1e-7)
    assert got["auc"] == pytest.approx(skm.roc_auc_score(y, pc), abs=1e-12)
    assert got["logloss"] == pytest.approx(skm.log_loss(y, pc, labels=[0, 1]), abs=1e-12)
    assert got["accuracy"] == pytest.approx(skm.accuracy_score(y, pc >= 0.5))
    fpr, tpr = evaluate.roc_curve(y, p)
    want_fpr, want_tpr, _ = skm.roc_curve(y, p, drop_intermediate=False)
    np.testing.assert_allclose(fpr, want_fpr)
    np.testing.assert_allclose(tpr, want_tpr)


def test_single_class_auc_is_nan_not_an_error() -> None:
    assert np.isnan(evaluate.binary_metrics(np.ones(10), np.linspace(0, 1, 10))["auc"])


def test_multiclass_metrics_match_scikit_learn() -> None:
    rng = np.random.default_rng(3)
    y = rng.integers(0, 10, 2_000)
    logits = rng.normal(size=(2_000, 10)) + 2.0 * np.eye(10)[y]
    proba = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    proba[0] = 0.0  # a row of zeros but one: clipped to 1e-7, not renormalised, as scikit-learn does
    proba[0, 3] = 1.0
    got = evaluate.multiclass_metrics(y, proba)
    assert got["logloss"] == pytest.approx(skm.log_loss(y, np.clip(proba, 1e-7, 1), labels=list(range(10))),
                                           abs=1e-12)
    assert got["accuracy"] == pytest.approx(skm.accuracy_score(y, proba.argmax(axis=1)))


_LEAN = textwrap.dedent("""
    import sys
    import numpy as np
    from tuning_core.config import TuneConfig
    from tuning_core import evaluate, search
    from tuning_core.space import ParamSpec
    space = {"eta": ParamSpec(type="loguniform", low=0.01, high=0.3)}
    search.create_searcher(TuneConfig(search="hyperopt", num_samples=4), search.build_space(space, "hyperopt"))
    y = np.array([0, 1, 1, 0, 1]); p = np.array([0.2, 0.8, 0.6, 0.4, 0.9])
    evaluate.binary_metrics(y, p)
    evaluate.roc_png(y, {"tuned": p}, "roc")
    heavy = sorted(m for m in ("sklearn", "scipy.stats") if m in sys.modules)
    import hyperopt
    from hyperopt import atpe
    assert callable(hyperopt.atpe.suggest) and atpe.suggest is hyperopt.atpe.suggest  # still usable
    assert "scipy.stats" in sys.modules  # ... and really loaded on first use
    print("heavy:", heavy)
""")


def test_driver_loads_neither_scikit_learn_nor_scipy_stats() -> None:
    out = subprocess.run([sys.executable, "-c", _LEAN], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "heavy: []" in out.stdout, out.stdout
