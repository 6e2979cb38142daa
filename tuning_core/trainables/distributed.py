"""Data-parallel trials: one Ray Train run (N workers) inside one Ray Tune trial.

With ``tune.resources.workers_per_trial: N > 1`` a trial is no longer the process that trains: the Tune
trial function becomes a small driver that starts a Ray Train run (XGBoost's collective or torch DDP)
on N workers, each reading only its shard of the prepared splits, and relays the run's results to Tune.
Everything Tune does with a trial keeps working unchanged, because the relay turns every Train report
into an ordinary ``tune.report`` on the trial's ``Cadence``, with a Tune-side checkpoint where the
workers wrote one:

* schedulers (ASHA, HyperBand, median stopping) read the reports; when they stop the trial, the Train
  run is ended with it (its controller is killed; its workers and their placement group go with it);
* PBT exploits and Tune's retries after a failure restore a Tune checkpoint: the trial passes it to
  the new Train run, whose workers resume from it (``restored_folder``);
* a Train run's own files live under its trial's folder (``<trial>/train/<unique name>``), so two
  trials, or two runs of one trial (a retry, a PBT restart), never share them; the relay deletes each
  Train checkpoint once Tune holds its copy and the run's folder when the run ends.

Train's own failure handling is off (``max_failures=0``): a worker that dies fails the trial, and Tune
restores it from its last checkpoint, as with one worker.

Tune side (the trial function)::

    def train_my_model(config, data_path, fs):
        datasets = {"train": read_parquet_split(fs, f"{data_path}/train.parquet"), ...}
        run_in_trial(MyFrameworkTrainer, per_worker_loop, config, Workers(count=2, cpu=1), datasets=datasets)

Worker side (``per_worker_loop(config)``, on every rank)::

    cadence = Cadence.of(config)
    shard = ray.train.get_dataset_shard("train")            # this worker's rows only (``ExactShards``)
    with restored_folder(config) as folder:                 # the Tune checkpoint to resume from, or None
        state = load(folder) if folder else fresh()
    for it in range(first, cadence.last + 1):
        ...one round / epoch...
        report_round(metrics, it, cadence, save)            # every rank, every iteration; rank 0 saves

``metrics`` must be the same on every rank (XGBoost's evaluation is already global; torch workloads
average theirs across ranks before reporting): Tune receives rank 0's. The trial itself reserves no
CPU (``trial_resources``): the Train run reserves its workers, so the runner caps the number of
concurrent trials to what the cluster's CPUs hold (``concurrent_trials``).

Ray 2.60, Ray Train V2 (``RAY_TRAIN_V2_ENABLED``, on by default). Ray's own
``ray.tune.integration.ray_train.TuneReportCallback`` forwards metrics only (no Tune checkpoint, so
no PBT and no restore); this module does the same through a pair of queues and adds the checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuning_core.trainables.common import Cadence

log = logging.getLogger(__name__)

# Keys the relay adds to the workers' config / to their metrics. ``training_iteration`` is Tune's
# reserved name; the workers send their own count under another key and the relay renames it.
RESTORE_KEY = "_restore_from"
ITERATION_KEY = "_iteration"
# Each worker's own facts (rows of its shards, its peak memory): Tune receives them from every rank as
# the list ``workers`` (rank order); every other metric is rank 0's.
WORKER_KEY = "_worker"
# The placement group of the trial's current Train run (hex id), in rank 0's reports: see
# ``StoppedRunReleaser``.
PLACEMENT_GROUP_KEY = "_train_placement_group"

# What the trial process itself reserves: no CPU (the Train run reserves its workers'), but Tune
# refuses an empty request, so a token amount of memory.
_TRIAL_BUNDLE = {"CPU": 0, "memory": 64 * 1024 * 1024}


@dataclass(frozen=True)
class Workers:
    """The shape of one trial's Train run.

    Attributes:
        count: data-parallel workers (Ray Train's ``num_workers``).
        cpu: CPUs per worker (XGBoost's ``nthread``, torch's threads).
        gpu: GPUs per worker.
    """

    count: int
    cpu: float = 1.0
    gpu: float = 0.0

    def scaling_config(self) -> Any:
        import ray.train

        resources: dict[str, float] = {"CPU": self.cpu}
        if self.gpu:
            resources["GPU"] = self.gpu
        return ray.train.ScalingConfig(num_workers=self.count, use_gpu=self.gpu > 0,
                                       resources_per_worker=resources)


def trial_resources() -> Any:
    """The Tune resource request of a data-parallel trial (``tune.with_resources``)."""
    from ray import tune

    return tune.PlacementGroupFactory([dict(_TRIAL_BUNDLE)])


def concurrent_trials(cluster_cpus: float, workers: Workers, wanted: int | None) -> int:
    """How many data-parallel trials may run at once: their workers must fit the cluster's CPUs
    together, else a trial's Train run waits for workers that other trials hold (Tune does not see
    the workers' resources, so it would start as many trials as its searcher offers)."""
    fit = max(1, math.floor(cluster_cpus / (workers.count * workers.cpu) + 1e-9))
    return min(wanted, fit) if wanted else fit


def read_parquet_split(fs: Any, path: str) -> Any:
    """A Ray Data dataset over one prepared split on storage (local folder or S3 through ``fs``).

    The read tasks ask for no CPU: a trial reads while other trials' workers may hold every CPU of the
    cluster, and reading is I/O. ``run_in_trial`` materialises the dataset into the object store before
    the workers start, and each worker then fetches only the blocks of its shard.
    """
    import ray.data

    return ray.data.read_parquet(path, filesystem=fs, num_cpus=0)


def read_once(files: Any, splits: tuple[str, ...] = ("train", "valid")) -> dict[str, Any]:
    """The ``splits`` of a job's ``files`` (anything with ``dataset(split)``: ``SplitFiles``,
    ``ImageFiles``) read into Ray's object store once, for every trial of a tuning run.

    Called by the tune stage's driver; the trials receive the materialised datasets through
    ``tune.with_parameters`` (their blocks stay where the read tasks put them, not in the driver's
    memory) and only cut them into shards. Reading them in each trial instead cost ~5 s of every trial's
    start on 2 CPUs (4,000 rows: Ray Data's start and the read tasks' new processes), once per PBT
    exploit and per retry too, and held one copy per running trial.
    """
    return {split: files.dataset(split).materialize() for split in splits}


def _materialized(datasets: dict[str, Any]) -> dict[str, Any]:
    from ray.data.dataset import MaterializedDataset

    return {name: ds if isinstance(ds, MaterializedDataset) else ds.materialize() for name, ds in datasets.items()}


def exact_shards(datasets: dict[str, Any], count: int) -> Any:
    """A Ray Train ``DataConfig`` that hands worker ``i`` the ``i``-th of ``count`` contiguous shards of
    each dataset, of exactly ``rows * i // count`` rows: none dropped, none repeated.

    Ray Train's default (``streaming_split(equal=True)``) drops rows to make the shards equal (a
    5001-row split gave 2 x 2500 here), and ``equal=False`` hands a one-block split to one worker. The
    shards are cut here, in the trial, before the workers hold their CPUs: cutting runs Ray tasks, and
    Train calls ``configure`` once the workers hold them (on a full cluster it waited forever).
    """
    from ray.train import DataConfig

    shards: dict[str, list[Any]] = {}
    for name, ds in datasets.items():
        rows = ds.count()
        shards[name] = list(ds.split_at_indices([rows * i // count for i in range(1, count)]))

    class ExactShards(DataConfig):
        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
            return [{name: parts[rank].iterator() for name, parts in shards.items()} for rank in range(world_size)]

    return ExactShards()


# ---------------------------------------------------------------------------------------------- workers
def world_rank() -> int:
    import ray.train

    return ray.train.get_context().get_world_rank()


def shard_frame(name: str) -> Any:
    """This worker's shard of dataset ``name`` as one pandas DataFrame (empty when it holds no rows)."""
    import pandas as pd
    import ray.train

    parts = list(ray.train.get_dataset_shard(name).iter_batches(batch_format="pandas", batch_size=None))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


@contextlib.contextmanager
def restored_folder(config: dict[str, Any]) -> Iterator[Path | None]:
    """On a worker: the folder of the Tune checkpoint this Train run resumes from (a retry, a PBT
    exploit, an experiment restore), or None for a fresh start. Every rank may read it."""
    checkpoint = config.get(RESTORE_KEY)
    if checkpoint is None:
        yield None
        return
    with checkpoint.as_directory() as folder:
        yield Path(folder)


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MiB (Linux reports KiB)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def rss_mb() -> float:
    """This process's resident memory now, in MiB: taken before a worker reads its shards, so that its
    peak minus this is what its data cost (the imports and Ray's own share come before)."""
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def report_round(metrics: dict[str, Any], iteration: int, cadence: Cadence, save: Callable[[Path], None],
                 worker: dict[str, Any] | None = None) -> bool:
    """On a worker: report ``metrics`` for ``iteration`` (1-based) where ``cadence`` says so, with a
    checkpoint written by rank 0's ``save(folder)`` where it says so; returns whether one was written.

    Every rank calls this after every iteration: a Ray Train report is collective (all ranks or none),
    and the cadence gives every rank the same answer. ``worker``: this worker's own facts (e.g. the
    rows of its shards); Tune gets every rank's, with ``rank``, ``peak_rss_mb`` and ``node_id``, as ``workers``.
    """
    import ray
    import ray.train

    if not cadence.reports(iteration):
        return False
    facts = {**(worker or {}), "rank": world_rank(), "peak_rss_mb": round(peak_rss_mb(), 1),
             "node_id": ray.get_runtime_context().get_node_id()}
    metrics = {**metrics, ITERATION_KEY: iteration, "node_id": ray.get_runtime_context().get_node_id(),
               WORKER_KEY: facts}
    group = ray.util.get_current_placement_group()
    if group is not None:  # the Train run's workers' group: the driver frees it once the trial stops
        metrics[PLACEMENT_GROUP_KEY] = group.id.hex()
    if cadence.checkpoints(iteration) and world_rank() == 0:
        with tempfile.TemporaryDirectory() as tmp:
            save(Path(tmp))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        return True
    ray.train.report(metrics)
    return cadence.checkpoints(iteration)


# ---------------------------------------------------------------------------------------------- the trial
def _relay_callback(outbox: Any, inbox: Any) -> Any:
    from ray.train import UserCallback

    class RelayToTrial(UserCallback):
        """Runs in the Train controller: hands each report to the trial and waits until the trial has
        reported it to Tune, so the workers never run ahead of Tune's decisions (as with one worker)."""

        def __init__(self) -> None:
            self.sent_handle = False
            self.stopped = False  # the trial said stop: let the controller's event loop take the abort

        def after_report(self, run_context, metrics, checkpoint) -> None:
            import ray

            if self.stopped:
                return
            item: dict[str, Any] = {"metrics": dict(metrics[0]), "checkpoint": checkpoint}
            item["metrics"]["workers"] = [m.get(WORKER_KEY) for m in metrics]
            item["metrics"].pop(WORKER_KEY, None)
            if not self.sent_handle:  # the trial kills this controller when Tune stops the trial
                item["controller"] = ray.get_runtime_context().current_actor
                self.sent_handle = True
            outbox.put(item)
            self.stopped = not inbox.get()

    return RelayToTrial()


def _tune_report(item: dict[str, Any]) -> None:
    """One Train report as a Tune report; Tune copies the checkpoint into the trial's own folder."""
    from ray import tune

    metrics = dict(item["metrics"])
    metrics["training_iteration"] = int(metrics.pop(ITERATION_KEY))
    checkpoint = item.get("checkpoint")
    if checkpoint is None:
        tune.report(metrics)
        return
    tune.report(metrics, checkpoint=tune.Checkpoint(path=checkpoint.path, filesystem=checkpoint.filesystem))
    with contextlib.suppress(Exception):  # Tune holds its copy now; the Train one is only storage
        checkpoint.filesystem.delete_dir(checkpoint.path)


def _delete(fs: Any, path: str) -> None:
    for attempt in range(3):
        try:
            fs.delete_dir(path)
            return
        except FileNotFoundError:
            return
        except OSError:  # a file written while the folder went (a late upload): try again
            time.sleep(0.5 * (attempt + 1))
    log.warning("could not remove the Train run folder %s", path)


def _abort(controller: Any, inbox: Any) -> None:
    """End a Train run whose trial Tune stopped (a scheduler, PBT, the stopper) or that failed.

    The controller's abort stops the workers and frees their placement group. It is first released
    from the report it waits on (told to relay nothing more), so that its event loop can take the
    abort. Killing it is the fallback: its workers die with it, but the placement group is then left
    to Ray Train's cleaner actor, which could not reach the cluster when several local Rays ran on one
    machine (the CPUs stayed held and the next trial waited forever).
    """
    import ray

    with contextlib.suppress(Exception):
        inbox.put(False, timeout=5)
    try:
        ray.get(controller.abort.remote(), timeout=60)
    except Exception:  # noqa: BLE001 - it exits inside abort (RayActorError) or did not answer in time
        pass
    with contextlib.suppress(Exception):
        ray.kill(controller, no_restart=True)


def _remove_placement_group(hex_id: str) -> None:
    import ray
    from ray.util.placement_group import PlacementGroup

    with contextlib.suppress(Exception):  # already gone (its run ended normally): nothing to free
        ray.util.remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(hex_id))))


def stopped_run_releaser() -> Any:
    """A driver-side Tune callback that frees the workers' placement group of every trial that stops
    running (paused by PBT, stopped by a scheduler, errored, finished) and of every Train run a trial
    replaced with a new one.

    A trial's Train controller creates its workers' placement group, and Ray ties a placement group's
    life to the job, not to the actor that created it: when Tune stops a trial, its function gets no time
    to end its Train run (``FunctionTrainable.cleanup`` waits 0 s, and a paused trial's actor may be
    killed at once), the controller dies with the trial's actor, and the group keeps its CPUs until Ray
    Train's cleaner actor removes it. That cleaner did not (it could not find the cluster while several
    local Rays ran on one machine), so under PBT, which pauses trials all the time, a paused trial waited
    for those CPUs forever. The driver knows when a trial stops; each report names the group.
    """
    from ray.tune import Callback

    class StoppedRunReleaser(Callback):
        def __init__(self) -> None:
            self.held: dict[str, str] = {}  # trial id → its Train run's placement group

        def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
            group = result.get(PLACEMENT_GROUP_KEY)
            if not group:
                return
            previous = self.held.get(trial.trial_id)
            if previous and previous != group:  # a new Train run of the trial (retry, PBT restart)
                _remove_placement_group(previous)
            self.held[trial.trial_id] = group

        def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
            for trial in trials:
                if trial.status != "RUNNING" and trial.trial_id in self.held:
                    _remove_placement_group(self.held.pop(trial.trial_id))

    return StoppedRunReleaser()


def release_leftovers(fs: Any, experiment_path: str) -> None:
    """After a tuning run of data-parallel trials: remove what Train runs of stopped trials left.

    Tune does not wait for a stopped trial's function to finish (``cleanup`` joins it with timeout 0)
    and may kill its actor at once, the last trial's in particular: its Train controller dies with it,
    but its placement group is then freed only by Ray Train's cleaner actor, and its run folder stays.
    Called once Tune is done, when no trial of this driver's job runs any more, so every placement
    group of this job still alive is such a leftover (Tune removed its own trials').
    """
    import ray
    from ray.util import placement_group_table
    from ray.util.placement_group import PlacementGroup

    job = ray.get_runtime_context().get_job_id()
    for pg_id, info in placement_group_table().items():
        if pg_id.endswith(job) and info.get("state") in ("CREATED", "PENDING", "RESCHEDULING"):
            with contextlib.suppress(Exception):
                ray.util.remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg_id))))
    import pyarrow.fs as pafs

    with contextlib.suppress(Exception):
        for entry in fs.get_file_info(pafs.FileSelector(experiment_path)):
            if entry.type == pafs.FileType.Directory and entry.base_name.startswith("trial_"):
                _delete(fs, f"{entry.path}/train")


