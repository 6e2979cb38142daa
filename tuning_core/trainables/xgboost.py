"""XGBoost trainable for Ray Tune: per-round metrics, checkpoints, resume from checkpoint.

Data arrives through Ray's object store (``tune.with_parameters``), never a closure, and the
DMatrix objects are built once per actor and data version (``common.per_actor``); results and
checkpoints follow the scheduler's cadence (``common.Cadence``).
"""

from __future__ import annotations

import difflib
import json
import logging
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from tuning_core.errors import ConfigError
from tuning_core.trainables.common import Cadence, model_params, per_actor, report, restored_state

log = logging.getLogger(__name__)

LABEL = "delayed"
MODEL_FILE = "model.ubj"
EVAL_METRICS = ["logloss", "error", "auc"]

# Our search-space names → xgboost's (``lambda`` is a Python keyword, awkward in YAML/CLI tooling).
_RENAMES = {"reg_lambda": "lambda", "reg_alpha": "alpha"}
# xgboost's error lines start "[hh:mm:ss] /path/to/param.h:123: "; the message proper follows.
_LOG_PREFIX = re.compile(r"^\[[^]]*\]\s*\S+:\d+:\s*")
DEFAULT_PARAMS: dict[str, Any] = {"objective": "binary:logistic", "tree_method": "hist",
                                  "eval_metric": EVAL_METRICS, "max_cat_to_onehot": 1}


def import_xgboost() -> Any:
    """``import xgboost``, without scikit-learn when nothing has imported it yet.

    xgboost imports scikit-learn only to define its scikit-learn estimators (XGBClassifier, ...),
    which tunepipe never uses; that costs ~1.3 s of the ~1.8 s import, paid by every Ray trial
    worker before its first round and by the CLI before its checks (measured here: 1.8-2.2 s with,
    0.55 s without). Blocking the name for the duration of the import makes xgboost's optional
    import fail fast; scikit-learn stays importable afterwards (tuning_core.evaluate uses it), only
    xgboost's estimator classes are then unavailable in this process.
    """
    import sys

    if "xgboost" not in sys.modules and "sklearn" not in sys.modules:
        sys.modules["sklearn"] = None  # type: ignore[assignment]
        try:
            import xgboost
        finally:
            del sys.modules["sklearn"]
    import xgboost

    return xgboost


def xgb_params(config: dict[str, Any], nthread: int = 1, seed: int = 0, gpu: bool = False,
               task: dict[str, Any] | None = None) -> dict[str, Any]:
    """The booster parameters for a trial config (defaults + the config, integers where xgboost wants them).

    ``gpu``: the trial was granted a GPU, so boost on it (``device="cuda"``) unless the config names a
    device itself (a ``device`` constant in the search space wins). ``task``: the workload's objective,
    evaluation metrics and the like (``objective``, ``eval_metric``, ``num_class``), over the binary
    defaults; the searched config still wins.
    """
    params = {**DEFAULT_PARAMS, **(task or {})}
    if gpu:
        params["device"] = "cuda"
    for k, v in model_params(config).items():
        if k in ("seed", "num_boost_round"):
            continue
        params[_RENAMES.get(k, k)] = v
    for k in ("max_depth", "max_bin"):
        if k in params:
            try:
                params[k] = int(params[k])
            except (TypeError, ValueError):
                raise ConfigError(f"{k}: expected a whole number, got {params[k]!r}") from None
    params["nthread"] = max(1, int(nthread))
    params["seed"] = int(config.get("seed", seed))
    return params


