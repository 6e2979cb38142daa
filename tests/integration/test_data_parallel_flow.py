"""The flights pipeline with data-parallel trials (``tune.resources.workers_per_trial: 2``) end to end:
tuning and retrain on 2 Ray Train workers each, registration, and a registered model that loads and
predicts like the single-process one. Real Ray (2 CPUs), Prefect's test harness, MLflow on SQLite."""

from __future__ import annotations

import mlflow
import pytest

from tests.conftest import ASA_SAMPLE
from tuning_core.config import FlightsData, FlightsPipeline, RegistryConfig, TuneConfig

pytestmark = pytest.mark.slow


@pytest.fixture
def env(local_settings, prefect_harness, ray_local):
    return local_settings


def test_data_parallel_run_registers_a_booster_that_loads_and_predicts(env, tmp_path, monkeypatch):
    import os

    from flows.workloads import flights_tuning
    from infra.storage import build_storage
    from tasks.workloads import plain_features
    from tuning_core.data.flights import load_split
    from tuning_core.trainables import xgboost_distributed

    cfg = FlightsPipeline(
        data=FlightsData(source=str(ASA_SAMPLE), max_rows=4000, split="random"),
        tune=TuneConfig(num_samples=2, max_iterations=10, checkpoint_every=5, search="random", scheduler="fifo",
                        resources={"workers_per_trial": 2, "cpu_per_worker": 1}),
        registry=RegistryConfig(model_name="dp-flow-test"))
    fitted: list[tuple[int, int]] = []
    real = xgboost_distributed.fit_boosters

    def spy(fits, files, workers, task=None):
        fitted.append((len(fits), workers.count))
        return real(fits, files, workers, task)

    monkeypatch.setattr(xgboost_distributed, "fit_boosters", spy)
    summary = flights_tuning(cfg)
    # The winner and its baseline were fitted by one Train run on the 2 workers, not in the driver.
    assert fitted == [(2, 2)]
    assert summary["tuning"]["num_trials"] == 2
    assert summary["registry"]["aliases"] == ["champion"]
    assert 0.5 < summary["retrain"]["test_metrics"]["auc"] <= 1

    model = mlflow.pyfunc.load_model("models:/dp-flow-test@champion")
    # The same kind of artifact as a single-process run: the booster and the category sets.
    local = mlflow.artifacts.download_artifacts("models:/dp-flow-test@champion", dst_path=str(tmp_path))
    assert {"model.ubj", "categories.json"} <= {f for _, _, names in os.walk(local) for f in names}
    storage = build_storage(env)
    test = load_split(storage.fs, summary["data"]["uri"], "test")
    out = model.predict(plain_features(test.drop(columns=["delayed"]).head(20)))
    assert len(out) == 20 and out["delay_probability"].between(0, 1).all()
