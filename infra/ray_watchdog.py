"""Watch the Ray a session works on: if the local node it started dies (its raylet or GCS), fail the
stage retryably; if the head of a cluster joined through RAY_ADDRESS goes away, fail it with one line.

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
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator

from tuning_core.errors import ClusterLost, ServiceUnavailable, TunepipeError

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

    def probe() -> str | None:
        gone = {name: p.returncode for name, p in procs.items() if p.poll() is not None}
        return ", ".join(f"its {n} {_describe(c)}" for n, c in sorted(gone.items())) or None

    def lost(what: str) -> TunepipeError:
        return ServiceUnavailable(f"the local Ray node died during tuning ({what}; out of memory?); the stage "
                                  "retries with a fresh local Ray and resumes the experiment")

    with _watch(probe, lost, interval_s):
        yield


@contextlib.contextmanager
def watch_joined_cluster(gcs_address: str, address: str | None = None, interval_s: float = 1.0,
                         grace_s: float = 5.0) -> Iterator[None]:
    """Around the work on a cluster joined through RAY_ADDRESS: when its GCS (the head node) refuses
    connections for ``grace_s``, the block ends with a one-line ``ClusterLost`` naming ``address``
    (RAY_ADDRESS as the user gave it; default the GCS address).

    Left alone, the driver waits for the GCS for 60 s, then Ray ends the whole process with no
    one-line error, no summary and the flow run never marked failed. Not retried: we did not start
    that cluster and cannot restart it, and joining a dead address again hangs for minutes.
    """
    host, _, port = gcs_address.rpartition(":")
    down_since: list[float] = []

    def probe() -> str | None:
        try:
            socket.create_connection((host, int(port)), timeout=interval_s).close()
            down_since.clear()
            return None
        except OSError as err:
            down_since[:] = down_since or [time.monotonic()]
            if time.monotonic() - down_since[0] < grace_s:
                return None
            return f"its head (GCS at {gcs_address}) has refused connections for {grace_s:g} s: {err.strerror or err}"

    def lost(what: str) -> TunepipeError:
        return ClusterLost(f"the Ray cluster at {address or gcs_address} (RAY_ADDRESS) went away during tuning "
                           f"({what}); tunepipe did not start it: restart it and run again (the experiment "
                           "resumes), or unset RAY_ADDRESS for a local Ray")

    with _watch(probe, lost, interval_s, stuck=_exit_now):
        yield


def _exit_now(err: TunepipeError) -> None:
    """The last resort when the session's thread waits in a call to a dead GCS (Ray Tune freeing a
    trial's placement group: C++, out of reach of the interrupt; ``ray.shutdown`` waits too): Ray
    itself ends the process 60 s later with no word of why. End it now, with the CLI's one line and
    exit code. Nothing else of this process can finish its work without the cluster anyway."""
    logging.shutdown()
    sys.stderr.write(f"error: {err}\n")
    sys.stderr.flush()
    os._exit(err.exit_code)


@contextlib.contextmanager
def _watch(probe: Callable[[], str | None], lost: Callable[[str], TunepipeError], interval_s: float,
           stuck: Callable[[TunepipeError], None] | None = None, stuck_after_s: float = 5.0) -> Iterator[None]:
    """Poll ``probe`` every ``interval_s`` in a thread; once it describes a loss, interrupt the
    caller's thread while it is in Ray Tune's driver loop, and end the block with ``lost(description)``.
    If the thread is still in the block ``stuck_after_s`` later, call ``stuck`` with that error."""
    target, stop, dead = threading.get_ident(), threading.Event(), []

    def watch() -> None:
        lost_at = None
        while not stop.wait(interval_s):
            what = dead[0] if dead else probe()
            if what:
                if not dead:
                    log.warning("Ray lost: %s", what)
                    dead.append(what)
                    lost_at = time.monotonic()
                if _in_tune_loop(target):  # again each interval until the session's thread is out
                    _interrupt(target, NodeLost)
                if stuck is not None and lost_at is not None and time.monotonic() - lost_at > stuck_after_s:
                    lost_at = None
                    stuck(lost(dead[0]))

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
        raise lost(dead[0]) from err
    finally:
        quiet()
    if dead:  # the work ended while Ray was lost: its results may be partial, a retry resumes them
        raise lost(dead[0])
