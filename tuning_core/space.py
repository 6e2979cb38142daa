"""Search spaces, in one module: the entry type (``ParamSpec``), the workloads' default spaces, the
mapping to Ray Tune domains (``to_domain``, ``build_space``) and the edge configs checked before Ray
starts (``edge_configs``).

It imports nothing else of the project but ``tuning_core.errors``, so ``tuning_core.search``,
``tuning_core.schedulers`` and ``tuning_core.config`` all import it, and config reads the searcher and
scheduler registries to type ``TuneConfig.search``/``scheduler``: one import direction, no cycle.
``tuning_core.config`` and ``tuning_core.search`` re-export these names for older imports.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tuning_core.errors import ConfigError

Scalar = float | int | str | bool

PARAM_TYPES = ("choice", "uniform", "loguniform", "quniform", "qloguniform", "randint", "grid")


class ParamSpec(BaseModel):
    """One entry of a search space; maps to one Ray Tune domain (see ``tuning_core.search``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    type: str = Field(description=f"one of {', '.join(PARAM_TYPES)}")
    low: float | None = None
    high: float | None = None
    q: float | None = None
    values: list[Scalar] | None = None

    @model_validator(mode="after")
    def _check(self) -> ParamSpec:
        t = self.type
        if t not in PARAM_TYPES:
            raise ValueError(f"unknown type {t!r}, expected one of {list(PARAM_TYPES)}")
        if t in ("choice", "grid"):
            if not self.values:
                raise ValueError(f"{t} needs a non-empty 'values' list")
            return self
        if self.low is None or self.high is None:
            raise ValueError(f"{t} needs 'low' and 'high'")
        if self.low >= self.high:
            raise ValueError(f"{t} needs low < high, got low={self.low} high={self.high}")
        if t in ("loguniform", "qloguniform") and self.low <= 0:
            raise ValueError(f"{t} needs low > 0, got low={self.low}")
        if t in ("quniform", "qloguniform") and (self.q is None or self.q <= 0):
            raise ValueError(f"{t} needs q > 0")
        return self


SearchSpace = dict[str, ParamSpec | Scalar]


def _space(**entries: dict[str, Any] | Scalar) -> SearchSpace:
    return {k: ParamSpec(**v) if isinstance(v, dict) else v for k, v in entries.items()}


FLIGHTS_SPACE: SearchSpace = _space(
    max_depth={"type": "randint", "low": 3, "high": 11},
    min_child_weight={"type": "loguniform", "low": 1.0, "high": 64.0},
    subsample={"type": "uniform", "low": 0.5, "high": 1.0},
    colsample_bytree={"type": "uniform", "low": 0.5, "high": 1.0},
    eta={"type": "loguniform", "low": 0.01, "high": 0.4},
    gamma={"type": "uniform", "low": 0.0, "high": 5.0},
    reg_lambda={"type": "loguniform", "low": 0.1, "high": 10.0},
)

FASHION_SPACE: SearchSpace = _space(
    lr={"type": "loguniform", "low": 1e-3, "high": 0.2},
    momentum={"type": "uniform", "low": 0.5, "high": 0.99},
    batch_size={"type": "choice", "values": [32, 64, 128]},
    weight_decay={"type": "loguniform", "low": 1e-6, "high": 1e-3},
    width={"type": "choice", "values": [16, 32, 48]},
    model="cnn",
)


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
