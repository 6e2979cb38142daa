"""The tabular workload: any CSV/Parquet table with a label column → XGBoost, for binary, multiclass or
regression tasks.

This module is the whole workload (README, "Add a workload", walks through it): its config model, how
the task picks the objective and the metrics, the data stage (``tuning_core.data.tabular``), the
XGBoost trainable it shares with flights (``label`` and ``task`` passed to each trial), retraining and
evaluation, and the registered model (``infra/model_code/tabular.py``: raw records in, predictions out).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tuning_core.config import RegistryConfig, RetrainConfig, TuneConfig
from tuning_core.errors import ConfigError
from tuning_core.evaluate import BINARY_METRICS, MULTICLASS_METRICS, REGRESSION_METRICS
from tuning_core.results import DataVersion, TuningResult
from tuning_core.sources import DataSource
from tuning_core.space import FLIGHTS_SPACE
from tuning_core.workloads.base import (
    CliOption,
    DatasetSample,
    ModelSpec,
    Predictor,
    Workload,
    lineage_metrics,
    parts,
    plain_features,
)

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow.fs as pafs

    from tuning_core.data.tabular import LabelInfo
    from tuning_core.retrain import FinalModel

NAME = "tabular"


@dataclass(frozen=True)
class Task:
    """What a task means for XGBoost, for tuning and for the registry."""

    objective: str
    eval_metric: tuple[str, ...]  # reported by every trial on the valid split; the first is the default
    mode: Literal["max", "min"]  # of the default tune metric
    registry_metric: str  # a test metric (``evaluate``)
    registry_mode: Literal["max", "min"]


TASKS: dict[str, Task] = {
    "binary": Task("binary:logistic", ("auc", "logloss", "error"), "max", "auc", "max"),
    "multiclass": Task("multi:softprob", ("mlogloss", "merror"), "min", "logloss", "min"),
    "regression": Task("reg:squarederror", ("rmse", "mae"), "min", "rmse", "min"),
}
# Metrics that are better when larger; every other metric named here is better when smaller.
HIGHER_IS_BETTER = {"auc", "accuracy", "r2"}


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class TabularData(_Frozen):
    """Where the table is, what to predict, and how to split it."""

    source: str = Field(..., description="CSV or Parquet file, glob, folder or s3:// prefix")
    label: str = Field(..., description="the column to predict")
    task: Literal["auto", "binary", "multiclass", "regression"] = Field(
        "auto", description="auto: from the label (strings, booleans and few whole numbers are classes)")
    split: Literal["random", "time"] = "random"
    time_column: str | None = Field(None, description="split: time orders rows by it (earliest rows train)")
    drop_columns: list[str] = Field(default_factory=list, description="columns that are not features (ids, ...)")
    valid_fraction: float = Field(0.15, gt=0, lt=0.5)
    test_fraction: float = Field(0.15, gt=0, lt=0.5)
    seed: int = 0
    max_rows: int | None = Field(None, ge=1, description="keep only the first N labelled rows (quick runs)")
    max_unique_fraction: float = Field(
        0.5, gt=0, le=1, description="a string column with more distinct values than this share of its values "
        "(and over 100) is an identifier, not a category: left out of the features and named in the manifest; "
        "1 keeps every string column")

    @model_validator(mode="after")
    def _time_split_needs_a_column(self) -> TabularData:
        if self.split == "time" and not self.time_column:
            raise ValueError("split 'time' needs data.time_column")
        return self


class TabularTune(TuneConfig):
    """TuneConfig whose metric and mode default to the task's (``auto``: resolved before the run)."""

    metric: str = Field("auto", description="auto: auc (binary), mlogloss (multiclass), rmse (regression)")
    mode: Literal["max", "min", "auto"] = "auto"


