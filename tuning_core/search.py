"""Search algorithms: names map to lazy constructors in ``SEARCHERS``. Every searcher is seeded, so
the same seed proposes the same configs. Spaces themselves (``to_domain``, ``build_space``,
``edge_configs``) live in ``tuning_core.space``, re-exported here.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuning_core.errors import ConfigError
from tuning_core.space import ParamSpec, Scalar, build_space, edge_configs, to_domain  # noqa: F401 - re-exported

if TYPE_CHECKING:  # config types its `search`/`scheduler` from this module's table: no runtime import back
    from tuning_core.config import TuneConfig


def _points(cfg: TuneConfig, space: dict[str, Any]) -> list[dict[str, Any]] | None:
    if not cfg.points_to_evaluate:
        return None
    unknown = sorted({k for p in cfg.points_to_evaluate for k in p} - set(space))
    if unknown:
        raise ConfigError(f"points_to_evaluate: keys {unknown} are not in the search space {sorted(space)}")
    # Searchers want every sampled key in each point; constants are filled by Tune itself.
    return [{k: v for k, v in p.items()} for p in cfg.points_to_evaluate]


def _max_concurrent(cfg: TuneConfig) -> int:
    """Proposals a model-based searcher has out at once: ``max_concurrent_trials`` if set, else 2 (TPE
    learns from finished trials), but under HyperBand the whole budget.

    HyperBand fills its brackets in the order trials arrive and halves a bracket among the trials in it;
    a bracket counts as filled only while its trials are alive. Trials let out two at a time refill the
    first bracket, which never halves, as its trials finish: nothing is stopped early (seen: 4 trials,
    cap 2, none stopped; all 4 proposed at once: the poor one stopped at round 1). Proposed at once, the
    trials beyond the CPUs wait as PENDING (as under random search) and TPE proposes them before any
    result: HyperBand's own random configurations, for the first bracket's worth at least.
    """
    if cfg.max_concurrent_trials:
        return cfg.max_concurrent_trials
    return cfg.num_samples if cfg.scheduler == "hyperband" else 2


def _random(cfg: TuneConfig, space: dict[str, Any]) -> Any:
    from ray.tune.search import BasicVariantGenerator

    # Ray ignores TuneConfig.max_concurrent_trials for a variant generator: limit it here.
    return BasicVariantGenerator(points_to_evaluate=_points(cfg, space), random_state=cfg.seed,
                                 max_concurrent=cfg.max_concurrent_trials or 0)


_grid = _random  # the same generator: grid_search domains expand into the full grid


def _import_hyperopt() -> None:
    """Import hyperopt with its ATPE module loaded on first use.

    ``hyperopt/__init__`` imports every algorithm; ATPE's module alone imports ``scipy.stats`` (~1 s
    of a 2-core start-up) though only TPE and random search are used here. Hand-written because
    ``importlib.util.LazyLoader`` loads at once here: the import system reads the module's
    ``__spec__`` when ``hyperopt/__init__`` imports it. So ``hyperopt.atpe`` starts as an empty
    module with the real spec whose module ``__getattr__`` (PEP 562) runs ``atpe.py`` into it the
    first time anything is read from it: ``hyperopt.atpe.suggest`` works as before."""
    import importlib.util
    import sys

    if "hyperopt" in sys.modules:
        return
    package = importlib.util.find_spec("hyperopt")  # finds the package without importing it
    if package is None or not package.submodule_search_locations:
        return
    path = Path(next(iter(package.submodule_search_locations))) / "atpe.py"
    spec = importlib.util.spec_from_file_location("hyperopt.atpe", path)
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)

    def load(name: str) -> Any:
        del module.__dict__["__getattr__"]
        spec.loader.exec_module(module)  # type: ignore[union-attr]
        return getattr(module, name)

    module.__getattr__ = load  # type: ignore[method-assign]
    sys.modules["hyperopt.atpe"] = module
    try:
        import hyperopt
    except BaseException:
        sys.modules.pop("hyperopt.atpe", None)
        raise
    hyperopt.atpe = module  # type: ignore[attr-defined]


def _hyperopt(cfg: TuneConfig, space: dict[str, Any]) -> Any:
    from ray.tune.search import ConcurrencyLimiter

    _import_hyperopt()
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
