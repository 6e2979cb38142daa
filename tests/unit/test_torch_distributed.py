"""Data-parallel FashionMNIST trials (``tune.resources.workers_per_trial`` > 1): every trial is a Ray Train
``TorchTrainer`` run (DDP, gloo) of 2 workers x 1 CPU, each reading its own shard of the data version's
``.npz`` splits from storage through Ray Data.

Real parts: the session's local Ray (2 CPUs), Ray Train, Ray Data, the real 2k FashionMNIST sample
prepared into a tmp folder. Small CNNs (width 8), 2-3 epochs: these tests check the plumbing (reports,
shards, checkpoints, schedulers, resume, retrain), not models.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import pytest

from tests.conftest import FASHION_SAMPLE
from tuning_core.config import FashionData, TuneConfig, build_config
from tuning_core.data import idx
from tuning_core.runner import run_tuning

torch = pytest.importorskip("torch")  # the [torch] extra (`make test-py313` runs without it)

from tuning_core.trainables.torch import evaluate, load_checkpoint_model  # noqa: E402 - needs torch

LOCAL = pafs.LocalFileSystem()
SPACE: dict[str, Any] = {"lr": {"type": "loguniform", "low": 1e-5, "high": 0.1}, "momentum": 0.9, "batch_size": 64,
                         "weight_decay": 1e-4, "width": 8, "hidden": 32, "model": "cnn"}
# What train_fashion reports every epoch: the data-parallel trials report the same names.
SINGLE_PROCESS_METRICS = {"mean_accuracy", "loss", "train_loss", "epoch", "lr", "restored_epoch", "restored_from",
                          "device", "precision", "training_iteration", "node_id"}


def dp_cfg(**kw: Any) -> TuneConfig:
    base = {"search": "random", "scheduler": "fifo", "metric": "mean_accuracy", "mode": "max", "num_samples": 1,
            "max_iterations": 2, "checkpoint_every": 1, "space": SPACE, "max_failures": 1,
            "resources": {"workers_per_trial": 2, "cpu_per_worker": 1}}
    return build_config(TuneConfig, {**base, **kw})


@pytest.fixture(scope="module")
def version(tmp_path_factory) -> Any:
    root = tmp_path_factory.mktemp("store")
    return idx.prepare(FashionData(source=str(FASHION_SAMPLE)), LOCAL, str(FASHION_SAMPLE), LOCAL, str(root))


@pytest.fixture(scope="module")
def splits(version) -> dict[str, Any]:
    return {s: idx.load_split(LOCAL, version.path, s) for s in ("train", "valid", "test")}


def tune_inputs(version: Any, cfg: TuneConfig) -> tuple[Any, dict[str, Any]]:
    """The FashionMNIST workload's trainable and trial data for ``cfg``, as the tune stage builds them."""
    from tuning_core.workloads.base import Splits
    from tuning_core.workloads.fashion_mnist import WORKLOAD, FashionPipeline

    pipeline = FashionPipeline(data=FashionData(source=str(FASHION_SAMPLE)), tune=cfg)
    never = Splits(lambda name: pytest.fail(f"the driver loaded split {name}"), ("train", "valid"), LOCAL)
    return WORKLOAD.trainable(pipeline), WORKLOAD.tune_data(pipeline, version, never)


def trial_results(exp_dir: Path, trial_id: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (exp_dir / f"trial_{trial_id}" / "result.json").read_text().splitlines()]


def assert_own_shards(row: dict[str, Any], version: Any) -> None:
    workers = row["workers"]
    assert [w["rank"] for w in workers] == [0, 1]
    for split in ("train", "valid"):
        rows = [w[f"{split}_rows"] for w in workers]
        assert sum(rows) == version.rows[split], (split, rows)  # none dropped, none read twice
        assert all(0 < n < version.rows[split] for n in rows), (split, rows)  # nobody read the whole split


