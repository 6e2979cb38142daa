"""The one reporting/checkpointing/restore mechanism shared by every trainable.

A trainable calls ``restored_state`` once at start (a folder with the last checkpoint, or
None), builds a ``Cadence`` from its config and calls ``report`` after every iteration.
``report`` sends a result to Ray Tune only where somebody reads it: at the scheduler's decision
points (ASHA's rungs, PBT's perturbation interval), every ``checkpoint_every`` iterations and at
the last one (see ``tuning_core.schedulers.decision_points``). Each result is a synchronous round
trip to the driver, so a 100-round XGBoost trial reporting every round spent more time waiting
for the driver than boosting (measured in ``benchmarks/peer.py``). Checkpoints go with the
reports at decision points (rung boundaries: where a trial may be stopped or cloned), on the
``checkpoint_every`` cadence and at the end, written by the trainable's own ``save(folder)``.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Keys of the trial config that steer the trial itself rather than the model.
CONTROL_KEYS = ("_checkpoint_every", "_max_iterations", "_report_at")


def model_params(config: dict[str, Any]) -> dict[str, Any]:
    """The trial config without control keys."""
    return {k: v for k, v in config.items() if k not in CONTROL_KEYS}


@dataclass(frozen=True)
class Cadence:
    """When a trial reports and checkpoints.

    Attributes:
        last: the iteration budget (``_max_iterations``).
        every: checkpoint (and so report) at least every this many iterations.
        points: the scheduler's decision points, or None when it reads every iteration
            (HyperBand, the median rule, a stop threshold).
    """

    last: int
    every: int
    points: frozenset[int] | None

    @classmethod
    def of(cls, config: dict[str, Any], default_every: int = 10) -> Cadence:
        at = config.get("_report_at", "every")  # trainables run without the runner report every iteration
        points = None if at == "every" else frozenset(int(p) for p in str(at).split(",") if p.strip())
        return cls(last=int(config.get("_max_iterations", 100)),
                   every=max(1, int(config.get("_checkpoint_every", default_every))), points=points)

    def reports(self, iteration: int) -> bool:
        return self.points is None or self.checkpoints(iteration)

    def checkpoints(self, iteration: int) -> bool:
        return (iteration % self.every == 0 or iteration >= self.last
                or (self.points is not None and iteration in self.points))


@contextlib.contextmanager
def restored_state() -> Iterator[Path | None]:
    """Yield the folder of the checkpoint this trial resumes from (retry, restore, PBT), or None."""
    from ray import tune

    ckpt = tune.get_checkpoint()
    if ckpt is None:
        yield None
        return
    with ckpt.as_directory() as folder:
        yield Path(folder)


_NODE_ID: list[str] = []


def _node_id() -> str:
    if not _NODE_ID:
        import ray

        _NODE_ID.append(ray.get_runtime_context().get_node_id())
    return _NODE_ID[0]


def report(metrics: dict[str, Any], iteration: int, cadence: Cadence, save: Callable[[Path], None]) -> bool:
    """Report ``metrics`` for ``iteration`` (1-based) if ``cadence`` says so, with a checkpoint
    where it says so; returns whether a checkpoint was written.

    ``training_iteration`` is the trainable's own count (rounds, epochs), not Ray's count of
    reports, so schedulers, stoppers and histories see the same numbers whatever the cadence.
    The Ray node id goes along as ``node_id``: Ray's own ``node_ip`` cannot tell apart nodes that
    share an address (several nodes on one machine, or containers behind one host IP).
    """
    from ray import tune

    if not cadence.reports(iteration):
        return False
    metrics = {**metrics, "training_iteration": iteration, "node_id": _node_id()}
    if cadence.checkpoints(iteration):
        with tempfile.TemporaryDirectory() as tmp:
            save(Path(tmp))
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))
        return True
    tune.report(metrics)
    return False


# One entry per process: the matrices/tensors built from the last data set a trial of this actor
# saw. With ``reuse_actors`` every trial of an actor trains on the same splits, so building them
# once per actor instead of once per trial saves a QuantileDMatrix build (~0.3 s on 229k flights)
# per trial. One entry, so a worker that moves on to another data set does not keep the old one.
_CACHE: dict[Any, Any] = {}


def per_actor(key: Any, build: Callable[[], Any]) -> Any:
    """``build()``, or what it returned before in this process for the same ``key``."""
    if key not in _CACHE:
        _CACHE.clear()
        _CACHE[key] = build()
    return _CACHE[key]
