"""The data-parallel FashionMNIST loop under a real Ray Train ``TorchTrainer`` (2 workers x 1 CPU, gloo)
on the real 2k sample, read by each worker from the data version on storage.

Small CNNs (width 8) and 2-3 epochs keep each run to seconds on two cores.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow.fs as pafs
import pytest

from tests.conftest import FASHION_SAMPLE
from tuning_core.config import FashionData
from tuning_core.data import idx

torch = pytest.importorskip("torch")  # the [torch] extra (`make test-py313` runs without it)

from tuning_core.trainables import torch_ddp  # noqa: E402 - needs torch (importorskip above)
from tuning_core.trainables.torch import evaluate, load_checkpoint_model  # noqa: E402

BASE = {"lr": 0.05, "momentum": 0.9, "batch_size": 64, "weight_decay": 1e-4, "width": 8, "model": "cnn",
        "hidden": 32}
# What train_fashion reports every epoch: the distributed loop reports the same names.
SINGLE_PROCESS_METRICS = {"mean_accuracy", "loss", "train_loss", "epoch", "lr", "restored_epoch", "restored_from",
                          "device", "precision", "training_iteration", "node_id"}


@pytest.fixture(scope="module")
def version(tmp_path_factory):
    fs = pafs.LocalFileSystem()
    root = str(tmp_path_factory.mktemp("store"))
    return idx.prepare(FashionData(source=str(FASHION_SAMPLE)), fs, str(FASHION_SAMPLE), fs, root)


@pytest.fixture(scope="module")
def splits(version):
    fs = pafs.LocalFileSystem()
    return {s: idx.load_split(fs, version.path, s) for s in ("train", "valid", "test")}


def _fit(version, tmp: Path, name: str, config: dict, **kwargs):
    from ray.train import RunConfig

    trainer = torch_ddp.torch_trainer(config, pafs.LocalFileSystem(), version.path, num_workers=2,
                                      cpu_per_worker=1, run_config=RunConfig(name=name, storage_path=str(tmp)),
                                      **kwargs)
    return trainer.fit()


@pytest.fixture(scope="module")
def two_epochs(ray_local, version, tmp_path_factory):
    """A 2-epoch run from scratch on 2 workers, checkpointing every epoch (shared by the tests below)."""
    tmp = tmp_path_factory.mktemp("ddp")
    result = _fit(version, tmp, "scratch", {**BASE, "_max_iterations": 2, "_checkpoint_every": 1},
                  trial_id="trial-a")
    return result, tmp


def _reports(result) -> list[dict]:
    """Every checkpointed report of a Train run, in epoch order (rank 0's metrics)."""
    return sorted((metrics for _, metrics in result.best_checkpoints), key=lambda m: m["epoch"])


def test_each_worker_trains_on_its_own_shard_and_every_epoch_is_reported(two_epochs, version):
    result, _ = two_epochs
    assert result.error is None
    reports = _reports(result)
    assert [r["epoch"] for r in reports] == [1, 2]
    assert [r["training_iteration"] for r in reports] == [1, 2]
    assert SINGLE_PROCESS_METRICS <= set(reports[-1])
    last = reports[-1]
    n_train, n_valid = version.rows["train"], version.rows["valid"]
    assert last["workers"] == 2
    # Training shards are equal (at most workers - 1 rows dropped), each a part of the split, not all of it.
    assert last["shard_rows_min"] == last["shard_rows_max"] < n_train
    assert last["train_rows"] == 2 * last["shard_rows_max"] == n_train - n_train % 2
    # Validation shards drop nothing: the metrics are the whole validation split's.
    assert last["valid_rows"] == n_valid
    assert last["restored_epoch"] == 0 and last["restored_from"] == ""
    assert last["train_loss"] < reports[0]["train_loss"]
    assert last["device"] == "cpu" and last["precision"] == "fp32"


def test_the_checkpoint_is_train_fashions_format_and_holds_the_reported_model(two_epochs, splits):
    result, _ = two_epochs
    last = _reports(result)[-1]
    # Rank 0's checkpoint loads with the single-process loader (no DDP "module." prefixes) into the model
    # whose accuracy on the whole validation split is the one the workers reported together.
    with result.checkpoint.as_directory() as folder:
        state = torch.load(Path(folder) / "state.pt", weights_only=True)
        model = load_checkpoint_model(Path(folder), BASE)
    assert state["epoch"] == 2 and state["trial_id"] == "trial-a"
    assert not any(k.startswith("module.") for k in state["model"])
    metrics = evaluate(model, splits["valid"])
    assert metrics["accuracy"] == pytest.approx(last["mean_accuracy"], abs=1e-6)
    assert metrics["logloss"] == pytest.approx(last["loss"], rel=1e-4)


def test_a_run_resumes_after_the_checkpoints_epoch_with_its_weights(two_epochs, version, tmp_path):
    result, _ = two_epochs
    resumed = _fit(version, tmp_path, "resumed", {**BASE, "_max_iterations": 3, "_checkpoint_every": 1},
                   trial_id="trial-b", resume_checkpoint=result.checkpoint)
    reports = _reports(resumed)
    # Only epoch 3 ran, from trial-a's epoch-2 state (as a PBT exploit or a retried trial would).
    assert [r["epoch"] for r in reports] == [3]
    assert reports[0]["restored_epoch"] == 2 and reports[0]["restored_from"] == "trial-a"
    assert reports[0]["train_loss"] < _reports(result)[0]["train_loss"]


def test_distributed_final_fit_returns_the_single_process_kind_of_model(ray_local, version, splits, tmp_path):
    storage = tmp_path / "final"
    model = torch_ddp.fit_final(BASE, pafs.LocalFileSystem(), version.path, epochs=2, num_workers=2,
                                storage_path=str(storage), seed=0)
    # What tuning_core.trainables.torch.fit_final returns: a CPU module in eval mode with its build arguments.
    assert not model.training
    assert model.spec["name"] == "cnn" and model.spec["width"] == 8
    assert next(model.parameters()).device.type == "cpu"
    assert evaluate(model, splits["test"])["accuracy"] > 0.3  # chance is 0.1
    # The run's folder (its one checkpoint) is gone once the model is loaded.
    assert not storage.exists() or not any(storage.iterdir())