def _poll_workers_often() -> None:
    """The Train controller started from this process polls its workers every 0.05 s, not every 2 s.

    The controller sees a worker group that started, a report and the end of the loop only when it polls;
    the workers wait for it at each report, so every report cost up to 2 s (measured: 2.0 s per round at
    0.3M rows with a report every round, against 0.017 s of boosting), and a whole Train run ~2-5 s more
    (a 2-worker run of an empty loop: 9.5 s -> 4.6 s). Ray Train passes the variable on to the controller
    it starts from this process.
    """
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.05")


def fit_once(trainer_cls: type, fit_loop: Callable[[dict[str, Any]], None], spec_key: str, spec: dict[str, Any],
             workers: Workers, datasets: dict[str, Any]) -> Any:
    """A final fit outside Tune (the distributed retrain): run ``fit_loop`` once on ``workers`` and return
    what rank 0 puts into ``spec["outbox"]`` (a queue added here), e.g. the fitted models' bytes.

    ``datasets`` are materialised and dealt out in exact contiguous shards; the loop finds ``spec`` under
    ``spec_key`` in its config. Nothing but Train's run state is written, to a temporary folder.
    """
    import ray
    import ray.train
    from ray.util.queue import Queue

    _poll_workers_often()
    outbox = Queue(maxsize=1, actor_options={"num_cpus": 0})
    datasets = _materialized(datasets)
    try:
        with tempfile.TemporaryDirectory(prefix="tunepipe-retrain-") as tmp:
            trainer_cls(
                fit_loop, train_loop_config={spec_key: {**spec, "outbox": outbox}},
                scaling_config=workers.scaling_config(),
                run_config=ray.train.RunConfig(name="retrain", storage_path=tmp,
                                               failure_config=ray.train.FailureConfig(max_failures=0)),
                datasets=datasets, dataset_config=exact_shards(datasets, workers.count),
            ).fit()
            return outbox.get(timeout=60)
    finally:
        ray.kill(outbox.actor, no_restart=True)


