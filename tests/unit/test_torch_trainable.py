"""The PyTorch trainable under real Ray Tune runs on the real 2k FashionMNIST sample.

Small CNNs (width 8) and 2-4 epochs keep each run to seconds on two cores.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pytest

from tests.conftest import FASHION_SAMPLE
from tests.faults import failing
from tuning_core.config import FashionData
from tuning_core.data import idx
from tuning_core.errors import ConfigError

torch = pytest.importorskip("torch")  # the [torch] extra (`make test-py313` runs without it)

from tuning_core.models.cnn import MODELS, build_model
from tuning_core.trainables.torch import (
    evaluate,
    fit_final,
    load_checkpoint_model,
    predict_proba,
    train_fashion,
)

BASE = {"lr": 0.05, "momentum": 0.9, "batch_size": 64, "weight_decay": 1e-4, "width": 8, "model": "cnn",
        "hidden": 32}


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    fs = pafs.LocalFileSystem()
    root = str(tmp_path_factory.mktemp("store"))
    version = idx.prepare(FashionData(source=str(FASHION_SAMPLE)), fs, str(FASHION_SAMPLE), fs, root)
    return {s: idx.load_split(fs, version.path, s) for s in ("train", "valid", "test")}


class _Recorder:
    """A driver-side Tune callback that keeps every reported result, tagged with the trial that reported it.

    Tune's per-trial result files are rewritten when PBT or a retry restores a trial, so the
    callback is the reliable record of what each trial reported, in order.
    """

    def __new__(cls):
        from ray.tune import Callback

        class Recorder(Callback):
            def __init__(self) -> None:
                self.rows: list[dict] = []

            def on_trial_result(self, iteration, trials, trial, result, **info):
                self.rows.append({"trial": trial.trial_id, **result})

            def of(self, trial_id: str) -> list[dict]:
                return [r for r in self.rows if r["trial"] == trial_id]

        return Recorder()


def _tuner(tmp_path: Path, splits: dict, param_space: dict, scheduler, recorder, name: str, max_failures: int = 0,
           trainable=train_fashion):
    from ray import tune

    trainable = tune.with_resources(tune.with_parameters(trainable, train=splits["train"], valid=splits["valid"]),
                                    {"cpu": 1})
    return tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(metric="mean_accuracy", mode="max", scheduler=scheduler,
                                    max_concurrent_trials=2, reuse_actors=True),
        run_config=tune.RunConfig(name=name, storage_path=str(tmp_path / "ray"), verbose=0, callbacks=[recorder],
                                  failure_config=tune.FailureConfig(max_failures=max_failures)),
    )


# --------------------------------------------------------------------------- models


def test_the_torch_free_copy_of_the_model_names_matches_the_model_table():
    from tuning_core.models import MODEL_NAMES  # what configs, the CLI and the form offer without torch

    assert MODEL_NAMES == tuple(MODELS)


def test_models_map_one_by_28x28_images_to_ten_logits():
    x = torch.zeros(3, 1, 28, 28)
    for name in MODELS:
        model = build_model(name, width=8, hidden=16).eval()
        assert model(x).shape == (3, 10), name


def test_resnet18_has_the_classic_stem_without_max_pool():
    model = build_model("resnet18")
    assert model.conv1.in_channels == 1 and model.conv1.out_channels == 64
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in model.modules())
    # ResNet-18's 11.2M parameters with a 1-channel stem and a 10-class head.
    assert 11.0e6 < sum(p.numel() for p in model.parameters()) < 11.3e6


def test_cnn_width_and_hidden_change_the_architecture():
    small, wide = build_model("cnn", width=8, hidden=16), build_model("cnn", width=16, hidden=64)
    assert sum(p.numel() for p in wide.parameters()) > 2 * sum(p.numel() for p in small.parameters())


def test_unknown_model_name_lists_the_known_ones():
    with pytest.raises(ConfigError, match=r"model: one of \['cnn', 'resnet18'\], got 'vgg'"):
        build_model("vgg")


# --------------------------------------------------------------------------- tuning runs


def test_asha_run_then_final_fit_beats_chance_on_the_test_split(ray_local, tmp_path, splits):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    space = {**BASE, "lr": tune.grid_search([0.05, 0.01]), "_max_iterations": 3, "_checkpoint_every": 1}
    recorder = _Recorder()
    grid = _tuner(tmp_path, splits, space, ASHAScheduler(max_t=3, grace_period=1), recorder, "asha").fit()
    assert not grid.errors
    best = grid.get_best_result()
    history = recorder.of(best.metrics["trial_id"])
    assert [r["epoch"] for r in history] == [1, 2, 3]
    assert {"mean_accuracy", "loss", "train_loss"} <= set(history[-1])
    assert history[-1]["train_loss"] < history[0]["train_loss"]

    # The winning checkpoint rebuilds into the model that reported the last validation accuracy.
    with best.checkpoint.as_directory() as folder:
        restored = load_checkpoint_model(Path(folder), best.config)
    assert evaluate(restored, splits["valid"])["accuracy"] == pytest.approx(best.metrics["mean_accuracy"], abs=1e-6)

    train_full = tuple(np.concatenate([a, b]) for a, b in zip(splits["train"], splits["valid"], strict=True))
    model = fit_final(best.config, train_full, epochs=3)
    metrics = evaluate(model, splits["test"])
    assert metrics["accuracy"] > 0.5  # chance is 0.1
    assert metrics["error"] == pytest.approx(1 - metrics["accuracy"])
    confusion = np.asarray(metrics["confusion"])
    assert confusion.shape == (10, 10) and confusion.sum() == len(splits["test"][1])
    assert np.trace(confusion) == round(metrics["accuracy"] * len(splits["test"][1]))
    assert 0 < metrics["logloss"] < np.log(10)


def test_pbt_exploit_restores_another_trials_checkpoint_and_keeps_training(ray_local, tmp_path, splits):
    from ray import tune
    from ray.tune.schedulers import PopulationBasedTraining

    # synch: both trials reach the perturbation point before ranking, so the exploit is certain.
    pbt = PopulationBasedTraining(time_attr="training_iteration", perturbation_interval=2, quantile_fraction=0.5,
                                  synch=True, hyperparam_mutations={"lr": tune.loguniform(1e-3, 0.2)})
    # One good and one hopeless learning rate: the hopeless trial must take over the good one's state.
    space = {**BASE, "lr": tune.grid_search([0.05, 1e-5]), "_max_iterations": 3, "_checkpoint_every": 1}
    recorder = _Recorder()
    grid = _tuner(tmp_path, splits, space, pbt, recorder, "pbt").fit()
    assert not grid.errors
    trials = {r["trial"] for r in recorder.rows}
    exploits = [r for r in recorder.rows if r["restored_from"] not in ("", r["trial"])]
    assert exploits, f"no trial restored another trial's checkpoint: {recorder.rows}"
    first = exploits[0]
    assert first["restored_from"] in trials
    # Training continued from the donor's epoch, not from scratch, and ran to the end.
    assert first["restored_epoch"] == 2 and first["epoch"] == 3
    # The exploiting trial now trains with a learning rate derived from the donor's, not its own 1e-5
    # (reported from the optimizer's param group, so it proves the mutation reached the optimizer).
    before = [r for r in recorder.of(first["trial"]) if r["epoch"] < 3]
    assert before[0]["lr"] == pytest.approx(1e-5) and first["lr"] > 1e-3
    assert first["mean_accuracy"] > 0.5


def test_failed_trial_resumes_from_its_checkpoint_instead_of_restarting(ray_local, tmp_path, splits):
    from ray.tune.schedulers import FIFOScheduler

    marker = tmp_path / "fail-once"
    space = {**BASE, "_max_iterations": 3, "_checkpoint_every": 1}
    recorder = _Recorder()
    trainable = failing(train_fashion, marker, after_checkpoint=True)
    grid = _tuner(tmp_path, splits, space, FIFOScheduler(), recorder, "retry", max_failures=1,
                  trainable=trainable).fit()
    assert marker.exists(), "the injected failure did not fire"
    assert not grid.errors
    rows = recorder.rows
    # Epoch 1 ran once: the retry picked up after the checkpoint written before the failure.
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert [r["restored_epoch"] for r in rows] == [0, 1, 1]
    assert rows[-1]["restored_from"] == rows[-1]["trial"]


def test_a_diverged_epoch_reports_nan_instead_of_crashing():
    from tuning_core.trainables.torch import _train_epoch

    model = build_model("cnn", width=8, hidden=16)
    x = torch.full((64, 1, 28, 28), float("inf"))
    y = torch.zeros(64, dtype=torch.int64)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = _train_epoch(model, opt, x, y, 8, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert np.isnan(loss)


def test_bf16_precision_runs_the_forward_pass_in_bfloat16_and_keeps_float32_weights(splits):
    from tuning_core.trainables.torch import _tensors, _train_epoch, _valid_metrics

    torch.manual_seed(0)
    model = build_model("cnn", width=8, hidden=32)
    seen: set[torch.dtype] = set()
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    conv.register_forward_hook(lambda module, inputs, output: seen.add(output.dtype))
    (x, y), (xv, yv) = _tensors(splits["train"]), _tensors(splits["valid"])
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for epoch in (1, 2, 3):
        loss = _train_epoch(model, opt, x, y, 64, torch.Generator().manual_seed(epoch), torch.device("cpu"), "bf16")
    assert seen == {torch.bfloat16}
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    acc, valid_loss = _valid_metrics(model, xv, yv, "bf16")
    assert np.isfinite(loss) and np.isfinite(valid_loss) and acc > 0.5  # chance is 0.1


# --------------------------------------------------------------------------- prediction helpers


def test_predict_proba_returns_rows_that_sum_to_one(splits):
    model = build_model("cnn", width=8, hidden=16)
    proba = predict_proba(model, splits["test"][0][:37], batch_size=16)
    assert proba.shape == (37, 10)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-5)


def test_load_checkpoint_model_rejects_a_folder_without_a_checkpoint(tmp_path):
    with pytest.raises(ConfigError, match="no state.pt"):
        load_checkpoint_model(tmp_path, BASE)
