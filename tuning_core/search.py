"""Search spaces and search algorithms.

Config entries (``ParamSpec``) map to Ray Tune domains in ``to_domain``; algorithm names
map to lazy constructors in ``SEARCHERS``. Every searcher is seeded, so the same seed
proposes the same configs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from tuning_core.errors import ConfigError
from tuning_core.space import ParamSpec, Scalar

if TYPE_CHECKING:  # config types its `search`/`scheduler` from this module's table: no runtime import back
    from tuning_core.config import TuneConfig


def to_domain(name: str, spec: ParamSpec | Scalar) -> Any:
    """One config entry → a Ray Tune domain (or the constant itself)."""
    from ray import tune

    if not isinstance(spec, ParamSpec):
        return spec
    t = spec.type
    if t == "choice":
        return tune.choice(list(spec.values or []))
    if t == "grid":
        return tune.grid_search(list(spec.values or []))
    if t == "uniform":
        return tune.uniform(spec.low, spec.high)
    if t == "loguniform":
        return tune.loguniform(spec.low, spec.high)
    if t == "quniform":
        return tune.quniform(spec.low, spec.high, spec.q)
    if t == "qloguniform":
        return tune.qloguniform(spec.low, spec.high, spec.q)
    if t == "randint":
        # Ray's randint excludes `high`; the config's bounds are inclusive-exclusive too (documented).
        return tune.randint(int(spec.low), int(spec.high))
    raise ConfigError(f"search space {name}: unknown type {t!r}")


def build_space(space: dict[str, ParamSpec | Scalar], search: str) -> dict[str, Any]:
    """The Ray Tune param_space for ``space``, checked against what ``search`` supports."""
    if not space:
        raise ConfigError("search space: empty, expected at least one parameter")
    if search in ("hyperopt", "optuna"):
        grids = [k for k, v in space.items() if isinstance(v, ParamSpec) and v.type == "grid"]
        if grids:
            raise ConfigError(f"search space: {search} cannot sample grid entries {grids}; use choice or search=grid")
    if search == "grid":
        ranged = [k for k, v in space.items() if isinstance(v, ParamSpec) and v.type not in ("grid", "choice")]
        if ranged:
            raise ConfigError(f"search space: grid search needs grid/choice entries, got ranges for {ranged}")
        space = {k: ParamSpec(type="grid", values=v.values) if isinstance(v, ParamSpec) else v
                 for k, v in space.items()}
    return {k: to_domain(k, v) for k, v in space.items()}


def edge_configs(space: dict[str, ParamSpec | Scalar]) -> list[tuple[str, dict[str, Scalar]]]:
    """Trial configs at the edges of ``space``, each with a few words saying which, for checks
    before Ray starts: every entry at its low end (a range's low, the first choice), every entry
    at its high end, then each further choice/grid value on top of the low ends. A trainable that
    accepts all of these accepts every sampled config of a range (bounds are what trainables check).
    """
    def end(spec: ParamSpec | Scalar, high: bool) -> Scalar:
        if not isinstance(spec, ParamSpec):
            return spec
        if spec.values:
            return spec.values[-1 if high else 0]
        if spec.type == "randint":  # the high end is excluded (Ray's randint)
            return int(spec.high) - 1 if high else int(spec.low)
        return float(spec.high if high else spec.low)

    low = {k: end(v, False) for k, v in space.items()}
    edges = [("every entry at its low end", low), ("every entry at its high end",
                                                  {k: end(v, True) for k, v in space.items()})]
    for k, v in space.items():
        if isinstance(v, ParamSpec) and v.values and len(v.values) > 2:
            edges += [(f"{k}={x!r}", {**low, k: x}) for x in v.values[1:-1]]
    return edges


def _points(cfg: TuneConfig, space: dict[str, Any]) -> list[dict[str, Any]] | None:
    if not cfg.points_to_evaluate:
        return None
    unknown = sorted({k for p in cfg.points_to_evaluate for k in p} - set(space))
    if unknown:
        raise ConfigError(f"points_to_evaluate: keys {unknown} are not in the search space {sorted(space)}")
    # Searchers want every sampled key in each point; constants are filled by Tune itself.
    return [{k: v for k, v in p.items()} for p in cfg.points_to_evaluate]


def _max_concurrent(cfg: TuneConfig) -> int:
    return cfg.max_concurrent_trials or 2


def _random(cfg: TuneConfig, space: dict[str, Any]) -> Any:
    from ray.tune.search import BasicVariantGenerator

    # Ray ignores TuneConfig.max_concurrent_trials for a variant generator: limit it here.
    return BasicVariantGenerator(points_to_evaluate=_points(cfg, space), random_state=cfg.seed,
                                 max_concurrent=cfg.max_concurrent_trials or 0)


_grid = _random  # the same generator: grid_search domains expand into the full grid


def _hyperopt(cfg: TuneConfig, space: dict[str, Any]) -> Any:
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.hyperopt import HyperOptSearch

    # hyperopt's default of 20 random start-up points would leave TPE idle on small budgets.
    n_initial = min(20, max(4, cfg.num_samples // 4))
    searcher = HyperOptSearch(points_to_evaluate=_points(cfg, space), random_state_seed=cfg.seed,
                              n_initial_points=n_initial)
    # TPE learns from finished trials: limiting concurrency trades wall time for better proposals.
    return ConcurrencyLimiter(searcher, max_concurrent=_max_concurrent(cfg))


def _optuna(cfg: TuneConfig, space: dict[str, Any]) -> Any:
    import optuna
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    n_initial = min(20, max(4, cfg.num_samples // 4))
    sampler = optuna.samplers.TPESampler(seed=cfg.seed, n_startup_trials=n_initial)
    searcher = OptunaSearch(points_to_evaluate=_points(cfg, space), sampler=sampler)
    return ConcurrencyLimiter(searcher, max_concurrent=_max_concurrent(cfg))


SEARCHERS: dict[str, Callable[[TuneConfig, dict[str, Any]], Any]] = {
    "random": _random,
    "grid": _grid,
    "hyperopt": _hyperopt,
    "optuna": _optuna,
}


def create_searcher(cfg: TuneConfig, space: dict[str, Any]) -> Any:
    if cfg.search not in SEARCHERS:
        raise ConfigError(f"search: one of {sorted(SEARCHERS)}, got {cfg.search!r}")
    return SEARCHERS[cfg.search](cfg, space)
