"""Data-parallel XGBoost: each trial (and the final retrain) boosts on N Ray Train workers.

Used when ``tune.resources.workers_per_trial`` > 1 (``workers_per_trial: 1`` keeps
``tuning_core.trainables.xgboost``, which imports nothing of Ray Train). Each worker reads only its
shard of the data version's parquet splits through Ray Data (``distributed.read_parquet_split``, never
the driver's frames), types it exactly as the single-process path does (the workload's ``typed``
function with the version's manifest: categorical columns get the version's whole category set, so
every worker codes a category the same way), and builds its QuantileDMatrix; xgboost's collective,
set up by Ray Train's XGBoost trainer, merges the quantile sketches, the histograms and the evaluation
metrics across workers. Metric names, the reporting cadence and the checkpoint format (``model.ubj``,
written by rank 0) are the single-process trainable's, so schedulers, PBT, resume, the leaderboard and
``retrain: false`` see no difference.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pandas as pd

from tuning_core.trainables.common import CONTROL_KEYS, Cadence
from tuning_core.trainables.distributed import (
    RESTORE_KEY,
    Workers,
    fit_once,
    read_parquet_split,
    report_round,
    restored_folder,
    rss_mb,
    run_in_trial,
    shard_frame,
    world_rank,
)
from tuning_core.trainables.xgboost import (
    LABEL,
    MODEL_FILE,
    _callback,
    import_xgboost,
    quantile_matrix,
    split_xy,
    xgb_params,
)

log = logging.getLogger(__name__)

_SPEC_KEY = "_xgb_shards"  # what the workers need besides the trial config (files, label, task)


@dataclass(frozen=True)
class SplitFiles:
    """Where a data-parallel job reads a data version's splits, and how raw rows become features.

    Attributes:
        fs: the storage filesystem as Ray holds it (without keys on S3: workers have them in their env).
        folder: the version's folder in ``fs`` (``<folder>/<split>.parquet``).
        manifest: the version's manifest (categories, label, task).
        typed: the workload's ``(raw rows, manifest) -> features + label in the training dtypes``, the
            conversion its ``load_split`` applies (a module-level function: workers receive it pickled).
        label: the label column.
    """

    fs: Any
    folder: str
    manifest: dict[str, Any]
    typed: Callable[[pd.DataFrame, dict[str, Any]], pd.DataFrame]
    label: str = LABEL

    def dataset(self, split: str) -> Any:
        return read_parquet_split(self.fs, f"{self.folder.rstrip('/')}/{split}.parquet")


def _model_config(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k not in (RESTORE_KEY, _SPEC_KEY, *CONTROL_KEYS)}


def _shard(name: str, spec: dict[str, Any]) -> pd.DataFrame:
    files: SplitFiles = spec["files"]
    return files.typed(shard_frame(name), files.manifest)


def _trial_loop(config: dict[str, Any]) -> None:
    """On every worker of a trial's Train run: boost on this worker's shards, report on the cadence."""
    xgb = import_xgboost()

    spec = config[_SPEC_KEY]
    label = spec["files"].label
    cadence = Cadence.of(config)
    params = xgb_params(_model_config(config), spec["nthread"], task=spec["task"])
    before = rss_mb()
    train, valid = _shard("train", spec), _shard("valid", spec)
    rows = {"train_rows": len(train), "valid_rows": len(valid), "rss_before_data_mb": round(before, 1)}
    x_train, y_train = split_xy(train, label)
    x_valid, y_valid = split_xy(valid, label)
    dtrain = quantile_matrix(x_train, y_train, params)
    dvalid = xgb.DMatrix(x_valid, label=y_valid, enable_categorical=True)
    del train, valid, x_train, x_valid  # the matrices hold what boosting needs
    booster = None
    with restored_folder(config) as folder:
        if folder is not None:
            booster = xgb.Booster(model_file=str(folder / MODEL_FILE))
    done = booster.num_boosted_rounds() if booster is not None else 0
    if done >= cadence.last:
        return

    def send(metrics: dict[str, Any], iteration: int, cadence_: Cadence, save: Callable) -> bool:
        return report_round(metrics, iteration, cadence_, save, worker=rows)

    xgb.train(params, dtrain, num_boost_round=cadence.last - done, evals=[(dvalid, "valid")], xgb_model=booster,
              verbose_eval=False, callbacks=[_callback(cadence, send)])


def train_xgboost_distributed(config: dict[str, Any], files: SplitFiles, workers: Workers,
                              task: dict[str, Any] | None = None, datasets: dict[str, Any] | None = None) -> None:
    """Ray Tune function trainable: one XGBoost Train run on ``workers`` per trial (see module doc).

    ``files`` and ``workers`` come through ``tune.with_parameters`` (small: paths, the manifest, the
    shape); ``task`` as in ``train_xgboost``; ``datasets``: the train and valid splits the driver read
    once for all trials (``distributed.read_once``), else each trial reads them.
    """
    from ray.train.xgboost import XGBoostTrainer

    spec = {"files": files, "task": task, "nthread": max(1, int(workers.cpu))}
    datasets = datasets or {split: files.dataset(split) for split in ("train", "valid")}
    run_in_trial(XGBoostTrainer, _trial_loop, {**config, _SPEC_KEY: spec}, workers, datasets=datasets)


# ---------------------------------------------------------------------------------------------- retrain
def _fit_loop(config: dict[str, Any]) -> None:
    """On every worker of a retrain: boost each (config, rounds) on this worker's shards of train+valid;
    rank 0 sends the boosters back."""
    xgb = import_xgboost()

    spec = config[_SPEC_KEY]
    label = spec["files"].label
    frames = [_shard(split, spec) for split in ("train", "valid")]
    full = pd.concat(frames, ignore_index=True)
    del frames
    x, y = split_xy(full, label)
    del full
    boosters = []
    for fit_config, rounds in spec["fits"]:
        params = xgb_params(fit_config, spec["nthread"], task=spec["task"])
        boosters.append(bytes(xgb.train(params, quantile_matrix(x, y, params), num_boost_round=max(1, int(rounds)),
                                        verbose_eval=False).save_raw("ubj")))
    if world_rank() == 0:
        spec["outbox"].put({"boosters": boosters, "rows": len(x)})


def fit_boosters(fits: list[tuple[dict[str, Any], int]], files: SplitFiles, workers: Workers,
                 task: dict[str, Any] | None = None) -> list[Any]:
    """Boosters trained on train+valid by one Ray Train run on ``workers``, one per (config, rounds), in
    order: the retrain of the winner and its untuned baseline, each worker on its shard only.

    Runs on the driver of the retrain stage (no Tune session); the boosters come back through a queue
    from rank 0 (a few MB), so nothing but Train's run state is written, to a temporary folder.
    """
    from ray.train.xgboost import XGBoostTrainer

    xgb = import_xgboost()
    spec = {"files": files, "task": task, "nthread": max(1, int(workers.cpu)), "fits": list(fits)}
    out = fit_once(XGBoostTrainer, _fit_loop, _SPEC_KEY, spec, workers,
                   {split: files.dataset(split) for split in ("train", "valid")})
    log.info("retrained %d booster(s) on %d workers (%d rows)", len(out["boosters"]), workers.count, out["rows"])
    return [xgb.Booster(model_file=bytearray(raw)) for raw in out["boosters"]]


def workers_of(resources: Any) -> Workers:
    """The ``Workers`` of a ``tuning_core.config.Resources``."""
    return Workers(resources.workers_per_trial, resources.cpu_per_worker)