class TabularRegistry(RegistryConfig):
    model_name: str = Field("tunepipe-tabular", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")
    metric: str = Field("auto", description="auto: auc (binary), logloss (multiclass), rmse (regression)")
    mode: Literal["max", "min", "auto"] = "auto"


class TabularPipeline(_Frozen):
    """The tabular pipeline's parameters: data → tune → retrain → register."""

    workload: Literal["tabular"] = NAME
    data: TabularData
    tune: TabularTune = TabularTune()
    retrain: RetrainConfig = RetrainConfig()
    registry: TabularRegistry = TabularRegistry()
    run_id: str | None = None
    warm_start_from_champion: bool = False


def _mode(metric: str, stated: str) -> str:
    return stated if stated != "auto" else ("max" if metric in HIGHER_IS_BETTER else "min")


# Label inspections by (source, its files' fingerprint, label, task): the checks before a run read the label
# once, not once per check (local sources only; an S3 source has no cheap fingerprint).
_LABELS: dict[tuple[Any, ...], LabelInfo] = {}


class Tabular(Workload):
    name = NAME
    config_model = TabularPipeline
    default_space = FLIGHTS_SPACE  # XGBoost's space; the objective comes from the task, not the space
    worker_preload = ("tuning_core.trainables.xgboost_preload",)
    trial_metrics = tuple(dict.fromkeys(m for t in TASKS.values() for m in t.eval_metric))
    evaluated_metrics = tuple(dict.fromkeys((*BINARY_METRICS, *MULTICLASS_METRICS, *REGRESSION_METRICS)))
    title = "any CSV/Parquet table with a label column → XGBoost (binary, multiclass or regression)"
    data_help = "CSV or Parquet file, glob, folder or s3:// prefix"
    cli_options = (
        CliOption("--label", "data.label", str, "the column to predict"),
        CliOption("--task", "data.task", str, "what kind of target the label is", "auto",
                  choices=("auto", "binary", "multiclass", "regression")),
        CliOption("--time-column", "data.time_column", str, "split by time on this column (earliest rows train)"),
        CliOption("--max-rows", "data.max_rows", int, "keep the first N labelled rows", "all"),
    )

    def check_configs(self, configs: list[tuple[str, dict[str, Any]]]) -> None:
        from tuning_core.trainables.xgboost import check_configs

        check_configs(configs)

    # ---------------------------------------------------------------- config from the data
    def label_info(self, cfg: TabularPipeline, source: DataSource, source_fs: pafs.FileSystem) -> LabelInfo:
        from tuning_core.data import tabular

        fingerprint = source.fingerprint()
        key = (source.uri, fingerprint, cfg.data.label, cfg.data.task)
        if fingerprint is not None and key in _LABELS:
            return _LABELS[key]
        schema = tabular.read_schema(source_fs, source)
        features = tabular.feature_columns(schema, cfg.data.label, cfg.data.time_column, list(cfg.data.drop_columns),
                                           source.uri)
        # The label, and the string columns: a table whose features are all identifiers fails here, before
        # anything starts, rather than in the data stage.
        strings = [name for name, kind in features.items() if kind == "category"] \
            if cfg.data.max_unique_fraction < 1 else []
        table = tabular.read_table(source_fs, source, columns=[cfg.data.label, *strings])
        tabular.identifier_columns(table, features, cfg.data.max_unique_fraction, source.uri, quiet=True)
        info = tabular.inspect_label(table.column(cfg.data.label), cfg.data.label, cfg.data.task, source.uri)
        if fingerprint is not None:
            _LABELS[key] = info
        return info

    def resolve(self, cfg: TabularPipeline, source: DataSource, source_fs: pafs.FileSystem) -> TabularPipeline:
        """The task read from the label (unless stated), and the tune and registry metrics and modes that go
        with it (unless given)."""
        task = TASKS[self.label_info(cfg, source, source_fs).task if cfg.data.task == "auto" else cfg.data.task]
        name = next(k for k, v in TASKS.items() if v is task)
        metric = task.eval_metric[0] if cfg.tune.metric == "auto" else cfg.tune.metric
        tune = cfg.tune.model_copy(update={"metric": metric, "mode": task.mode if cfg.tune.metric == "auto"
                                           else _mode(metric, cfg.tune.mode)})
        reg_metric = task.registry_metric if cfg.registry.metric == "auto" else cfg.registry.metric
        registry = cfg.registry.model_copy(update={
            "metric": reg_metric, "mode": task.registry_mode if cfg.registry.metric == "auto"
            else _mode(reg_metric, cfg.registry.mode)})
        return cfg.model_copy(update={"data": cfg.data.model_copy(update={"task": name}), "tune": tune,
                                      "registry": registry})

    def test_metrics(self, cfg: TabularPipeline) -> tuple[str, ...]:
        by_task = {"binary": BINARY_METRICS, "multiclass": MULTICLASS_METRICS, "regression": REGRESSION_METRICS}
        return by_task.get(cfg.data.task, self.evaluated_metrics)

    def reported_metrics(self, cfg: TabularPipeline) -> tuple[str, ...]:
        return TASKS[cfg.data.task].eval_metric if cfg.data.task in TASKS else self.trial_metrics

    # ---------------------------------------------------------------- data
    def data_source(self, cfg: TabularPipeline) -> DataSource:
        return DataSource.parse(cfg.data.source)

    def check_data(self, cfg: TabularPipeline, source: DataSource, source_fs: pafs.FileSystem) -> None:
        self.label_info(cfg, source, source_fs)

    def prepare(self, cfg: TabularPipeline, source: DataSource, source_fs: pafs.FileSystem, fs: pafs.FileSystem,
                root: str, ray_fs: pafs.FileSystem | None = None) -> DataVersion:
        from tuning_core.data import tabular

        return tabular.prepare(cfg.data, source, source_fs, fs, root, cfg.data.task)

    def load_split(self, fs: pafs.FileSystem, version: DataVersion, split: str) -> pd.DataFrame:
        from tuning_core.data import tabular

        return tabular.load_split(fs, version, split)

    def load_head(self, fs: pafs.FileSystem, version: DataVersion, split: str, rows: int) -> pd.DataFrame:
        from tuning_core.workloads.flights import parquet_head

        return parquet_head(fs, version, split, rows, typed_rows)

    def load_parts(self, fs: pafs.FileSystem, version: DataVersion, split: str, rows: int) -> Iterator[pd.DataFrame]:
        from tuning_core.workloads.flights import parquet_parts

        return parquet_parts(fs, version, split, rows, typed_rows)

    def describe_version(self, version: DataVersion) -> dict[str, Any]:
        m = version.manifest
        return {"task": m["task"], "label": m["label"], "classes": m["classes"], "features": m["features"],
                "dropped": m["dropped"]}

    # ---------------------------------------------------------------- tune
    def trainable(self, cfg: TabularPipeline) -> Callable[..., None]:
        if cfg.tune.resources.data_parallel:
            from tuning_core.trainables.xgboost_distributed import train_xgboost_distributed

            return train_xgboost_distributed
        from tuning_core.trainables.xgboost import train_xgboost

        return train_xgboost

    @staticmethod
    def booster_task(manifest: dict[str, Any]) -> dict[str, Any]:
        """The XGBoost parameters a task sets (objective, evaluation metrics, class count)."""
        task = TASKS[manifest["task"]]
        params: dict[str, Any] = {"objective": task.objective, "eval_metric": list(task.eval_metric)}
        if manifest["task"] == "multiclass":
            params["num_class"] = len(manifest["classes"])
        return params

    def tune_data(self, cfg: TabularPipeline, version: DataVersion, splits: dict[str, Any]) -> dict[str, Any]:
        if cfg.tune.resources.data_parallel:
            from tuning_core.trainables.distributed import read_once
            from tuning_core.trainables.xgboost_distributed import workers_of
            from tuning_core.workloads.flights import split_files

            files = split_files(version, splits, typed_rows)
            return {"files": files, "workers": workers_of(cfg.tune.resources), "datasets": read_once(files),
                    "task": self.booster_task(version.manifest)}
        return {**super().tune_data(cfg, version, splits), "label": version.manifest["label"],
                "task": self.booster_task(version.manifest)}

    # ---------------------------------------------------------------- retrain, evaluate, register
    def retrain(self, cfg: TabularPipeline, version: DataVersion, tuning: TuningResult, splits: dict[str, Any],
                checkpoint_dir: Path | None) -> FinalModel:
        import pandas as pd

        from tuning_core.retrain import DEFAULT_XGB_CONFIG, DEFAULT_XGB_ROUNDS, FinalModel, predict_parts, scaled_rounds
        from tuning_core.trainables.xgboost import fit_booster, load_booster
        from tuning_core.workloads.flights import evaluation_parts

        manifest = version.manifest
        label, task = manifest["label"], self.booster_task(manifest)
        started = time.perf_counter()
        if cfg.tune.resources.data_parallel:  # the same workers as the trials, each on its shard
            from functools import partial

            from tuning_core.trainables.xgboost_distributed import fit_boosters, workers_of
            from tuning_core.workloads.flights import split_files

            fit_many = partial(fit_boosters, files=split_files(version, splits, typed_rows),
                               workers=workers_of(cfg.tune.resources), task=task)
            rows = version.rows["train"], version.rows["valid"]
        else:
            train, valid = splits["train"], splits["valid"]
            full = pd.concat([train, valid], ignore_index=True)

            def fit_many(fits: list[tuple[dict[str, Any], int]]) -> list[Any]:
                return [fit_booster(config, full, n, label=label, task=task) for config, n in fits]

            rows = len(train), len(valid)
        fits = [(DEFAULT_XGB_CONFIG, DEFAULT_XGB_ROUNDS)]
        if cfg.retrain.retrain:
            rounds = scaled_rounds(tuning.best_iteration, *rows)
            fits.insert(0, (tuning.best_config, rounds))
            source = "retrained"
        else:
            if checkpoint_dir is None:
                raise ConfigError("retrain.retrain false: the best trial has no checkpoint to register; "
                                  "set retrain.retrain true or checkpoint more often (tune.checkpoint_every)")
            source = "checkpoint"
        *tuned_fit, baseline = fit_many(fits)
        booster = tuned_fit[0] if cfg.retrain.retrain else load_booster(checkpoint_dir)
        rounds = rounds if cfg.retrain.retrain else booster.num_boosted_rounds()
        # A data-parallel run's test split is evaluated part by part: the driver never holds it whole.
        y, tuned_p, base_p = predict_parts(evaluation_parts(cfg, splits), booster, baseline, label=label)
        fit_s = time.perf_counter() - started
        tuned, base = evaluate(manifest, y, tuned_p), evaluate(manifest, y, base_p)
        return FinalModel(model=booster, rounds=rounds, test_metrics=tuned, baseline_test_metrics=base,
                          plots=_plots(manifest, y, tuned_p, base_p), source=source, fit_s=fit_s)

    def model_spec(self, cfg: TabularPipeline, version: DataVersion, tuning: TuningResult, final: FinalModel,
                   splits: dict[str, Any], folder: Path) -> ModelSpec:
        import json

        from tuning_core.workloads.flights import lineage_frame, lineage_test

        m = version.manifest
        label = m["label"]
        final.model.save_model(str(folder / "model.ubj"))
        schema = {key: m[key] for key in ("label", "task", "classes", "features", "categories")}
        (folder / "schema.json").write_text(json.dumps(schema))
        full = lineage_frame(cfg, splits)
        test = lineage_test(cfg, splits)
        return ModelSpec(
            code="tabular.py",
            artifacts={"booster": str(folder / "model.ubj"), "schema": str(folder / "schema.json")},
            requirements=("mlflow", "xgboost", "pandas", "numpy"),
            input_example=plain_features(test.drop(columns=[label]).head(5)),
            outputs={"columns": output_columns(m)},
            metadata={"input": "records (a DataFrame, a list of row dicts or {column: values}) with the feature "
                               "columns in 'features' (numbers, or strings for the categories); other columns are "
                               "ignored; one prediction per row", "features": m["features"], "task": m["task"],
                      "classes": m["classes"], "label": label},
            params={**tuning.best_config, "rounds": final.rounds, "source": final.source, "task": m["task"]},
            metrics=lineage_metrics(final),
            train=DatasetSample(f"tabular-{version.version}", version.uri, version.version, frame=full),
            test=DatasetSample(f"tabular-{version.version}-test", version.uri, version.version, frame=test),
        )

    def score(self, model: Predictor, version: DataVersion, test: pd.DataFrame) -> dict[str, float]:
        import numpy as np

        manifest = version.manifest
        label = manifest["label"]
        labels, predicted = [], []
        for part in parts(test):
            out = model.predict(plain_features(part.drop(columns=[label])))
            labels.append(part[label].to_numpy())
            if manifest["task"] == "binary":
                predicted.append(np.asarray(out["probability"]))
            elif manifest["task"] == "multiclass":
                predicted.append(np.column_stack([np.asarray(out[c]) for c, _ in output_columns(manifest)[1:]]))
            else:
                predicted.append(np.asarray(out["prediction"]))
        return evaluate(manifest, np.concatenate(labels), np.concatenate(predicted))

    # ---------------------------------------------------------------- batch scoring
    def rows_to_score(self, source: DataSource, source_fs: pafs.FileSystem,
                      consume: Callable[[pd.DataFrame], None]) -> str:
        from tuning_core.data import tabular

        consume(tabular.read_table(source_fs, source).to_pandas())  # one table, read whole (dtypes of the whole)
        return "tabular"


def evaluate(manifest: dict[str, Any], y: Any, pred: Any) -> dict[str, float]:
    """Test metrics by task: binary (auc, logloss, accuracy, error), multiclass (accuracy, error,
    logloss), regression (rmse, mae, r2)."""
    import numpy as np

    from tuning_core.evaluate import binary_metrics, multiclass_metrics

    if manifest["task"] == "binary":
        return binary_metrics(y, pred)
    if manifest["task"] == "multiclass":
        proba = np.asarray(pred, dtype=float)  # float32 softmax rows sum to 1 only within float32's precision
        return multiclass_metrics(y, proba / proba.sum(axis=1, keepdims=True))
    y, pred = np.asarray(y, dtype=float), np.asarray(pred, dtype=float)
    residual = y - pred
    total = float(((y - y.mean()) ** 2).sum())
    return {"rmse": float(np.sqrt((residual ** 2).mean())), "mae": float(np.abs(residual).mean()),
            "r2": 1.0 - float((residual ** 2).sum()) / total if total else float("nan")}


def _plots(manifest: dict[str, Any], y: Any, tuned: Any, base: Any) -> dict[str, bytes]:
    import numpy as np

    from tuning_core.evaluate import confusion, confusion_png, roc_png

    names = [str(c) for c in manifest["classes"]]
    if manifest["task"] == "binary":
        cm = confusion(y, (np.asarray(tuned) >= 0.5).astype(int), 2)
        return {"confusion_matrix.png": confusion_png(cm, names, "test confusion matrix (tuned)"),
                "roc_curve.png": roc_png(y, {"tuned": tuned, "default": base}, "test ROC")}
    if manifest["task"] == "multiclass":
        cm = confusion(y, np.asarray(tuned).argmax(axis=1), len(names))
        return {"confusion_matrix.png": confusion_png(cm, names, "test confusion matrix (tuned)")}
    return {}


def typed_rows(rows: pd.DataFrame, manifest: dict[str, Any]) -> pd.DataFrame:
    """Raw rows of a prepared split (a data-parallel worker's shard) as ``load_split`` types them."""
    from tuning_core.data.tabular import typed_features

    out = typed_features(rows, manifest)
    label = manifest["label"]
    out[label] = rows[label].astype("float64" if manifest["task"] == "regression" else "int64").to_numpy()
    return out


_MLFLOW_TYPES = {bool: "boolean", int: "long", float: "double", str: "string"}


def output_columns(manifest: dict[str, Any]) -> list[tuple[str, str]]:
    """The served model's output columns and their MLflow types: the predicted class and its probability
    (binary), the class and one probability per class (multiclass), or the prediction (regression)."""
    if manifest["task"] == "regression":
        return [("prediction", "double")]
    kind = _MLFLOW_TYPES.get(type(manifest["classes"][0]), "string")
    if manifest["task"] == "binary":
        return [("label", kind), ("probability", "double")]
    return [("label", kind), *((f"probability_{c}", "double") for c in manifest["classes"])]


WORKLOAD = Tabular()
