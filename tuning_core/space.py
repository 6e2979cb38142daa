"""One search-space entry as typed config (``ParamSpec``).

Its own module so that ``tuning_core.search`` and ``tuning_core.schedulers`` can use it without
importing ``tuning_core.config``, which reads their registries (``SEARCHERS``, ``SCHEDULERS``) to type
``TuneConfig.search`` and ``TuneConfig.scheduler``: one import direction, no cycle.
``tuning_core.config`` re-exports everything here.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

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
