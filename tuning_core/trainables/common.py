"""The one reporting/checkpointing/restore mechanism shared by every trainable.

A trainable calls ``restored_state`` once at start (a folder with the last checkpoint, or
None) and ``report`` after every iteration; ``report`` attaches a checkpoint every
``checkpoint_every`` iterations and at the last one, written by the trainable's own
``save(folder)`` callback.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

# Keys of the trial config that steer the trial itself rather than the model.
CONTROL_KEYS = ("_fail_once_marker", "_fail_times", "_fail_after_checkpoint", "_checkpoint_every", "_max_iterations")


def model_params(config: dict[str, Any]) -> dict[str, Any]:
    """The trial config without control keys."""
    return {k: v for k, v in config.items() if k not in CONTROL_KEYS}


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


def maybe_fail_once(config: dict[str, Any]) -> None:
    """Fault injection for tests: raise ``_fail_times`` times (default once) per marker file.

    Enabled only when the config carries ``_fail_once_marker`` (a path). The file counts the
    failures so far (an empty file counts one); once it reaches ``_fail_times``, attempts carry on.
    Every trial naming the same file shares the count.
    """
    marker = config.get("_fail_once_marker")
    if not marker:
        return
    times = int(config.get("_fail_times", 1))
    done = int(Path(marker).read_text().strip() or 1) if os.path.exists(marker) else 0
    if done < times:
        Path(marker).write_text(str(done + 1))
        raise RuntimeError(f"injected trial failure {done + 1}/{times} (marker {marker})")


def report(
    metrics: dict[str, float],
    iteration: int,
    last_iteration: int,
    checkpoint_every: int,
    save: Callable[[Path], None],
) -> None:
    """Report ``metrics`` for ``iteration`` (1-based); checkpoint on cadence and at the end.

    The Ray node id goes along as ``node_id``: Ray's own ``node_ip`` cannot tell apart nodes that
    share an address (several nodes on one machine, or containers behind one host IP).
    """
    import ray
    from ray import tune

    metrics = {**metrics, "node_id": ray.get_runtime_context().get_node_id()}
    if iteration % checkpoint_every == 0 or iteration >= last_iteration:
        with tempfile.TemporaryDirectory() as tmp:
            save(Path(tmp))
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))
    else:
        tune.report(metrics)