def check_configs(configs: list[tuple[str, dict[str, Any]]]) -> None:
    """Refuse trial configs that xgboost would ignore in part (a misspelt parameter) or reject (a
    value out of bounds), before Ray starts. ``configs``: (where, config) pairs, e.g. the edges of a
    search space (``tuning_core.search.edge_configs``), for the messages.

    xgboost itself is the judge: one round on a four-row matrix per config with
    ``validate_parameters``, which warns about unused names and raises on bad values. A name counts
    as ignored only if no config uses it: ``rate_drop`` is unused by ``booster: gbtree`` but used by
    ``dart``, a legitimate conditional parameter when the space chooses between the two.

    Raises:
        ConfigError: naming the parameter, the value or the closest known name.
    """
    ignored_at: dict[str, str] = {}  # name -> where xgboost first ignored it
    used: set[str] = set()
    known: set[str] = set(_RENAMES)
    for where, config in configs:
        params, unused, keys = _boost_once(config, where)
        known |= keys
        for name in params:
            if name in unused:
                ignored_at.setdefault(name, where)
            else:
                used.add(name)
    ignored = sorted(set(ignored_at) - used)
    if ignored:
        close = {name: difflib.get_close_matches(name, sorted(known), 1) for name in ignored}
        hints = [f"{name!r}" + (f" (did you mean {close[name][0]!r}?)" if close[name] else "") for name in ignored]
        where = ignored_at[ignored[0]]
        raise ConfigError(f"{_prefix(where)}: xgboost would ignore these in every trial (unknown names, or "
                          f"unused by this booster): {', '.join(hints)}")


def check_config(config: dict[str, Any], where: str = "") -> None:
    """``check_configs`` for one config."""
    check_configs([(where, config)])


def _prefix(where: str) -> str:
    return f"search space ({where})" if where else "search space"


def _boost_once(config: dict[str, Any], where: str) -> tuple[dict[str, Any], set[str], set[str]]:
    """Boost one round with ``config``; returns (the booster parameters, the names xgboost did not
    use, every parameter name in xgboost's configuration of that booster)."""
    import numpy as np
    xgb = import_xgboost()

    try:
        params = {**xgb_params(config), "validate_parameters": True}
    except ConfigError as err:  # e.g. max_depth: "deep"
        raise ConfigError(f"{_prefix(where)}: {err}") from None
    params.pop("device", None)  # a GPU named in the space is checked against the resources, not here
    matrix = xgb.DMatrix(np.array([[0.0, 1.0], [1.0, 0.0], [0.0, 0.0], [1.0, 1.0]]), label=[0, 1, 0, 1])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            booster = xgb.train(params, matrix, num_boost_round=1)
        except xgb.core.XGBoostError as err:
            first = _LOG_PREFIX.sub("", str(err).strip().splitlines()[0])
            raise ConfigError(f"{_prefix(where)}: xgboost refuses it: {first}") from None
    unused = {name for w in caught if "are not used" in str(w.message)
              for name in re.findall(r'"([^"]+)"', str(w.message))}
    return params, unused, _config_keys(json.loads(booster.save_config()))


def _config_keys(tree: Any) -> set[str]:
    """Every key of xgboost's JSON configuration: the parameter names it knows."""
    if isinstance(tree, dict):
        return set(tree).union(*(_config_keys(v) for v in tree.values()))
    return set()


def split_xy(df: pd.DataFrame, label: str = LABEL) -> tuple[pd.DataFrame, pd.Series]:
    return df.drop(columns=[label]), df[label]


def quantile_matrix(x: pd.DataFrame, y: pd.Series, params: dict[str, Any]):
    """The training matrix, binned like the booster: xgboost refuses a ``max_bin`` that differs."""
    xgb = import_xgboost()

    return xgb.QuantileDMatrix(x, label=y, enable_categorical=True, max_bin=params.get("max_bin"))


def trial_resources() -> tuple[int, bool]:
    """(CPUs, whether a GPU was granted) of the running trial; (1, False) outside a trial."""
    from ray import tune

    try:
        granted = tune.get_context().get_trial_resources().required_resources
    except Exception:  # noqa: BLE001 - outside a trial (tests, retraining): one thread is a safe default
        return 1, False
    return max(1, int(granted.get("CPU", 1))), granted.get("GPU", 0) > 0


