"""The FashionMNIST workload: IDX files (gz or raw) → a PyTorch CNN (MNIST reads the same way).

Data: ``tuning_core.data.idx``. Trainable: ``tuning_core.trainables.torch`` (the optional ``[torch]``
extra). The registered model is a ``torch.export`` program served by
``infra/model_code/image_classifier.py``: raw 0-255 pixels or normalised images in, logits out.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, model_validator

from tuning_core.config import FashionData, RegistryConfig, RetrainConfig, TuneConfig, _Frozen
from tuning_core.evaluate import MULTICLASS_METRICS
from tuning_core.models import MODEL_NAMES
from tuning_core.results import DataVersion, TuningResult
from tuning_core.sources import DataSource
from tuning_core.space import FASHION_SPACE
from tuning_core.workloads.base import CliOption, DatasetSample, ModelSpec, Predictor, Workload, lineage_metrics, parts

if TYPE_CHECKING:
    import numpy as np
    import pyarrow.fs as pafs

    from tuning_core.retrain import FinalModel

# Choices typed from the model table: pydantic refuses other names, the Prefect form renders a dropdown.
ModelName = Literal[tuple(MODEL_NAMES)]  # type: ignore[valid-type]

FASHION_TUNE = TuneConfig(search="hyperopt", scheduler="asha", metric="mean_accuracy", mode="max", num_samples=4,
                          max_iterations=5, checkpoint_every=1)
FASHION_REGISTRY = RegistryConfig(model_name="tunepipe-fashion-mnist", metric="accuracy")


class FashionPipeline(_Frozen):
    """The FashionMNIST pipeline's parameters: data → tune → retrain → register."""

    workload: Literal["fashion-mnist"] = "fashion-mnist"
    data: FashionData
    tune: TuneConfig = FASHION_TUNE
    retrain: RetrainConfig = RetrainConfig()
    registry: RegistryConfig = FASHION_REGISTRY
    run_id: str | None = None
    warm_start_from_champion: bool = False
    model: ModelName | None = Field(None, description="the network to tune (sets the search space's 'model' "
                                                      "entry); None: the space's own entry, cnn by default")

    @model_validator(mode="before")
    @classmethod
    def _partial_sections_keep_workload_defaults(cls, data: Any) -> Any:
        """A partial ``tune``/``registry`` (YAML, CLI, Prefect form) overrides the FashionMNIST defaults,
        not TuneConfig's generic ones (whose metric is the flights' ``auc``). ``model`` is written into
        the search space, the one place trials read it from."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for key, default in (("tune", FASHION_TUNE), ("registry", FASHION_REGISTRY)):
            if isinstance(data.get(key), dict):
                data[key] = {**default.model_dump(), **data[key]}
        tune = data.get("tune", FASHION_TUNE)
        if data.get("model") is not None and isinstance(tune, dict | TuneConfig):
            tune = tune.model_dump() if isinstance(tune, TuneConfig) else dict(tune)
            tune["space"] = {**(tune.get("space") or FASHION_SPACE), "model": data["model"]}
            data["tune"] = tune
        return data


# Untuned reference: the default small CNN with plain SGD defaults, same epochs and data.
DEFAULT_CONFIG = {"model": "cnn", "width": 32, "lr": 0.01, "momentum": 0.9, "batch_size": 64, "weight_decay": 0.0}


class FashionMnist(Workload):
    name = "fashion-mnist"
    config_model = FashionPipeline
    default_space = FASHION_SPACE
    trial_metrics = ("mean_accuracy", "loss", "train_loss")
    worker_preload = ("tuning_core.trainables.torch",)
    evaluated_metrics = MULTICLASS_METRICS
    title = "IDX image files → PyTorch CNN, tuned with Ray Tune, registered in MLflow"
    data_help = "folder or s3:// prefix of IDX files (torchvision's FashionMNIST/raw layout or flat)"
    cli_options = (
        CliOption("--model", "model", str, "network to tune (the space's model entry)", "cnn",
                  choices=tuple(MODEL_NAMES), commands=("run",)),
        CliOption("--max-train", "data.max_train", int, "keep the first N training images", "all"),
    )
    requires = (("torch", "fashion-mnist needs torch, which is not installed: pip install 'tunepipe[torch]'"),)

    def check_configs(self, configs: list[tuple[str, dict[str, Any]]]) -> None:
        from tuning_core.trainables.torch import check_configs

        check_configs(configs)

    # ---------------------------------------------------------------- data
    def data_source(self, cfg: FashionPipeline) -> DataSource:
        return DataSource.parse(cfg.data.source)

    def check_data(self, cfg: FashionPipeline, source: DataSource, source_fs: pafs.FileSystem) -> None:
        from tuning_core.data import idx

        idx.check_source(source_fs, source.path)

    def prepare(self, cfg: FashionPipeline, source: DataSource, source_fs: pafs.FileSystem, fs: pafs.FileSystem,
                root: str, ray_fs: pafs.FileSystem | None = None) -> DataVersion:
        from tuning_core.data import idx

        return idx.prepare(cfg.data, source_fs, source.path, fs, root)

    def load_split(self, fs: pafs.FileSystem, version: DataVersion, split: str) -> tuple[np.ndarray, np.ndarray]:
        from tuning_core.data import idx

        return idx.load_split(fs, version.path, split)

    # ---------------------------------------------------------------- tune
    def trainable(self, cfg: FashionPipeline) -> Callable[..., None]:
        if cfg.tune.resources.data_parallel:
            from tuning_core.trainables.torch_distributed import train_fashion_distributed

            return train_fashion_distributed
        from tuning_core.trainables.torch import train_fashion

        return train_fashion

    def tune_data(self, cfg: FashionPipeline, version: DataVersion, splits: Mapping[str, Any]) -> dict[str, Any]:
        if cfg.tune.resources.data_parallel:  # the workers read their shards; the driver loads nothing
            from tuning_core.trainables.distributed import read_once
            from tuning_core.trainables.torch_distributed import workers_of

            files = _image_files(version, splits)
            return {"files": files, "workers": workers_of(cfg.tune.resources), "datasets": read_once(files)}
        return super().tune_data(cfg, version, splits)

    # ---------------------------------------------------------------- retrain, evaluate, register
    def retrain(self, cfg: FashionPipeline, version: DataVersion, tuning: TuningResult, splits: dict[str, Any],
                checkpoint_dir: Path | None) -> FinalModel:
        import numpy as np

        from tuning_core.evaluate import confusion_png
        from tuning_core.retrain import FinalModel
        from tuning_core.trainables import torch as tt

        test = splits["test"]
        epochs = max(1, tuning.best_iteration)
        started = time.perf_counter()
        fits = [(DEFAULT_CONFIG, epochs)]
        if cfg.retrain.retrain:
            fits.insert(0, (tuning.best_config, epochs))
        if cfg.tune.resources.data_parallel:
            # The winner and the default on the trials' workers, each reading its shard of train+valid.
            from tuning_core.trainables.torch_distributed import fit_models, workers_of

            models = fit_models(fits, _image_files(version, splits), workers_of(cfg.tune.resources),
                                seed=cfg.tune.seed)
        else:
            (xt, yt), (xv, yv) = splits["train"], splits["valid"]
            full = (np.concatenate([xt, xv]), np.concatenate([yt, yv]))
            models = [tt.fit_final(config, full, n, seed=cfg.tune.seed) for config, n in fits]
        *tuned, baseline = models
        if cfg.retrain.retrain:
            model, source = tuned[0], "retrained"
        else:
            model, source = tt.load_checkpoint_model(checkpoint_dir, tuning.best_config), "checkpoint"
        tuned_m, base_m = tt.evaluate(model, test), tt.evaluate(baseline, test)
        fit_s = time.perf_counter() - started
        cm = tuned_m.pop("confusion")
        base_m.pop("confusion", None)
        plots = {"confusion_matrix.png": confusion_png(cm, [str(i) for i in range(10)], "test confusion matrix")}
        return FinalModel(model=model, rounds=epochs, test_metrics=tuned_m, baseline_test_metrics=base_m,
                          plots=plots, source=source, extra={"confusion": cm}, fit_s=fit_s)

    def model_spec(self, cfg: FashionPipeline, version: DataVersion, tuning: TuningResult, final: FinalModel,
                   splits: dict[str, Any], folder: Path) -> ModelSpec:
        (xt, yt), (x_test, y_test) = splits["train"], splits["test"]
        norm = version.manifest["normalisation"]
        preprocessing = {"input": "raw integer pixels 0-255 (normalised by the model) or normalised float32 images",
                         "formula": "(pixels / 255 - mean) / std",
                         "mean": norm["mean"], "std": norm["std"], "pixels": "uint8 0-255, as in the IDX files",
                         "data_version": version.version}
        # The datasets' profiles are computed from what is passed: a sample stands for each split.
        return image_spec(
            final.model, x_test[:5], preprocessing, folder,
            params={**tuning.best_config, "rounds": final.rounds, "source": final.source},
            metrics=lineage_metrics(final),
            train=DatasetSample(f"fashion-mnist-{version.version}", version.uri, version.version,
                                x=xt[:1000], y=yt[:1000]),
            test=DatasetSample(f"fashion-mnist-{version.version}-test", version.uri, version.version,
                               x=x_test[:1000], y=y_test[:1000]))

    def score(self, model: Predictor, version: DataVersion, test: tuple[np.ndarray, np.ndarray]) -> dict[str, float]:
        import numpy as np

        from tuning_core.evaluate import multiclass_metrics

        labels, probabilities = [], []
        for x, y in parts(test):
            logits = np.asarray(model.predict(x))
            e = np.exp(logits - logits.max(axis=1, keepdims=True))
            labels.append(y)
            probabilities.append(e / e.sum(axis=1, keepdims=True))
        return multiclass_metrics(np.concatenate(labels), np.concatenate(probabilities))


def _image_files(version: DataVersion, splits: Mapping[str, Any]) -> Any:
    """Where data-parallel workers read ``version``'s splits: the filesystem Ray may hold (``Splits.fs``)."""
    import pyarrow.fs as pafs

    from tuning_core.trainables.torch_distributed import image_files

    fs = getattr(splits, "fs", None) or pafs.LocalFileSystem()  # a plain dict of arrays: a local version
    return image_files(fs, version.path, version.manifest)


