"""Watch the local Ray node that a session started: if its raylet or GCS dies, fail the stage, retryably.

Left alone, a dead local node leaves a driver hanging for good ("Cluster resources not detected or
are 0", when the raylet followed its killed dashboard agent) or killed by Ray ~20 s later with no
one-line error, the flow run never marked failed. The OOM killer picks such big processes. Here a
thread polls the node's processes and interrupts the session's thread, so that the stage fails
with a retryable ``ServiceUnavailable``: the stage retry starts a fresh local Ray and the runner
resumes the experiment from its saved state.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator

from tuning_core.errors import ServiceUnavailable

log = logging.getLogger(__name__)

# The processes of a local node whose death ends it (the raylet also dies with its dashboard agent).
VITAL = ("raylet", "gcs_server")


class NodeLost(BaseException):
    """Raised asynchronously in the session's thread; a BaseException, so that no ``except Exception``
    inside Ray Tune on the way out takes it for a trial's error."""


def _interrupt(thread_id: int, exc: type[BaseException] | None) -> None:
    """Raise ``exc`` in that thread at its next Python instruction (None: cancel a pending one), as
    Prefect's own task timeouts do off the main thread."""
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), ctypes.py_object(exc) if exc else None)


def _in_tune_loop(thread_id: int) -> bool:
    """Whether that thread is in Ray Tune's driver loop and not importing a module: where an interrupt is
    safe. One landing elsewhere could leave half-imported modules behind (matplotlib did) for the retry."""
    frame = sys._current_frames().get(thread_id)  # noqa: SLF001 - the only view of another thread's stack
    in_tune = False
    while frame is not None:
        name = frame.f_code.co_filename
        if "importlib" in name:
            return False
        in_tune = in_tune or f"{os.sep}ray{os.sep}tune{os.sep}" in name
        frame = frame.f_back
    return in_tune


def _describe(returncode: int) -> str:
    if returncode < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-returncode).name}"
    return f"exited with status {returncode}"


@contextlib.contextmanager
def watch_local_node(interval_s: float = 1.0) -> Iterator[None]:
    """Around the work on a local Ray that this process started (``ray_session``): when one of its
    vital processes exits, the block ends with a one-line, retryable ``ServiceUnavailable``."""
    import ray

    node = ray._private.worker._global_node  # noqa: SLF001 - the only handle on the processes ray.init started
    procs = {name: info.process for name in VITAL for info in (node.all_processes.get(name) or [])
             if info.process is not None} if node is not None else {}
    target, stop, dead = threading.get_ident(), threading.Event(), {}

    def watch() -> None:
        while not stop.wait(interval_s):
            gone = {name: p.returncode for name, p in procs.items() if p.poll() is not None}
            if gone:
                if not dead:
                    log.warning("local Ray node lost: %s", ", ".join(f"{n} {_describe(c)}" for n, c in gone.items()))
                dead.update(gone)
                if _in_tune_loop(target):  # again each interval until the session's thread is out
                    _interrupt(target, NodeLost)

    def quiet() -> None:
        """Stop the watcher and cancel an interrupt it sent that has not fired yet (one may fire here)."""
        while True:
            try:
                stop.set()
                watcher.join()
                _interrupt(target, None)
                return
            except NodeLost:
                continue

    def lost() -> ServiceUnavailable:
        what = ", ".join(f"its {n} {_describe(c)}" for n, c in sorted(dead.items()))
        return ServiceUnavailable(f"the local Ray node died during tuning ({what}; out of memory?); the stage "
                                  "retries with a fresh local Ray and resumes the experiment")

    # In the caller's context: its warning goes to the flow run's log, as the stage's own lines do.
    watcher = threading.Thread(target=contextvars.copy_context().run, args=(watch,), name="tunepipe-ray-watchdog",
                               daemon=True)
    watcher.start()
    try:
        yield
    except BaseException as err:
        if not dead:
            raise
        quiet()
        raise lost() from err
    finally:
        quiet()
    if dead:  # the work ended while the node died: its results may be partial, the retry resumes them
        raise lost()
