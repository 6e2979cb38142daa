"""The workload protocol: everything the shared DAG, the CLI and the Prefect form need from a workload.

A workload is one module under ``tuning_core/workloads/`` holding one ``Workload`` subclass: its config
model, default search space, what its trials report, how its data is checked, prepared and loaded,
its trainable and that trainable's check of configs, how the winner is retrained and evaluated, and
what the registered model is (``ModelSpec``: plain files and data; infra logs it to MLflow, since the
core imports no mlflow). ``tuning_core.workloads.WORKLOADS`` maps names to them; tasks/ and flows/
only ever go through that table.

Heavy imports (a reader, a framework) happen inside the methods, so that registering every workload
costs nothing and a run of one never loads another's modules.
"""

from __future__ import annotations

import importlib.util
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from pydantic import BaseModel

from tuning_core.config import RegistryConfig, RetrainConfig, TuneConfig
from tuning_core.errors import ConfigError
from tuning_core.results import DataVersion, TuningResult
from tuning_core.sources import DataSource
from tuning_core.space import SearchSpace

if TYPE_CHECKING:  # the table of workloads imports no pandas, pyarrow or trainer (the CLI starts faster)
    import numpy as np
    import pandas as pd
    import pyarrow.fs as pafs

    from tuning_core.retrain import FinalModel


class PipelineConfig(Protocol):
    """What every workload's config model has (its ``data`` section is its own)."""

    workload: str
    data: Any
    tune: TuneConfig
    retrain: RetrainConfig
    registry: RegistryConfig
    run_id: str | None
    warm_start_from_champion: bool

    def model_copy(self, *, update: dict[str, Any] | None = None, deep: bool = False) -> Any: ...


@dataclass(frozen=True)
class CliOption:
    """A workload's own command-line shortcut for one config field (``--max-rows`` → ``data.max_rows``).

    Attributes:
        flag: the option, e.g. "--max-rows".
        field: the dotted config path it sets, e.g. "data.max_rows".
        type: int, float or str.
        help: the help line.
        shown_default: what ``--help`` shows as the default.
        choices: allowed values (shown as ``[a|b]``; the config refuses others).
        commands: which commands offer it ("run", "prepare").
    """

    flag: str
    field: str
    type: type
    help: str
    shown_default: str | None = None
    choices: tuple[str, ...] | None = None
    commands: tuple[str, ...] = ("run", "prepare")

    @property
    def param(self) -> str:
        return self.flag.removeprefix("--").replace("-", "_")


@dataclass
class DatasetSample:
    """A dataset a model was trained or tested on, as MLflow's lineage records it: rows of a frame, or
    arrays ``x``/``y`` (a sample may stand for the whole set; ``digest`` names the whole)."""

    name: str
    source: str
    digest: str
    frame: pd.DataFrame | None = None
    x: np.ndarray | None = None
    y: np.ndarray | None = None


@dataclass
class ModelSpec:
    """The registered model as plain data (MLflow "models from code"); ``infra.models`` turns it into
    MLflow's objects and ``infra.tracking`` logs it.

    Attributes:
        code: file name under ``infra/model_code`` that serves the model (the only code it runs).
        artifacts: artifact name → a local file the workload wrote (booster, categories, program, ...).
        requirements: distributions the model needs, pinned to this process's versions when logged.
        input_example: what a consumer sends (rows as plain strings and numbers, or an array).
        outputs: the signature's outputs: ``{"columns": [(name, mlflow type name), ...]}`` or
            ``{"tensor": (numpy dtype name, shape)}``. Inputs are checked by the model code itself.
        metadata: shown on the model page (``mlflow.models.get_model_info(uri).metadata``).
        model_config: the model code's ``context.model_config``.
        params / metrics: the lineage's parameters and the test metrics, linked to the logged model.
        train / test: the datasets, for the lineage.
    """

    code: str
    artifacts: dict[str, str]
    requirements: tuple[str, ...]
    input_example: Any
    outputs: dict[str, Any]
    metadata: dict[str, Any] = field(default_factory=dict)
    model_config: dict[str, Any] | None = None
    params: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    train: DatasetSample | None = None
    test: DatasetSample | None = None


# Rows per part where a split is read in parts (``Workload.load_parts``): the test split, which the
# evaluation of a data-parallel run's model and the champion's re-evaluation read part by part.
PART_ROWS = 262_144


def parts(split: Any) -> Iterable[Any]:
    """A split given whole (a frame, an array, an (images, labels) pair) as one part; parts as they are."""
    return [split] if isinstance(split, tuple) or hasattr(split, "shape") else split


def first_rows(split: Any, rows: int) -> Any:
    """The first ``rows`` rows of a loaded split: a frame or array, or a tuple of them (images, labels)."""
    if isinstance(split, tuple):
        return tuple(part[:rows] for part in split)
    return split[:rows]


