"""Fault injection for tests, as a wrapper around a production trainable (no hook in the trainables).

``failing(train_xgboost, marker)`` is a trainable that raises ``times`` times in all (counted in the
``marker`` file, which every trial and every retry of the run shares), then runs the real trainable:

* at the start of a trial (default): the retry starts the trial again;
* with ``after_checkpoint=True``, right after the trial reported a checkpoint (before its last
  iteration): the retry must resume from that checkpoint. The wrapper swaps the shared
  ``tuning_core.trainables.common.report`` (and the trainable module's own reference to it) for one
  that reports, then raises, for the duration of the trial, in the trial's own process.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


def fail_once(marker: str | Path, times: int = 1) -> None:
    """Raise until the ``marker`` file has counted ``times`` failures (an empty file counts one)."""
    marker = Path(marker)
    done = int(marker.read_text().strip() or 1) if marker.exists() else 0
    if done < times:
        marker.write_text(str(done + 1))
        raise RuntimeError(f"injected trial failure {done + 1}/{times} (marker {marker})")


def failing(trainable: Callable[..., None], marker: str | Path, times: int = 1,
            after_checkpoint: bool = False) -> Callable[..., None]:
    """``trainable`` failing ``times`` times per ``marker``: at start, or after a reported checkpoint."""
    marker = str(marker)

    def run(config: dict[str, Any], **data: Any) -> None:
        if not after_checkpoint:
            fail_once(marker, times)
            return trainable(config, **data)
        from tuning_core.trainables import common

        real = common.report

        def report(metrics: dict[str, Any], iteration: int, cadence: common.Cadence, save: Any) -> bool:
            saved = real(metrics, iteration, cadence, save)
            if saved and iteration < cadence.last:
                fail_once(marker, times)  # the retry resumes from the checkpoint just reported
            return saved

        # Trainables call common.report or import it by name: swap both for this trial.
        modules = [common, *(m for m in [sys.modules.get(trainable.__module__)]
                             if m is not None and getattr(m, "report", None) is real)]
        for m in modules:
            m.report = report
        try:
            return trainable(config, **data)
        finally:
            for m in modules:
                m.report = real

    # Only the name (trial names): functools.wraps would copy __module__/__qualname__ too, and Ray's
    # cloudpickle would then ship the real trainable by reference instead of this wrapper.
    run.__name__ = trainable.__name__
    return run


def train_worker_killer(at_iteration: int) -> tuple[Any, list[int]]:
    """A Tune callback that SIGKILLs one Ray Train worker, once, when a trial reports ``at_iteration``,
    and the list it appends the killed pid to.

    The workers wait in their report until Tune has the result, so the kill lands mid-run. Only this
    process's children are searched (its own Ray): other Ray clusters may run on the machine.
    """
    import os
    import signal

    import psutil
    from ray.tune import Callback

    killed: list[int] = []

    class KillATrainWorker(Callback):
        def on_trial_result(self, iteration, trials, trial, result, **info):
            if killed or result.get("training_iteration") != at_iteration:
                return
            for proc in psutil.Process().children(recursive=True):
                try:
                    cmdline = proc.cmdline()
                except psutil.Error:
                    continue
                if any("RayTrainWorker" in part for part in cmdline):
                    os.kill(proc.pid, signal.SIGKILL)
                    killed.append(proc.pid)
                    return

    return KillATrainWorker(), killed