def test_asha_stops_the_hopeless_trial_and_every_worker_reads_only_its_shard(ray_local, version, splits, tmp_path):
    # A good and a hopeless learning rate meet at the grace rung: top-k with eta 2 keeps one.
    cfg = dp_cfg(scheduler="asha", num_samples=2, scheduler_options={"grace_period": 1, "reduction_factor": 2},
                 points_to_evaluate=[{"lr": 0.05}, {"lr": 1e-5}])
    trainable, data = tune_inputs(version, cfg)
    assert trainable.__name__ == "train_fashion_distributed"
    result = run_tuning(trainable, data, cfg.space, cfg, LOCAL, str(tmp_path / "ray"), "dp-asha")
    exp_dir = Path(result.experiment_uri)
    by_iters = sorted(result.trials, key=lambda t: t.iterations)
    assert [t.iterations for t in by_iters] == [1, 2]  # ASHA stopped the hopeless one at its first rung
    assert by_iters[0].config["lr"] == pytest.approx(1e-5)
    for trial in result.trials:
        rows = trial_results(exp_dir, trial.trial_id)
        assert [r["training_iteration"] for r in rows] == list(range(1, trial.iterations + 1))  # every epoch
        for row in rows:
            assert SINGLE_PROCESS_METRICS <= set(row)
            assert row["restored_epoch"] == 0 and row["device"] == "cpu"
            assert_own_shards(row, version)
        assert not (exp_dir / f"trial_{trial.trial_id}" / "train").exists()  # the Train run's own folder is gone
    # The winner's Tune checkpoint is train_fashion's format, written by rank 0, and holds the model whose
    # accuracy on the whole validation split is the one the workers reported together.
    best = by_iters[1]
    last = trial_results(exp_dir, best.trial_id)[-1]
    ckpt = Path(best.checkpoint_uri)
    state = torch.load(ckpt / "state.pt", weights_only=True)
    assert state["epoch"] == 2 and state["trial_id"] == best.trial_id
    assert not any(k.startswith("module.") for k in state["model"])  # no DDP wrapper names
    metrics = evaluate(load_checkpoint_model(ckpt, best.config), splits["valid"])
    assert metrics["accuracy"] == pytest.approx(last["mean_accuracy"], abs=1e-6)
    assert metrics["logloss"] == pytest.approx(last["loss"], rel=1e-4)


def test_pbt_exploit_continues_the_clones_model_on_a_new_train_run(ray_local, version, tmp_path):
    """PBT (synchronous, every 2 epochs) over a good and a hopeless learning rate, 2 workers x 0.5 CPU
    each so both trials run side by side: the hopeless trial exploits the good one, and its new Train
    run's workers continue from the clone's epoch-2 model (``restored_from``) instead of epoch 0."""
    from ray.tune import Callback

    seen: list[tuple[str, int, str, int]] = []
    ids: dict[str, str] = {}  # PBT's log names trials by their original tag

    class Seen(Callback):  # the driver's view: a restarted trial's result.json may lose rows (Ray's logger)
        def on_trial_start(self, iteration, trials, trial, **info):
            # The original tag: PBT appends "@perturbed[...]" to an exploiting trial's, before callbacks
            # see that trial's result (the run in CI met it that way).
            ids.setdefault(trial.experiment_tag.split("@")[0], trial.trial_id)

        def on_trial_result(self, iteration, trials, trial, result, **info):
            seen.append((trial.trial_id, int(result["training_iteration"]), str(result["restored_from"]),
                         int(result["restored_epoch"])))

    cfg = dp_cfg(scheduler="pbt", num_samples=2, max_iterations=4, checkpoint_every=2,
                 resources={"workers_per_trial": 2, "cpu_per_worker": 0.5},
                 points_to_evaluate=[{"lr": 0.05}, {"lr": 1e-5}],
                 scheduler_options={"perturbation_interval": 2, "quantile_fraction": 0.5, "synch": True})
    trainable, data = tune_inputs(version, cfg)
    result = run_tuning(trainable, data, cfg.space, cfg, LOCAL, str(tmp_path / "ray"), "dp-pbt", callbacks=[Seen()])
    exploits = [json.loads(line) for line in (Path(result.experiment_uri) / "pbt_global.txt").read_text().splitlines()]
    assert exploits, seen
    for t in result.trials:
        assert t.status == "TERMINATED" and t.iterations == 4
        # Epochs report where PBT decides (every 2), as with one worker.
        assert [h["training_iteration"] for h in t.history] == [2, 4]
    # Each exploit line is [target, clone, target_iter, clone_iter, old_config, new_config].
    target, clone = ids[exploits[0][0]], ids[exploits[0][1]]
    resumed = [(it, src, ep) for tid, it, src, ep in seen if tid == target and it > 2]
    assert resumed and all(src == clone and ep == 2 for _, src, ep in resumed), (exploits[0][:4], seen)


def test_a_trial_whose_worker_is_killed_resumes_from_its_checkpoint(ray_local, version, tmp_path):
    """SIGKILL one Train worker right after the trial's first checkpoint: Tune retries the trial, whose
    new Train run resumes after epoch 1 instead of starting again."""
    from tests.faults import train_worker_killer

    killer, killed = train_worker_killer(at_iteration=1)

    cfg = dp_cfg(max_iterations=3, points_to_evaluate=[{"lr": 0.05}])
    trainable, data = tune_inputs(version, cfg)
    result = run_tuning(trainable, data, cfg.space, cfg, LOCAL, str(tmp_path / "ray"), "dp-kill",
                        callbacks=[killer])
    assert killed, "no Ray Train worker process was found to kill"
    (trial,) = result.trials
    assert trial.iterations == 3
    rows = trial_results(Path(result.experiment_uri), trial.trial_id)
    # Epochs 2 and 3 come from the retry, which started from the epoch-1 checkpoint of the same trial.
    assert [(r["epoch"], r["restored_epoch"]) for r in rows][-2:] == [(2, 1), (3, 1)]
    assert rows[-1]["restored_from"] == trial.trial_id