class Splits(Mapping[str, Any]):
    """A data version's splits by name, each loaded on first use (``load(name)``) and kept.

    A data-parallel trial or retrain (``tune.resources.workers_per_trial`` > 1) has its workers read
    their shards from storage and never asks for the whole frames here. ``fs`` is the filesystem of the
    version's folder as Ray may hold it (without keys on S3; None where no Ray stage needs it).
    """

    def __init__(self, load: Callable[[str], Any], names: tuple[str, ...], fs: Any = None,
                 head: Callable[[str, int], Any] | None = None,
                 in_parts: Callable[[str, int], Iterable[Any]] | None = None) -> None:
        self._load, self._names, self.fs, self._head, self._in_parts = load, tuple(names), fs, head, in_parts
        self._loaded: dict[str, Any] = {}

    def parts(self, name: str, rows: int = PART_ROWS) -> Iterable[Any]:
        """Split ``name`` in parts of at most ``rows`` rows, read one after another where the loader can
        (``Workload.load_parts``: the driver never holds the whole split); the split itself, as one
        part, if it is loaded already."""
        if name in self._loaded or self._in_parts is None:
            return [self[name]]
        if name not in self._names:
            raise KeyError(name)
        return self._in_parts(name, rows)

    def head(self, name: str, rows: int) -> Any:
        """The first ``rows`` rows of split ``name``, without loading the rest where the loader can
        (``Workload.load_head``); cut from the split if it is loaded already."""
        if name in self._loaded or self._head is None:
            return first_rows(self[name], rows)
        if name not in self._names:
            raise KeyError(name)
        return self._head(name, rows)

    def __getitem__(self, name: str) -> Any:
        if name not in self._names:
            raise KeyError(name)
        if name not in self._loaded:
            self._loaded[name] = self._load(name)
        return self._loaded[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


class Predictor(Protocol):
    """A loaded registered model (an MLflow pyfunc), as the champion's re-evaluation uses it."""

    def predict(self, data: Any) -> Any: ...


class Workload(ABC):
    """One workload behind the shared DAG. Subclasses set the class attributes and the methods."""

    name: ClassVar[str]
    config_model: ClassVar[type[BaseModel]]
    default_space: ClassVar[SearchSpace]
    trial_metrics: ClassVar[tuple[str, ...]]
    evaluated_metrics: ClassVar[tuple[str, ...]]  # on the test split (``tuning_core.evaluate``)
    title: ClassVar[str]  # one line for flows, --help and the Prefect UI
    data_help: ClassVar[str]  # the --data help
    cli_options: ClassVar[tuple[CliOption, ...]] = ()
    # Optional extras: (module, the one-line error when it is missing).
    requires: ClassVar[tuple[tuple[str, str], ...]] = ()
    # Modules the workers of the embedded default's local Ray import as they start, ahead of the
    # trials (``infra.ray_cluster._local_init_args``): the trainable's heavy libraries.
    worker_preload: ClassVar[tuple[str, ...]] = ()

    # ---------------------------------------------------------------- config
    def space(self, cfg: PipelineConfig) -> SearchSpace:
        return cfg.tune.space or self.default_space

    def reported_metrics(self, cfg: PipelineConfig) -> tuple[str, ...]:
        """What the trainable reports per iteration (``tune.metric`` must be one of them)."""
        return self.trial_metrics

    def test_metrics(self, cfg: PipelineConfig) -> tuple[str, ...]:
        """What the evaluation on the test split returns (``registry.metric`` must be one of them)."""
        return self.evaluated_metrics

    def resolve(self, cfg: PipelineConfig, source: DataSource, source_fs: pafs.FileSystem) -> PipelineConfig:
        """The config with what depends on the data filled in (e.g. a task detected from the label and
        the metrics that go with it); called in the pre-run checks, before anything is written. The
        result resolves to itself."""
        return cfg

    def check_installed(self) -> None:
        """Refuse in one line when an optional extra this workload needs is not installed."""
        for module, message in self.requires:
            if importlib.util.find_spec(module) is None:
                raise ConfigError(message)

    @abstractmethod
    def check_configs(self, configs: list[tuple[str, dict[str, Any]]]) -> None:
        """The trainable's own check of trial configs ((where, config) pairs): raise ConfigError."""

    # ---------------------------------------------------------------- data
    @abstractmethod
    def data_source(self, cfg: PipelineConfig) -> DataSource:
        """The config's data source, parsed (``DataSource.parse``)."""

    @abstractmethod
    def check_data(self, cfg: PipelineConfig, source: DataSource, source_fs: pafs.FileSystem) -> None:
        """Cheap checks of the source (paths, archives, headers) before anything starts or is written."""

    @abstractmethod
    def prepare(self, cfg: PipelineConfig, source: DataSource, source_fs: pafs.FileSystem, fs: pafs.FileSystem,
                root: str, ray_fs: pafs.FileSystem | None = None) -> DataVersion:
        """Read, validate, split and store the data as a content-addressed version under ``root``.

        ``ray_fs``: what Ray tasks read the source with, where ``prepares_on_ray``: the caller's
        filesystem without keys when the workers hold them (None: ``source_fs``)."""

    def prepares_on_ray(self, cfg: PipelineConfig, source: DataSource, source_fs: pafs.FileSystem) -> bool:
        """Whether ``prepare`` reads the source with Ray tasks (then the caller connects Ray first,
        with the storage keys in the workers' environment). Default: it reads in this process."""
        return False

    @abstractmethod
    def load_split(self, fs: pafs.FileSystem, version: DataVersion, split: str) -> Any:
        """One split ("train", "valid", "test") of a prepared version, as the trainable takes it."""

    def load_head(self, fs: pafs.FileSystem, version: DataVersion, split: str, rows: int) -> Any:
        """The first ``rows`` rows of a split, typed as ``load_split`` types them: what a data-parallel
        run's driver reads where it needs a sample (the model's schema, input example, lineage record)
        while the split itself stays with the workers. Default: the whole split, cut."""
        return first_rows(self.load_split(fs, version, split), rows)

    def load_parts(self, fs: pafs.FileSystem, version: DataVersion, split: str, rows: int) -> Iterable[Any]:
        """A split in parts of at most ``rows`` rows, each typed as ``load_split`` types the split, read
        one after another: what a data-parallel run's evaluation and the champion's re-evaluation read.
        Default: the whole split as one part (a workload whose splits stay small)."""
        return [self.load_split(fs, version, split)]

    def describe_version(self, version: DataVersion) -> dict[str, Any]:
        """Extra facts ``tunepipe prepare`` prints about a version."""
        return {}

    # ---------------------------------------------------------------- tune
    @abstractmethod
    def trainable(self, cfg: PipelineConfig) -> Callable[..., None]:
        """The Ray Tune function trainable: ``(config, train, valid, data_key, **tune_data extras)``."""

    def tune_data(self, cfg: PipelineConfig, version: DataVersion, splits: dict[str, Any]) -> dict[str, Any]:
        """What each trial receives through Ray's object store besides its config."""
        return {"train": splits["train"], "valid": splits["valid"], "data_key": version.version}

    # ---------------------------------------------------------------- retrain, evaluate, register
    @abstractmethod
    def retrain(self, cfg: PipelineConfig, version: DataVersion, tuning: TuningResult, splits: dict[str, Any],
                checkpoint_dir: Path | None) -> FinalModel:
        """Retrain the winner on train+valid (or take its checkpoint); evaluate it and an untuned default
        on the test split."""

    @abstractmethod
    def model_spec(self, cfg: PipelineConfig, version: DataVersion, tuning: TuningResult, final: FinalModel,
                   splits: dict[str, Any], folder: Path) -> ModelSpec:
        """What to register: model files written into ``folder``, signature, example, lineage."""

    @abstractmethod
    def score(self, model: Predictor, version: DataVersion, test: Any) -> dict[str, float]:
        """Test metrics of a registered model, through the path every consumer takes (its ``predict``).
        ``test``: the split, whole or in parts (``load_parts``; see ``parts``)."""

    # ---------------------------------------------------------------- batch scoring
    def rows_to_score(self, source: DataSource, source_fs: pafs.FileSystem,
                      consume: Callable[[pd.DataFrame], None]) -> str:
        """Hand ``consume`` the rows of ``source`` to score, as a consumer would send them, a part at a time
        (whatever the workload can read without holding the rest: one file's rows, or the whole table);
        returns the detected schema name. Raises before returning when the source as a whole cannot be
        scored (too many malformed rows): callers keep what they were handed aside until then."""
        raise ConfigError(f"batch scoring: the {self.name} workload does not score tables of rows")

    def scored(self, rows: pd.DataFrame, predictions: Any) -> tuple[pd.DataFrame, dict[str, Any]]:
        """The rows with their predictions as columns, and summary figures for the report."""
        import numpy as np
        import pandas as pd

        out = rows.copy()
        preds = predictions if isinstance(predictions, pd.DataFrame) else pd.DataFrame({"prediction": predictions})
        for column in preds.columns:
            out[column] = np.asarray(preds[column])
        return out, {}


def lineage_metrics(final: FinalModel) -> dict[str, float]:
    """The retrained model's test metrics, the untuned default's on the same rows, and the uplift."""
    return {**{f"test_{k}": v for k, v in final.test_metrics.items()},
            **{f"baseline_test_{k}": v for k, v in final.baseline_test_metrics.items()},
            **{f"uplift_{k}": v for k, v in final.uplift.items()}}


def plain_features(df: pd.DataFrame) -> pd.DataFrame:
    """Features as a registry consumer sends them: strings and 64-bit numbers.

    The models take the training dtypes too, but scoring what consumers send keeps the champion's
    re-evaluation on the path every consumer takes (see infra.models).
    """
    import pandas as pd

    out = df.copy()
    for c in out.columns:
        if isinstance(out[c].dtype, pd.CategoricalDtype):
            out[c] = out[c].astype(str)
        elif pd.api.types.is_integer_dtype(out[c].dtype):
            out[c] = out[c].astype("int64")
        elif pd.api.types.is_float_dtype(out[c].dtype):
            out[c] = out[c].astype("float64")
    # Plain labels too: MLflow compares an example's columns with range(n) when saving it, which
    # pandas 3 deprecates for its string-dtype column index (a Pandas4Warning on every model logged).
    out.columns = pd.Index(list(out.columns), dtype=object)
    return out
