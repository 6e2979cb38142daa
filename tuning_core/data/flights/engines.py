"""How a source's files are read: in this process, one after another, or by Ray tasks in parallel.

Both engines run ``read.read_file`` on each file (detection, the bad-row policy with the file's own
line numbers, the encoding fallback, conversion to canonical rows) and hand the results back in the
order of ``sources.resolve_files``. So the canonical table, the bad-row counts and examples, the
errors, the content hash and the splits are the same whichever engine ran; only the manifest's
``engine`` says which did (``data.engine`` is no part of the hash).

* ``local``: file after file, each streamed in record batches of a few MiB: peak memory is one
  batch of raw text plus the canonical rows kept (~35 bytes a flight), not the text of the input.
* ``ray``: one Ray task per file, a bounded number in flight (the driver holds the results it has
  taken, in file order, and a window of the rest). Tasks, not ``ray.data.read_csv``: every file needs
  its own schema detection (header, or a headerless layout), its own line numbers for bad rows, its
  own encoding fallback and zip handling, which ``read_file`` does; Ray Data's CSV reader parses all
  files with one set of options and has no per-row error handler. S3 objects are read wherever a task
  lands; a file on the local filesystem by a task on this node (other nodes cannot see it), or in this
  process when this node has no CPUs for tasks (the head node of infra/cluster's recipes).
* ``auto``: ``ray`` when a Ray cluster is attached (``RAY_ADDRESS`` is set, or Ray is running in this
  process) and the input is at least ``_RAY_MIN_FILES`` files of ``_RAY_MIN_BYTES`` in all; else ``local``.
  Below that, starting tasks costs more than parsing in-process saves, and one file is one task anyway.

The driver takes the files' canonical rows one file at a time, in file order: ordering by departure,
the time split and the content hash need all rows in one order. Up to ``ordered.SPILL_ROWS`` they are
held in memory (~35 bytes a flight, ~3x less than the CSV text); past that they go to disk in buckets
of departure days (``ordered.Spill``), so the driver holds one file's rows and one bucket.
"""

from __future__ import annotations

import logging
import os
import sys
from collections import deque
from collections.abc import Iterator
from typing import Any

import pyarrow.fs as pafs

from tuning_core.config import FlightsData
from tuning_core.data.flights.read import FileRead, read_file
from tuning_core.data.flights.sources import is_s3, short_error, uri_of
from tuning_core.errors import ServiceUnavailable, TunepipeError

logger = logging.getLogger(__name__)

# auto: the smallest input worth Ray tasks. Measured on 2 cores (8 ASA files, 51 MB): local 0.25 s;
# ray 0.16 s with warm workers, 0.7 s when the tasks start workers. Below ~64 MiB the start-up eats the gain.
_RAY_MIN_FILES = 2
_RAY_MIN_BYTES = 64 << 20
# Tasks in flight per CPU of the cluster: enough to keep every CPU busy while the driver takes the
# results in file order, few enough that finished results do not pile up in the object store.
_IN_FLIGHT_PER_CPU = 2


def read_files(fs: pafs.FileSystem, files: list[str], cfg: FlightsData | None,
               ray_fs: pafs.FileSystem | None = None) -> tuple[str, Iterator[FileRead]]:
    """(engine, each file's read in file order), by ``cfg.engine``; batch scoring (no cfg) reads locally.

    The reads are lazy: a file's error is raised when its turn comes, as the local engine would.
    ``ray_fs``: the filesystem handed to the Ray tasks (through the object store) in place of ``fs``.
    The stage passes ``fs`` without its keys when Ray's workers hold them in their environment
    (tasks.workloads.prepare): then no key is pickled into Ray's object store or spilled to disk.
    """
    engine = choose_engine(cfg.engine if cfg is not None else "local", fs, files)
    if engine == "ray":
        connected = _connect()
        cpus = _cpus_for(fs)
        if cpus:
            logger.info("flights: reading %d file(s) with Ray tasks (%d CPUs)", len(files), cpus)
            return engine, _read_with_ray(fs, files, cfg, cpus, connected, ray_fs or fs)
        if connected:
            _disconnect()
        # The recipes' head nodes have no CPUs (infra/cluster), and a driver there cannot hand its local
        # files to other nodes: reading them here is the way that works.
        logger.warning("flights: data.engine ray, but the source is on this node's filesystem and this Ray node "
                       "has no CPUs for tasks; reading the files here (put them on S3 to read them on the cluster)")
        engine = "local"
    logger.info("flights: reading %d file(s) in this process", len(files))
    return engine, (read_file(fs, file, cfg) for file in files)