def image_spec(model: Any, example: np.ndarray, preprocessing: dict[str, Any], folder: Path,
               params: dict[str, Any] | None = None, metrics: dict[str, float] | None = None,
               train: DatasetSample | None = None, test: DatasetSample | None = None) -> ModelSpec:
    """A torch image classifier as a registered model taking raw 0-255 pixels or normalised images.

    The network ships as a ``torch.export`` program (graph and weights, no model class to import);
    ``preprocessing`` (the training split's ``mean`` and ``std``) is both the model's config, which
    normalises raw pixels at prediction time, and its metadata (``mlflow.models.get_model_info(uri)
    .metadata["preprocessing"]``) for consumers who prepare images themselves.

    Args:
        example: normalised float32 images, N x C x H x W (a few are the input example).
    """
    import numpy as np
    import torch

    model = model.to("cpu").eval()
    x = torch.as_tensor(example[:2])
    with torch.no_grad():
        num_classes = int(model(x).shape[1])
    # Any batch size: the first dimension is dynamic.
    program = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, str(folder / "model.pt2"))
    return ModelSpec(
        code="image_classifier.py", artifacts={"program": str(folder / "model.pt2")},
        requirements=("mlflow", "torch", "numpy", "pandas"),
        input_example=np.asarray(example[:2], dtype=np.float32),
        # No input schema: MLflow checks tensors for one exact dtype and shape, and this model takes raw
        # integer pixels and normalised floats in three layouts (checked by the model).
        outputs={"tensor": ("float32", (-1, num_classes))},
        model_config={"mean": float(preprocessing["mean"]), "std": float(preprocessing["std"]),
                      "image_shape": [int(n) for n in example.shape[1:]], "num_classes": num_classes},
        metadata={"preprocessing": preprocessing,
                  "input": "raw integer pixels 0-255 or normalised float32 images, N x H x W, "
                           "N x C x H x W or N x C*H*W; returns N x classes logits"},
        params=params or {}, metrics=metrics or {}, train=train, test=test)


WORKLOAD = FashionMnist()
