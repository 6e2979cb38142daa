"""The FashionMNIST flow end to end on the real 2k sample: same DAG, CNN tuned with ASHA, registered."""

from __future__ import annotations

import mlflow
import pyarrow.fs as pafs
import pytest

from tests.conftest import FASHION_SAMPLE
from tuning_core.config import FashionData, FashionPipeline, RegistryConfig, TuneConfig

pytestmark = pytest.mark.slow
LOCAL = pafs.LocalFileSystem()


def test_fashion_flow_registers_a_model_far_above_chance(local_settings, prefect_harness, ray_local):
    from flows.workloads import fashion_mnist_tuning

    cfg = FashionPipeline(
        data=FashionData(source=str(FASHION_SAMPLE)),
        tune=TuneConfig(search="hyperopt", scheduler="asha", metric="mean_accuracy", mode="max", num_samples=2,
                        max_iterations=3, checkpoint_every=1, max_concurrent_trials=2,
                        space={"lr": {"type": "loguniform", "low": 0.02, "high": 0.1}, "momentum": 0.9,
                               "batch_size": 32, "weight_decay": 1e-5, "width": 16, "model": "cnn"}),
        registry=RegistryConfig(model_name="fashion-flow-test", metric="accuracy"),
    )
    summary = fashion_mnist_tuning(cfg)
    assert summary["workload"] == "fashion-mnist"
    assert summary["data"]["rows"]["test"] == 400
    assert summary["tuning"]["num_trials"] == 2
    assert summary["retrain"]["test_metrics"]["accuracy"] > 0.5  # chance is 0.1
    assert summary["registry"]["aliases"] == ["champion"]
    model = mlflow.pyfunc.load_model("models:/fashion-flow-test@champion")
    from infra.storage import build_storage
    from tuning_core.data.idx import load_split

    x, y = load_split(build_storage(local_settings).fs, summary["data"]["uri"], "test")
    logits = model.predict(x[:64])
    assert (logits.argmax(axis=1) == y[:64]).mean() > 0.5

    # A consumer with raw pixels prepares them from the model's own metadata, not our storage.
    import numpy as np

    from tuning_core.data.idx import locate_files, read_idx

    prep = mlflow.models.get_model_info("models:/fashion-flow-test@champion").metadata["preprocessing"]
    _, paths = locate_files(LOCAL, str(FASHION_SAMPLE))
    raw = read_idx(LOCAL, paths["test_images"])[:64]
    prepared = ((raw.astype(np.float32) / 255 - prep["mean"]) / prep["std"]).astype(np.float32)[:, None]
    np.testing.assert_allclose(prepared, x[:64], atol=1e-5)
    assert prep["data_version"] == summary["data"]["version"]
