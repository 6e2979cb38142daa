"""Retraining the best configuration and evaluating it on the test split (tuning_core.retrain).

Real XGBoost on a small real data version built from the ASA 2008 sample; one thread per fit,
because on a busy 2-core machine two OpenMP threads per fit are many times slower than one.
"""

from __future__ import annotations

import numpy as np
import pyarrow.fs as pafs
import pytest

from tests.conftest import ASA_SAMPLE
from tuning_core.config import FlightsData
from tuning_core.data import flights
from tuning_core.errors import ConfigError
from tuning_core.evaluate import binary_metrics
from tuning_core.retrain import retrain_xgboost, scaled_rounds
from tuning_core.trainables.xgboost import LABEL, MODEL_FILE, fit_booster

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
BEST_CONFIG = {"max_depth": 3, "eta": 0.2, "subsample": 0.9, "seed": 1}


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    """train/valid/test of a 5,000-row flights version prepared from the real ASA sample."""
    root = str(tmp_path_factory.mktemp("store"))
    fs = pafs.LocalFileSystem()
    version = flights.prepare(FlightsData(source=str(ASA_SAMPLE), max_rows=5000), None, None, fs, root)
    return tuple(flights.load_split(fs, version.path, s) for s in ("train", "valid", "test"))


def test_scaled_rounds_grow_with_the_validation_share():
    assert scaled_rounds(100, 700, 150) == 121  # 100 * 850 / 700 = 121.4
    assert scaled_rounds(100, 1000, 0) == 100  # nothing added, nothing scaled
    assert scaled_rounds(40, 100, 100) == 80  # doubling the data doubles the rounds


def test_scaled_rounds_never_drop_below_one_round():
    assert scaled_rounds(0, 700, 150) == 1
    assert scaled_rounds(1, 10_000, 1) == 1
    assert scaled_rounds(3, 0, 10) == 30  # no training rows: no division by zero


def test_retrain_trains_on_train_plus_valid_for_scaled_rounds_and_scores_the_test_split(splits):
    train, valid, test = splits
    final = retrain_xgboost(BEST_CONFIG, 20, train, valid, test, nthread=1)

    assert final.source == "retrained"
    assert final.rounds == scaled_rounds(20, len(train), len(valid)) > 20
    assert final.model.num_boosted_rounds() == final.rounds
    assert set(final.test_metrics) == {"auc", "logloss", "accuracy", "error"}
    assert set(final.baseline_test_metrics) == set(final.test_metrics)
    # The reported metrics are the tuned model's on the test split, recomputed independently here.
    x_test = test.drop(columns=[LABEL])
    import xgboost as xgb

    proba = final.model.predict(xgb.DMatrix(x_test, enable_categorical=True))
    expected = binary_metrics(test[LABEL].to_numpy(), proba)
    assert final.test_metrics == pytest.approx(expected)
    assert 0.6 < final.test_metrics["auc"] <= 1.0
    assert final.test_metrics["error"] == pytest.approx(1 - final.test_metrics["accuracy"])
    # The untuned default is a different model (100 default rounds), evaluated on the same rows.
    assert final.baseline_test_metrics["logloss"] != pytest.approx(final.test_metrics["logloss"])
    assert final.uplift == pytest.approx({k: final.test_metrics[k] - final.baseline_test_metrics[k]
                                          for k in final.test_metrics})


def test_retrain_returns_png_confusion_matrix_and_roc_curve(splits):
    train, valid, test = splits
    final = retrain_xgboost(BEST_CONFIG, 5, train, valid, test, nthread=1)

    assert set(final.plots) == {"confusion_matrix.png", "roc_curve.png"}
    for name, data in final.plots.items():
        assert data.startswith(PNG_MAGIC), name
        assert len(data) > 2_000, name  # a drawn figure, not an empty canvas
    cm = np.asarray(final.extra["confusion"])
    assert cm.shape == (2, 2)
    assert cm.sum() == len(test)
    assert cm[1].sum() == int(test[LABEL].sum())  # rows are the true labels


def test_retrain_false_registers_the_checkpoint_booster_as_it_is(splits, tmp_path):
    train, valid, test = splits
    checkpoint = fit_booster(BEST_CONFIG, train, 7, nthread=1)
    checkpoint.save_model(str(tmp_path / MODEL_FILE))

    final = retrain_xgboost(BEST_CONFIG, 50, train, valid, test, retrain=False, checkpoint_dir=tmp_path, nthread=1)

    assert final.source == "checkpoint"
    assert final.rounds == 7  # the checkpoint's own round count, not scaled_rounds(50, ...)
    assert final.model.num_boosted_rounds() == 7
    import xgboost as xgb

    d_test = xgb.DMatrix(test.drop(columns=[LABEL]), enable_categorical=True)
    np.testing.assert_allclose(final.model.predict(d_test), checkpoint.predict(d_test))
    assert set(final.baseline_test_metrics) == set(final.test_metrics)


def test_retrain_false_without_a_checkpoint_is_a_config_error(splits):
    train, valid, test = splits
    with pytest.raises(ConfigError, match="checkpoint"):
        retrain_xgboost(BEST_CONFIG, 5, train, valid, test, retrain=False, checkpoint_dir=None, nthread=1)