def run_in_trial(trainer_cls: type, train_loop: Callable[[dict[str, Any]], None], config: dict[str, Any],
                 workers: Workers, *, datasets: dict[str, Any] | None = None, **trainer_kwargs: Any) -> None:
    """From inside a Tune trial function: run ``train_loop`` on ``workers`` as a Ray Train run and relay
    its reports to Tune until it ends or Tune stops the trial.

    Args:
        trainer_cls: a Ray Train V2 data-parallel trainer (``ray.train.xgboost.XGBoostTrainer``,
            ``ray.train.torch.TorchTrainer``).
        train_loop: the per-worker function, called with ``config`` plus ``RESTORE_KEY`` (the Tune
            checkpoint to resume from, or None; read it with ``restored_folder``).
        config: the trial config, control keys included (``Cadence.of`` reads them on the workers).
        workers: how many workers and what each reserves.
        datasets: Ray Data datasets by name (see ``read_parquet_split``, ``read_once``); materialised here
            unless they are already, then split into exact contiguous shards, one per worker
            (``shard_frame`` on the workers).
        trainer_kwargs: passed to ``trainer_cls`` (e.g. ``torch_config``).

    Raises:
        Whatever the Train run raised (a worker's error): Tune then retries the trial from its last
        checkpoint (``tune.max_failures``).
    """
    import ray
    import ray.train
    from ray import tune
    from ray.train._internal.session import get_session
    from ray.util.queue import Empty, Queue

    # Tune reuses a trial's actor only once the previous trial's function has returned, and waits 2 s
    # for it by default (then kills the actor): ending a Train run (``_abort``) takes longer than that.
    os.environ.setdefault("TUNE_FUNCTION_THREAD_TIMEOUT_S", "30")
    _poll_workers_often()
    storage = get_session().storage  # the trial's folder on the experiment's storage (local or S3)
    fs, trial_path = storage.storage_filesystem, storage.trial_fs_path
    run_root = f"{trial_path.rstrip('/')}/train"
    name = f"run-{uuid.uuid4().hex[:12]}"  # unique: Ray Train would resume a run folder of the same name
    outbox = Queue(maxsize=1, actor_options={"num_cpus": 0})
    inbox = Queue(maxsize=1, actor_options={"num_cpus": 0})
    if datasets:
        datasets = _materialized(datasets)
        shards = exact_shards(datasets, workers.count)
    trainer = trainer_cls(
        train_loop,
        train_loop_config={**config, RESTORE_KEY: tune.get_checkpoint()},
        scaling_config=workers.scaling_config(),
        run_config=ray.train.RunConfig(
            name=name, storage_path=run_root, storage_filesystem=fs,
            failure_config=ray.train.FailureConfig(max_failures=0),
            # The relay deletes each checkpoint once Tune has copied it; Train must not race it.
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=None),
            callbacks=[_relay_callback(outbox, inbox)]),
        datasets=datasets or None,
        dataset_config=shards if datasets else None,
        **trainer_kwargs)
    outcome: dict[str, BaseException] = {}

    def fit() -> None:
        try:
            trainer.fit()
        except BaseException as err:  # noqa: BLE001 - re-raised in the trial's thread below
            outcome["error"] = err

    thread = threading.Thread(target=fit, name=f"tunepipe-train-{name}", daemon=True)
    thread.start()
    controller = None
    try:
        while True:
            try:
                item = outbox.get(timeout=0.5)
            except Empty:
                if thread.is_alive():
                    continue
                break
            controller = item.pop("controller", None) or controller
            _tune_report(item)  # raises SystemExit when Tune stops the trial here
            inbox.put(True)
        thread.join()
        if "error" in outcome:
            raise outcome["error"]
    finally:
        if thread.is_alive() and controller is not None:
            _abort(controller, inbox)
        for queue in (outbox, inbox):
            with contextlib.suppress(Exception):
                ray.kill(queue.actor, no_restart=True)
        thread.join(timeout=60)  # the run has ended (aborted: its workers are gone) before its folder goes
        _delete(fs, run_root)  # one Train run per trial at a time