def _callback(cadence: Cadence, send: Callable[..., bool] | None = None):
    """The per-round reporting callback; ``send`` is ``common.report`` in a trial process, or
    ``distributed.report_round`` on the workers of a data-parallel trial."""
    xgb = import_xgboost()

    class TuneReport(xgb.callback.TrainingCallback):
        """Report the validation metrics on the trial's cadence, with every round's values since
        the previous report (``curve``), so the trial's history keeps each round."""

        def __init__(self) -> None:
            self.reported = 0  # entries of evals_log (rounds of this run) covered by earlier reports

        def after_iteration(self, model, epoch, evals_log) -> bool:
            rounds = model.num_boosted_rounds()
            if not cadence.reports(rounds):
                return False
            log_ = evals_log["valid"]
            seen = len(next(iter(log_.values())))
            metrics: dict[str, Any] = {name: float(values[-1]) for name, values in log_.items()}
            metrics["curve"] = {name: [float(v) for v in values[self.reported:seen]] for name, values in log_.items()}
            self.reported = seen

            def save(folder: Path) -> None:
                model.save_model(str(folder / MODEL_FILE))

            # The module's ``report`` looked up now, not bound at definition: tests' fault wrappers swap it.
            (send or report)(metrics, rounds, cadence, save)
            return False

    return TuneReport()


def _matrices(train: pd.DataFrame, valid: pd.DataFrame, params: dict[str, Any], data_key: str | None,
              label: str = LABEL):
    """(dtrain, dvalid) for this trial: built once per actor and data set when ``data_key`` names it."""
    xgb = import_xgboost()

    def build():
        x_train, y_train = split_xy(train, label)
        x_valid, y_valid = split_xy(valid, label)
        dtrain = quantile_matrix(x_train, y_train, params)
        return dtrain, xgb.DMatrix(x_valid, label=y_valid, enable_categorical=True)

    if data_key is None:
        return build()
    return per_actor(("xgboost", data_key, params.get("max_bin")), build)


def train_xgboost(config: dict[str, Any], train: pd.DataFrame, valid: pd.DataFrame,
                  data_key: str | None = None, label: str = LABEL, task: dict[str, Any] | None = None) -> None:
    """Ray Tune function trainable: boost up to ``_max_iterations`` rounds, reporting on ``Cadence``.

    On retry, restore or a PBT exploit, boosting continues from the checkpointed booster
    instead of starting over. ``data_key`` (the data version) lets the actor keep its training
    matrices from one trial to the next. ``label`` and ``task`` (objective and metrics, see
    ``xgb_params``) let every table workload share this trainable; the defaults are the flights'.
    """
    xgb = import_xgboost()

    cadence = Cadence.of(config)
    cpus, gpu = trial_resources()
    params = xgb_params(config, cpus, gpu=gpu, task=task)
    dtrain, dvalid = _matrices(train, valid, params, data_key, label)
    booster = None
    with restored_state() as folder:
        if folder is not None:
            booster = xgb.Booster(model_file=str(folder / MODEL_FILE))
    done = booster.num_boosted_rounds() if booster is not None else 0
    if done >= cadence.last:
        return
    xgb.train(params, dtrain, num_boost_round=cadence.last - done,
              evals=[(dvalid, "valid")], xgb_model=booster, verbose_eval=False,
              callbacks=[_callback(cadence)])


def fit_booster(config: dict[str, Any], train: pd.DataFrame, rounds: int, nthread: int = 2, label: str = LABEL,
                task: dict[str, Any] | None = None):
    """Train a final booster on ``train`` for exactly ``rounds`` rounds (retraining, baselines)."""
    xgb = import_xgboost()

    params = xgb_params(config, nthread, task=task)
    x, y = split_xy(train, label)
    return xgb.train(params, quantile_matrix(x, y, params), num_boost_round=max(1, int(rounds)), verbose_eval=False)


def load_booster(checkpoint_dir: Path):
    xgb = import_xgboost()

    return xgb.Booster(model_file=str(Path(checkpoint_dir) / MODEL_FILE))
