"""The search as people look at it: a parallel-coordinates plot of the trials.

One vertical axis per searched parameter and one for the trials' best metric; each trial is a
line across them, coloured by its metric, the winner drawn on top in red. It is the view that
TensorBoard's HParams dashboard gives, as a PNG that MLflow shows beside the leaderboard.

Which keys were searched, and how, is read from the trials themselves (the runner's result holds
configs, not the space): a key is searched if its values differ between trials; a key with any
non-numeric value is categorical (values in order of first appearance, evenly spaced); a positive
numeric key spanning two decades or more gets a log axis (a loguniform range sampled over its width).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from tuning_core.results import TuningResult

# A positive parameter whose largest sampled value is this many times its smallest is drawn on a log axis.
LOG_RATIO = 100.0


@dataclass(frozen=True)
class Axis:
    """One vertical axis: where each trial sits on it (0 bottom .. 1 top) and what to write along it."""

    name: str
    positions: list[float]  # per trial, NaN where the trial has no value
    ticks: list[tuple[float, str]]  # (position, label)
    scale: str  # "linear", "log", "categorical" or "metric"


def _fmt(v: float) -> str:
    return f"{v:.3g}"


def _is_scalar(v: Any) -> bool:
    return isinstance(v, (int, float, str, bool)) and not (isinstance(v, float) and math.isnan(v))


def _searched_keys(configs: list[dict[str, Any]]) -> list[str]:
    keys: list[str] = []
    for c in configs:
        keys += [k for k, v in c.items() if k not in keys and _is_scalar(v)]
    varying = [k for k in keys if len({repr(c.get(k)) for c in configs}) > 1]
    return varying or keys  # one trial (or nothing varied): show what it ran with


def _param_axis(name: str, values: list[Any]) -> Axis:
    present = [v for v in values if _is_scalar(v)]
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present)
    if not numeric:
        cats = list(dict.fromkeys(repr(v) if not isinstance(v, str) else v for v in present))
        step = 1 / (len(cats) - 1) if len(cats) > 1 else 0.0
        where = {c: (i * step if len(cats) > 1 else 0.5) for i, c in enumerate(cats)}
        pos = [where[repr(v) if not isinstance(v, str) else v] if _is_scalar(v) else math.nan for v in values]
        return Axis(name, pos, [(where[c], c) for c in cats], "categorical")
    lo, hi = min(present), max(present)
    log = lo > 0 and hi / lo >= LOG_RATIO
    f = math.log10 if log else float
    span = f(hi) - f(lo)
    pos = [((f(v) - f(lo)) / span if span else 0.5) if _is_scalar(v) else math.nan for v in values]
    ticks = [(0.0, _fmt(lo)), (1.0, _fmt(hi))] if span else [(0.5, _fmt(lo))]
    return Axis(name, pos, ticks, "log" if log else "linear")


def parallel_axes(result: TuningResult) -> list[Axis]:
    """The plot's axes, trials in ``result.trials`` order: searched parameters, then the best metric."""
    configs = [t.config for t in result.trials]
    axes = [_param_axis(k, [c.get(k) for c in configs]) for k in _searched_keys(configs)]
    scores = [t.best_metric if t.best_metric is not None else math.nan for t in result.trials]
    finite = [s for s in scores if not math.isnan(s)]
    lo, hi = (min(finite), max(finite)) if finite else (0.0, 0.0)
    span = hi - lo
    # The better end on top whichever the mode, so the winner's line always ends highest.
    flip = result.mode == "min"
    pos = [math.nan if math.isnan(s) else (0.5 if not span else ((hi - s) if flip else (s - lo)) / span)
           for s in scores]
    ticks = [(0.5, _fmt(lo))] if not span else [(0.0, _fmt(hi if flip else lo)), (1.0, _fmt(lo if flip else hi))]
    axes.append(Axis(f"best {result.metric}", pos, ticks, "metric"))
    return axes


def draw_parallel_coordinates(result: TuningResult) -> Any:
    """A matplotlib Figure (no pyplot: no global backend state) with one line per trial."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    axes = parallel_axes(result)
    n = len(axes)
    fig = Figure(figsize=(max(6.0, 1.3 * n + 2), 4.5))
    ax = fig.add_subplot()
    xs = np.arange(n)
    metric = axes[-1].positions
    cmap = colormaps["viridis"]
    best = next(i for i, t in enumerate(result.trials) if t.trial_id == result.best_trial_id)
    for i in range(len(result.trials)):
        if i == best:
            continue
        ys = np.array([a.positions[i] for a in axes], dtype=float)
        if math.isnan(metric[i]):  # a trial that never reported the metric
            ax.plot(xs, ys, color="0.75", lw=0.8, ls="--", zorder=1)
        else:
            ax.plot(xs, ys, color=cmap(metric[i]), lw=1.0, alpha=0.8, zorder=2)
    ys = np.array([a.positions[best] for a in axes], dtype=float)
    ax.plot(xs, ys, color="crimson", lw=2.8, zorder=3, label=f"best: {result.best_trial_id}")
    ax.vlines(xs, 0, 1, colors="0.3", lw=0.8, zorder=0)
    for x, a in zip(xs, axes, strict=True):
        for y, label in a.ticks:
            ax.annotate(label, (x, y), xytext=(4, 0), textcoords="offset points", fontsize=7, va="center")
    ax.set_xticks(xs, [a.name + (" (log)" if a.scale == "log" else "") for a in axes], rotation=20, fontsize=8,
                  ha="right")
    ax.set_yticks([])
    ax.set_xlim(-0.2, n - 0.5)
    ax.set_ylim(-0.05, 1.05)
    for side in ("left", "right", "top"):
        ax.spines[side].set_visible(False)
    ax.set_title(f"{result.experiment_name}: {result.num_trials} trials, {result.search} + {result.scheduler}",
                 fontsize=9)
    ax.legend(loc="upper left", bbox_to_anchor=(0, -0.25), fontsize=8, frameon=False)
    fig.tight_layout()
    return fig


def parallel_coordinates_png(result: TuningResult) -> bytes:
    """``draw_parallel_coordinates`` as PNG bytes."""
    buf = io.BytesIO()
    draw_parallel_coordinates(result).savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()