def test_distributed_retrain_returns_what_the_single_process_final_fit_returns(ray_local, version, splits):
    from tuning_core.trainables.distributed import Workers
    from tuning_core.trainables.torch_distributed import fit_models, image_files

    tuned_config = {k: v for k, v in SPACE.items() if k != "lr"} | {"lr": 0.05}
    default_config = {"model": "cnn", "width": 16, "lr": 0.01}
    tuned, default = fit_models([(tuned_config, 2), (default_config, 1)],
                                image_files(LOCAL, version.path, version.manifest), Workers(2, 1), seed=0)
    # What tuning_core.trainables.torch.fit_final returns: CPU modules in eval mode with their build arguments.
    for model, width in ((tuned, 8), (default, 16)):
        assert not model.training
        assert model.spec["name"] == "cnn" and model.spec["width"] == width
        assert next(model.parameters()).device.type == "cpu"
    assert evaluate(tuned, splits["test"])["accuracy"] > 0.3  # chance is 0.1


def test_one_worker_per_trial_keeps_the_single_process_trainable_without_ray_train_torch(ray_local, version,
                                                                                        tmp_path):
    cfg = dp_cfg(resources={"cpu": 1}, max_iterations=1, points_to_evaluate=[{"lr": 0.05}])
    trainable, data = tune_inputs_single(version, cfg)
    assert trainable.__name__ == "train_fashion" and set(data) == {"train", "valid", "data_key"}
    probe = tmp_path / "modules.json"

    def probed(config: dict[str, Any], **kwargs: Any) -> None:
        import sys

        try:
            trainable(config, **kwargs)
        finally:  # Tune ends the function inside its last report (the stopper): look then
            loaded = sorted(m for m in sys.modules if m.startswith(("ray.train.torch", "ray.train.v2.torch",
                                                                    "tuning_core.trainables.torch_distributed",
                                                                    "tuning_core.trainables.distributed")))
            probe.write_text(json.dumps({"pid": os.getpid(), "loaded": loaded, "torch": "torch" in sys.modules}))

    probed.__name__ = "train_fashion"
    result = run_tuning(probed, data, cfg.space, cfg, LOCAL, str(tmp_path / "ray"), "one-worker")
    assert result.trials[0].iterations == 1
    seen = json.loads(probe.read_text())
    assert seen["pid"] != os.getpid()  # it ran in the trial's own process
    assert seen["torch"] and seen["loaded"] == []  # it trained with torch, without Ray Train's torch


def tune_inputs_single(version: Any, cfg: TuneConfig) -> tuple[Any, dict[str, Any]]:
    from tuning_core.workloads.base import Splits
    from tuning_core.workloads.fashion_mnist import WORKLOAD, FashionPipeline

    pipeline = FashionPipeline(data=FashionData(source=str(FASHION_SAMPLE)), tune=cfg)
    loaded = Splits(lambda name: idx.load_split(LOCAL, version.path, name), ("train", "valid"), LOCAL)
    return WORKLOAD.trainable(pipeline), WORKLOAD.tune_data(pipeline, version, loaded)


def test_distributed_retrain_reads_its_shards_from_s3_with_the_keyless_filesystem(ray_local, s3_settings):
    """The workers read the version's npz files from S3 (moto) through the filesystem Ray is handed, which
    holds no keys (they have theirs in their environment), as the flow's retrain does on an s3:// root."""
    from infra.storage import build_storage
    from tuning_core.trainables.distributed import Workers
    from tuning_core.trainables.torch_distributed import fit_models, image_files

    storage = build_storage(s3_settings)
    version = idx.prepare(FashionData(source=str(FASHION_SAMPLE)), LOCAL, str(FASHION_SAMPLE), storage.fs,
                          storage.root)
    assert version.uri.startswith("s3://")
    fs = storage.fs_for_ray(s3_settings)
    # No key travels to the workers with it (the storage's own filesystem pickles its secret).
    assert "testing-secret" in repr(storage.fs.__reduce__()) and "testing-secret" not in repr(fs.__reduce__())
    (model,) = fit_models([({**SPACE, "lr": 0.05}, 1)], image_files(fs, version.uri, version.manifest),
                          Workers(2, 1))
    test = idx.load_split(storage.fs, version.path, "test")
    assert evaluate(model, test)["accuracy"] > 0.2  # chance is 0.1; one epoch of a width-8 CNN