def choose_engine(wanted: str, fs: pafs.FileSystem, files: list[str]) -> str:
    """``local`` or ``ray`` for ``data.engine`` (see the module docstring for ``auto``)."""
    if wanted != "auto":
        return wanted
    if len(files) < _RAY_MIN_FILES or not ray_attached():
        return "local"
    return "ray" if _total_bytes(fs, files) >= _RAY_MIN_BYTES else "local"


def ray_attached() -> bool:
    """A cluster named by RAY_ADDRESS, or a Ray already running in this process (looked up without
    importing ray: that alone takes a second)."""
    ray = sys.modules.get("ray")
    return bool(os.environ.get("RAY_ADDRESS")) or (ray is not None and ray.is_initialized())


def _total_bytes(fs: pafs.FileSystem, files: list[str]) -> int:
    try:
        return sum(info.size or 0 for info in fs.get_file_info(files))
    except OSError:  # reading the files will say what is wrong, with the file's name
        return 0


def _read_task(fs: pafs.FileSystem, path: str, cfg: FlightsData | None) -> FileRead | TunepipeError:
    # Input errors come back as values: the driver raises them in file order, as the local engine
    # would, with their one-line message (a raised one would arrive wrapped in a RayTaskError).
    try:
        return read_file(fs, path, cfg)
    except TunepipeError as err:
        return err


def _connect() -> bool:
    """Join RAY_ADDRESS, or start a local Ray, unless Ray is running; True if this call connected."""
    import ray

    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS")
    if address:
        _check_answers(address)
    try:
        if address:
            ray.init(address=address, log_to_driver=False, configure_logging=False)
        else:
            # address="local": a stale /tmp/ray/ray_current_cluster would otherwise be joined.
            ray.init(address="local", include_dashboard=False, log_to_driver=False, configure_logging=False)
    except (ConnectionError, RuntimeError, TimeoutError) as err:
        where = f"the Ray cluster at RAY_ADDRESS {address}" if address else "a local Ray"
        raise ServiceUnavailable(f"flights data (data.engine ray): cannot start or join {where} "
                                 f"({short_error(err)}); set data.engine: local to read in this process") from None
    return True


def _check_answers(address: str) -> None:
    from tuning_core.ray_address import check_answers

    check_answers(address, "set data.engine: local to read the flights in this process")


def _disconnect() -> None:
    import ray

    ray.shutdown()  # a joined cluster: only this driver's connection; a local Ray of ours: stopped


def _cpus_for(fs: pafs.FileSystem) -> int:
    """CPUs the tasks can use: the cluster's for S3 objects, this node's for local files."""
    import ray

    if is_s3(fs):
        # At least one: on an autoscaling cluster with no worker up yet, the tasks bring one up.
        return max(1, int(ray.cluster_resources().get("CPU", 0)))
    here = ray.get_runtime_context().get_node_id()
    node = next((n for n in ray.nodes() if n.get("NodeID") == here), {})
    return int(node.get("Resources", {}).get("CPU", 0))


def _read_with_ray(fs: pafs.FileSystem, files: list[str], cfg: FlightsData | None, cpus: int,
                   connected: bool, task_fs: pafs.FileSystem) -> Iterator[FileRead]:
    import ray

    pending: deque[Any] = deque()
    try:
        options: dict[str, Any] = {"num_cpus": 1}
        if not is_s3(fs):
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            # Local paths exist on this node only.
            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(
                ray.get_runtime_context().get_node_id(), soft=False)
        task = ray.remote(_read_task).options(**options)
        # Put once: every task gets the same object instead of its own pickled copy.
        fs_ref, cfg_ref = ray.put(task_fs), ray.put(cfg)
        window = max(2, _IN_FLIGHT_PER_CPU * cpus)
        todo = iter(files)
        for file in todo:
            pending.append(task.remote(fs_ref, file, cfg_ref))
            if len(pending) >= window:
                break
        lost = (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError, ray.exceptions.ObjectLostError,
                ray.exceptions.OutOfMemoryError)
        for file in files:  # the front of pending is always this file's task
            try:
                result = ray.get(pending.popleft())
            except lost as err:
                # Ray already retried the task (max_retries); the input may be fine: a retryable stage error.
                raise ServiceUnavailable(f"{uri_of(fs, file)}: the Ray task reading it was lost "
                                         f"({type(err).__name__}: {short_error(err)})") from None
            following = next(todo, None)
            if following is not None:
                pending.append(task.remote(fs_ref, following, cfg_ref))
            if isinstance(result, TunepipeError):
                raise result
            yield result
    finally:
        for ref in pending:  # an error or an abandoned read: the later files are not needed
            ray.cancel(ref)
        if connected:
            _disconnect()
