"""The FashionMNIST flow end to end with data-parallel trials (``workers_per_trial: 2``) on the real 2k
sample: every trial and the retrain are Ray Train runs of 2 DDP workers, each reading its shard from the
data version on storage; the registered model is the same kind of artifact as with one worker."""

from __future__ import annotations

import mlflow
import numpy as np
import pytest

from tests.conftest import FASHION_SAMPLE
from tuning_core.config import FashionData, FashionPipeline, RegistryConfig, TuneConfig

pytestmark = pytest.mark.slow


def test_data_parallel_fashion_flow_registers_a_model_that_loads_and_predicts(local_settings, prefect_harness,
                                                                              ray_local, monkeypatch):
    import json
    from pathlib import Path

    from flows.workloads import fashion_mnist_tuning
    from infra.storage import build_storage
    from tuning_core.data.idx import load_split
    from tuning_core.trainables import torch as single

    def no_single_process_fit(*args, **kwargs):
        raise AssertionError("the retrain used the single-process final fit")

    monkeypatch.setattr(single, "fit_final", no_single_process_fit)  # the flow's tasks run in this process

    cfg = FashionPipeline(
        data=FashionData(source=str(FASHION_SAMPLE)),
        tune=TuneConfig(search="random", scheduler="asha", metric="mean_accuracy", mode="max", num_samples=2,
                        max_iterations=2, checkpoint_every=1, seed=0,
                        resources={"workers_per_trial": 2, "cpu_per_worker": 1},
                        space={"lr": {"type": "loguniform", "low": 0.02, "high": 0.1}, "momentum": 0.9,
                               "batch_size": 32, "weight_decay": 1e-5, "width": 8, "hidden": 32, "model": "cnn"}),
        registry=RegistryConfig(model_name="fashion-dp-test", metric="accuracy"),
    )
    summary = fashion_mnist_tuning(cfg)
    assert summary["tuning"]["num_trials"] == 2
    exp_dir = Path(summary["tuning"]["experiment_uri"])
    for result_file in exp_dir.glob("trial_*/result.json"):
        for row in map(json.loads, result_file.read_text().splitlines()):
            assert [w["rank"] for w in row["workers"]] == [0, 1]  # every report came from 2 workers
    assert summary["retrain"]["test_metrics"]["accuracy"] > 0.4  # chance is 0.1; 2 epochs of a width-8 CNN
    assert summary["registry"]["aliases"] == ["champion"]

    # The registered model is the one-worker kind: a torch.export program served by image_classifier.py,
    # loaded by any consumer without our code, taking normalised images (and raw pixels).
    info = mlflow.models.get_model_info("models:/fashion-dp-test@champion")
    assert info.metadata["preprocessing"]["data_version"] == summary["data"]["version"]
    model = mlflow.pyfunc.load_model("models:/fashion-dp-test@champion")
    x, y = load_split(build_storage(local_settings).fs, summary["data"]["uri"], "test")
    logits = np.asarray(model.predict(x[:64]))
    assert logits.shape == (64, 10)
    assert (logits.argmax(axis=1) == y[:64]).mean() > 0.4
