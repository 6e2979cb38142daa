"""The FashionMNIST trainable on CUDA, under real Ray Tune, on the real 2k sample.

Skipped where torch sees no GPU (CI has none); run them on a GPU machine:

    python -m pytest tests/gpu -q

They check what a CPU run cannot: trials whose resources include a (fractional) GPU train on CUDA
while CPU-only trials on the same machine stay on the CPU, checkpoints written on the GPU load on a
CPU-only host (the serving side), PBT clones a GPU trial's state into another GPU trial, and the
final fit uses the GPU and hands back a CPU model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pytest
import torch

from tests.conftest import FASHION_SAMPLE
from tuning_core.config import FashionData, ParamSpec, TuneConfig, build_config
from tuning_core.data import idx
from tuning_core.runner import run_tuning
from tuning_core.trainables.torch import evaluate, fit_final, load_checkpoint_model, train_fashion

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

LOCAL = pafs.LocalFileSystem()
SPACE = {"model": "cnn", "width": 16, "hidden": 64, "batch_size": 64, "momentum": 0.9, "weight_decay": 1e-4,
         "lr": ParamSpec(type="loguniform", low=0.02, high=0.1)}


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("store"))
    version = idx.prepare(FashionData(source=str(FASHION_SAMPLE)), LOCAL, str(FASHION_SAMPLE), LOCAL, root)
    return {s: idx.load_split(LOCAL, version.path, s) for s in ("train", "valid", "test")}


def _recorder():
    from ray.tune import Callback

    class Recorder(Callback):
        def __init__(self) -> None:
            self.rows: list[dict] = []

        def on_trial_result(self, iteration, trials, trial, result, **info):
            self.rows.append({"trial": trial.trial_id, **result})

    return Recorder()


def _cfg(**kw) -> TuneConfig:
    base = {"search": "random", "scheduler": "fifo", "metric": "mean_accuracy", "mode": "max", "num_samples": 2,
            "max_iterations": 3, "checkpoint_every": 1, "max_failures": 0, "seed": 0}
    return build_config(TuneConfig, {**base, **kw})


def _tune(splits, tmp_path: Path, cfg: TuneConfig, name: str, space=None):
    rec = _recorder()
    result = run_tuning(train_fashion, {"train": splits["train"], "valid": splits["valid"]}, space or SPACE, cfg,
                        LOCAL, str(tmp_path / "ray"), name, callbacks=[rec])
    return result, rec.rows


def test_ray_sees_the_gpu(ray_local):
    assert ray_local.cluster_resources().get("GPU", 0) >= 1


def test_trials_granted_a_gpu_share_it_and_train_on_cuda_cpu_trials_stay_on_cpu(ray_local, tmp_path, splits):
    gpu, gpu_rows = _tune(splits, tmp_path, _cfg(resources={"cpu": 1, "gpu": 0.5}, max_concurrent_trials=2), "gpu")
    assert {t.status for t in gpu.trials} == {"TERMINATED"} and len(gpu.trials) == 2
    assert gpu_rows and {r["device"] for r in gpu_rows} == {"cuda"}
    # Both half-GPU trials ran at the same time on the one GPU.
    starts = sorted((r["timestamp"] - r["time_total_s"], r["trial"]) for r in gpu_rows if r["epoch"] == 1)
    ends = {r["trial"]: r["timestamp"] for r in gpu_rows if r["epoch"] == 3}
    assert starts[1][0] < ends[starts[0][1]], "the two 0.5-GPU trials did not overlap"

    cpu, cpu_rows = _tune(splits, tmp_path, _cfg(resources={"cpu": 1, "gpu": 0}, num_samples=1), "cpu")
    assert {r["device"] for r in cpu_rows} == {"cpu"}

    # A checkpoint written by a CUDA trial loads on a CPU-only host and scores what the trial reported.
    model = load_checkpoint_model(Path(gpu.best_checkpoint_uri), gpu.best_config)
    assert all(p.device.type == "cpu" for p in model.parameters())
    acc = evaluate(model, splits["valid"])["accuracy"]
    # cuDNN/TF32 and CPU kernels round differently: a couple of the 241 images may flip.
    assert acc == pytest.approx(gpu.best_metric, abs=3 / len(splits["valid"][1]))
    assert acc > 0.5  # chance is 0.1


def test_pbt_on_a_shared_gpu_exploits_and_keeps_training_on_cuda(ray_local, tmp_path, splits):
    # One good and one hopeless learning rate: the hopeless trial must take over the good one's state.
    # synch: each trial's first epoch includes its CUDA start-up (seconds, uneven), the next ones take
    # milliseconds, so an asynchronous PBT could see one trial finish before the other reports.
    space = {**SPACE, "lr": ParamSpec(type="grid", values=[0.05, 1e-5])}
    cfg = _cfg(scheduler="pbt", search="grid", num_samples=1, max_concurrent_trials=2,
               resources={"cpu": 1, "gpu": 0.5},
               scheduler_options={"perturbation_interval": 1, "quantile_fraction": 0.5, "synch": True,
                                  "hyperparam_mutations": {"lr": {"type": "loguniform", "low": 1e-3, "high": 0.2}}})
    result, rows = _tune(splits, tmp_path, cfg, "pbt", space)
    assert not [t for t in result.trials if t.status == "ERROR"]
    exploits = [r for r in rows if r["restored_from"] not in ("", r["trial"])]
    assert exploits, f"no trial restored another trial's checkpoint: {rows}"
    assert {r["device"] for r in rows} == {"cuda"}
    last = max((r for r in rows if r["trial"] == exploits[0]["trial"]), key=lambda r: r["epoch"])
    assert last["epoch"] == 3 and last["mean_accuracy"] > 0.5


def test_final_fit_trains_on_the_gpu_and_returns_a_cpu_model(splits):
    train_full = tuple(np.concatenate([a, b]) for a, b in zip(splits["train"], splits["valid"], strict=True))
    torch.cuda.reset_peak_memory_stats()
    model = fit_final({**SPACE, "lr": 0.05}, train_full, epochs=3)
    assert torch.cuda.max_memory_allocated() > 0, "the final fit never touched the GPU"
    assert all(p.device.type == "cpu" for p in model.parameters()) and not model.training
    assert evaluate(model, splits["test"])["accuracy"] > 0.5


def test_bf16_trials_train_under_autocast_on_cuda_and_checkpoint_float32_weights(ray_local, tmp_path, splits):
    space = {**SPACE, "precision": "bf16"}
    result, rows = _tune(splits, tmp_path, _cfg(resources={"cpu": 1, "gpu": 0.5}, max_concurrent_trials=2),
                         "bf16", space)
    assert {t.status for t in result.trials} == {"TERMINATED"}
    assert {(r["device"], r["precision"]) for r in rows} == {("cuda", "bf16")}
    assert all(np.isfinite(r["train_loss"]) for r in rows)
    # Autocast leaves the weights (and so the checkpoint and the registered model) in float32.
    model = load_checkpoint_model(Path(result.best_checkpoint_uri), result.best_config)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert evaluate(model, splits["valid"])["accuracy"] > 0.5  # chance is 0.1
