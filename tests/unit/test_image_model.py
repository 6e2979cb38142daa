"""The registered image classifier (tuning_core.workloads.fashion_mnist.image_spec, logged by
infra.tracking.Tracker.log_model) as a consumer uses it: real MLflow on a
temp SQLite file, a small CNN, the real FashionMNIST 2k sample's IDX files."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.fs as pafs
import pytest

from tests.conftest import FASHION_SAMPLE
from tuning_core.config import FashionData
from tuning_core.data import idx

pytest.importorskip("torch")  # the [torch] extra (`make test-py313` runs without it)

LOCAL = pafs.LocalFileSystem()


@pytest.fixture(autouse=True)
def _restore_mlflow_uris(restore_mlflow_uris):
    """Every test here: see tests.conftest.restore_mlflow_uris."""


@pytest.fixture(scope="module")
def fashion(tmp_path_factory):
    """The test split twice: normalised by the data stage, and the raw uint8 pixels of the IDX file."""
    version = idx.prepare(FashionData(source=str(FASHION_SAMPLE)), LOCAL, str(FASHION_SAMPLE), LOCAL,
                          str(tmp_path_factory.mktemp("store")))
    x, _ = idx.load_split(LOCAL, version.path, "test")
    _, paths = idx.locate_files(LOCAL, str(FASHION_SAMPLE))
    raw = idx.read_idx(LOCAL, paths["test_images"])
    return version, x[:64], raw[:64]


@pytest.fixture
def logged(local_settings, fashion, tmp_path):
    """(model URI, the torch module it was logged from) for a small untrained CNN."""
    import torch

    from infra.storage import build_storage
    from infra.tracking import TAG_STAGE, Tracker
    from tuning_core.models.cnn import build_model
    from tuning_core.workloads.fashion_mnist import image_spec

    version, x, _ = fashion
    torch.manual_seed(0)
    net = build_model("cnn", width=4, hidden=8).eval()
    tracker = Tracker(local_settings, build_storage(local_settings))
    parent = tracker.parent_run("tunepipe-test", "key", {}, run_name="parent")
    run_id, _ = tracker.child_run(parent, TAG_STAGE, "retrain", "retrain")
    norm = version.manifest["normalisation"]
    uri = tracker.log_model(run_id, image_spec(net, x[:5], {"mean": norm["mean"], "std": norm["std"]},
                                               tmp_path, metrics={"test_accuracy": 0.5}))
    return uri, net


def test_image_model_takes_raw_pixels_and_normalised_images_alike(logged, fashion):
    import mlflow
    import torch

    uri, net = logged
    _, x, raw = fashion
    assert raw.dtype == np.uint8 and raw.shape == (64, 28, 28)
    model = mlflow.pyfunc.load_model(uri)
    with torch.no_grad():
        expected = net(torch.from_numpy(x)).numpy()

    np.testing.assert_allclose(model.predict(x), expected, rtol=1e-5, atol=1e-5)
    # Raw pixels, as IDX files hold them, and as JSON gives them (int64; one flattened image per row).
    for inputs in (raw, raw.astype(np.int64), raw.reshape(64, -1), pd.DataFrame(raw.reshape(64, -1))):
        np.testing.assert_allclose(model.predict(inputs), expected, rtol=1e-5, atol=1e-5)
    assert model.predict(raw[:0]).shape == (0, 10)


def test_image_model_names_what_is_wrong_with_its_input(logged, fashion):
    import mlflow
    from mlflow.exceptions import MlflowException

    _, _, raw = fashion
    model = mlflow.pyfunc.load_model(logged[0])
    cases = [(raw.astype(np.int64) + 250, r"integer pixels must be 0-255 \(raw\), found 250\.\.\d+"),
             (raw[:, :10], r"shape \[64, 10, 28\]; expected N x 28 x 28, N x 1 x 28 x 28 or N x 784"),
             (raw.astype(str), r"dtype <U\d+; expected raw integer pixels 0-255 or normalised floats")]
    for inputs, message in cases:
        with pytest.raises(MlflowException, match=message):
            model.predict(inputs)


def test_image_model_ships_no_tunepipe_code_and_pins_the_training_versions(logged, recwarn):
    import mlflow
    from mlflow.artifacts import download_artifacts
    from packaging.version import Version

    uri, _ = logged
    local = Path(download_artifacts(uri))
    files = sorted(str(p.relative_to(local)) for p in local.rglob("*") if p.is_file())
    assert [f for f in files if f.endswith(".py")] == ["image_classifier.py"], files
    assert "artifacts/model.pt2" in files and not [f for f in files if f.startswith("code/") or f.endswith(".pkl")]
    # torch's local label (+cpu) is dropped: "torch==2.13.0" installs from any index that has 2.13.0.
    assert (local / "requirements.txt").read_text().split() == [
        f"{d}=={Version(importlib.metadata.version(d)).public}" for d in ("mlflow", "torch", "numpy", "pandas")]
    info = mlflow.models.get_model_info(uri)
    assert set(info.metadata["preprocessing"]) == {"mean", "std"}
    assert [w for w in recwarn if "mlflow" in w.filename or "type hint" in str(w.message)] == []
