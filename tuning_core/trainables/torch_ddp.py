"""Data-parallel (DDP) training of the FashionMNIST networks on Ray Train workers.

The per-worker loop behind a trial with ``tune.resources.workers_per_trial > 1`` and behind the
distributed retrain. It trains the same networks (``tuning_core.models``) with the same epoch loop,
optimizer, hyperparameters and checkpoint format as the single-process ``train_fashion``, so a
checkpoint of either restores into the other (resume, PBT exploit, ``retrain: false``,
``load_checkpoint_model``), and it reports the same metrics under the same names on the same cadence
(``common.Cadence``).

Data: each worker reads only its shard of the prepared splits, through Ray Data over the data
version's files on storage (local folder or S3), never arrays shipped from the driver. The splits
are ``.npz`` archives (``tuning_core.data.idx``), which Ray Data has no reader for (``read_numpy``
takes ``.npy`` only) and which cannot be read by row range (compressed zip members): each archive is
read as one binary file by a Ray Data task, decoded into blocks of ``BLOCK_ROWS`` images, and
``streaming_split`` deals the blocks out to the workers. A worker reads its shard once at start and
keeps it (a worker's shard of FashionMNIST is tens of MB of uint8), reshuffling it locally every
epoch; shards are not re-dealt between epochs.

Sizes: the training shards are equal (Ray Data drops at most ``workers - 1`` rows to make them so),
because every worker must take the same number of gradient steps: DDP all-reduces the gradients of
each step, and a worker with one batch more would wait forever for the others. The validation shards
are not made equal (no row dropped): evaluation runs on the unwrapped module, without collectives,
and the sums of loss and correct predictions are all-reduced once, so the metrics are those of the
whole validation split. ``batch_size`` stays the global batch (each worker takes
``batch_size // workers``), so a configuration means the same at any number of workers.
"""

from __future__ import annotations

import io
import logging
import math
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tuning_core.trainables import common
from tuning_core.trainables import torch as single

if TYPE_CHECKING:
    import pyarrow.fs as pafs
    import ray.data
    from ray.train import Checkpoint, DataConfig, RunConfig

logger = logging.getLogger(__name__)

BLOCK_ROWS = 512  # images per Ray Data block (400 KB of uint8): the unit streaming_split deals out
TRAIN = "train"
VALID = "valid"
# Keys of the worker's config that carry the run's plumbing rather than hyperparameters.
WORKER_KEYS = ("_normalisation", "_resume_checkpoint", "_trial_id", "_seed", "_has_valid")


# --------------------------------------------------------------------------- data


def _decode_npz(batch: dict[str, np.ndarray]):
    """Ray Data map: one ``.npz`` split file (a row of raw bytes) → blocks of uint8 images and labels."""
    for raw in batch["bytes"]:
        with np.load(io.BytesIO(raw)) as npz:
            images, labels = npz["images"], npz["labels"].astype(np.int64)
        for start in range(0, len(labels), BLOCK_ROWS):
            yield {"image": images[start: start + BLOCK_ROWS], "label": labels[start: start + BLOCK_ROWS]}


def split_dataset(fs: pafs.FileSystem, version_path: str, split: str) -> ray.data.Dataset:
    """A lazy Ray Data dataset of one split's raw images (uint8) and labels, read from storage.

    The read and decode tasks ask for no CPU: they run once, at the start of training, while the Train
    workers, which hold the trial's CPUs, wait for their shards; a task asking for a CPU of its own
    would never start where the workers hold every CPU of the node.
    """
    import ray.data

    path = f"{version_path.rstrip('/')}/{split}.npz"
    files = ray.data.read_binary_files(path, filesystem=fs, num_cpus=0)
    return files.map_batches(_decode_npz, batch_size=1, batch_format="numpy", num_cpus=0)


def shard_datasets(fs: pafs.FileSystem, version_path: str, train: tuple[str, ...] = (TRAIN,),
                   valid: str | None = VALID) -> dict[str, ray.data.Dataset]:
    """The datasets a ``TorchTrainer`` deals out to its workers: "train", the union of the ``train``
    splits (train+valid for the final fit), and "valid", the ``valid`` split (None: no evaluation)."""
    parts = [split_dataset(fs, version_path, s) for s in train]
    out = {TRAIN: parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]}
    if valid is not None:
        out[VALID] = split_dataset(fs, version_path, valid)
    return out


def dataset_config() -> DataConfig:
    """Ray Train's data config: equal training shards, validation shards without dropped rows."""
    from ray.train import DataConfig

    class _Shards(DataConfig):
        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
            out: list[dict[str, Any]] = [{} for _ in range(world_size)]
            hints = worker_node_ids if self._enable_shard_locality else None
            for name, ds in datasets.items():
                ds = ds.copy(ds)
                ds.context.execution_options = self._resolve_execution_options(name)
                ds.context.enable_progress_bars = False  # one file read once: nothing to watch
                for rank, it in enumerate(ds.streaming_split(world_size, equal=name == TRAIN, locality_hints=hints)):
                    out[rank][name] = it
            return out

    return _Shards()


def _read_shard(name: str, normalisation: dict[str, float]) -> tuple[torch.Tensor, torch.Tensor]:
    """This worker's shard of ``name``, normalised exactly as ``idx.load_split`` normalises a split."""
    import ray.train

    images, labels = [], []
    for batch in ray.train.get_dataset_shard(name).iter_batches(batch_size=None, batch_format="numpy"):
        images.append(batch["image"])
        labels.append(batch["label"])
    x = np.concatenate(images) if images else np.zeros((0, 28, 28), dtype=np.uint8)
    y = np.concatenate(labels) if labels else np.zeros(0, dtype=np.int64)
    # The same operations, in the same order and dtype, as tuning_core.data.idx.load_split.
    x = x.astype(np.float32) / 255.0
    x = (x - np.float32(normalisation["mean"])) / np.float32(normalisation["std"] or 1.0)
    return torch.from_numpy(np.ascontiguousarray(x[:, None, :, :])), torch.from_numpy(y.astype(np.int64))


# --------------------------------------------------------------------------- collectives


def _reduce(values: list[float], device: torch.device, op: str) -> list[float]:
    """Element-wise ``op`` ("sum" or "max") over the workers (identity for a single process)."""
    import torch.distributed as dist

    # float64 where gloo has it (CPU); NCCL reduces float32 on the GPU.
    t = torch.tensor(values, dtype=torch.float64 if device.type == "cpu" else torch.float32, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return [float(v) for v in t.cpu()]


def _sum(values: list[float], device: torch.device) -> list[float]:
    return _reduce(values, device, "sum")


def _max(values: list[float], device: torch.device) -> list[float]:
    return _reduce(values, device, "max")


def _all_finite(device: torch.device):
    """A divergence check every worker answers alike: NaN anywhere stops every worker's epoch."""
    def finite(total: torch.Tensor) -> bool:
        return math.isfinite(_sum([float(total)], device)[0])

    return finite


# --------------------------------------------------------------------------- the worker loop


def _report(metrics: dict[str, Any], epoch: int, cadence: common.Cadence, save, rank: int) -> None:
    """``common.report`` for a Train worker: every worker reports (``ray.train.report`` is a barrier),
    rank 0 alone with the checkpoint, whose metrics are the ones Ray Train keeps."""
    import ray.train

    if not cadence.reports(epoch):
        return
    metrics = {**metrics, "training_iteration": epoch, "node_id": common._node_id()}
    if not cadence.checkpoints(epoch):
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            save(Path(tmp))
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint)


def _start_state(config: dict[str, Any]) -> dict[str, Any] | None:
    """Ray Train's own latest checkpoint (the worker group restarted), else the one the run resumes from."""
    import ray.train

    checkpoint = ray.train.get_checkpoint() or config.get("_resume_checkpoint")
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        return single._load_state(Path(folder))


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker loop: DDP training of one FashionMNIST configuration on this worker's shards.

    Reports per epoch on ``common.Cadence`` the metrics of ``train_fashion`` (``mean_accuracy``,
    ``loss``, ``train_loss``, ``epoch``, ``lr``, ``restored_epoch``, ``restored_from``, ``device``,
    ``precision``; without a "valid" dataset ``mean_accuracy``/``loss`` are absent) plus ``workers``,
    ``train_rows`` (rows of all training shards), ``shard_rows_min``/``shard_rows_max`` (this epoch's
    smallest and largest shard) and ``valid_rows``. Rank 0 writes the checkpoint, in ``train_fashion``'s
    format.

    Args:
        config: the trial config (hyperparameters and the runner's control keys) plus
            ``_normalisation`` ({mean, std} of the data version's manifest), optional
            ``_resume_checkpoint`` (a ``ray.train.Checkpoint`` to start from, e.g. the Tune trial's),
            ``_trial_id`` (written into checkpoints, as ``train_fashion`` does) and ``_seed``.
    """
    import ray.train
    import ray.train.torch

    context = ray.train.get_context()
    rank, workers = context.get_world_rank(), context.get_world_size()
    params = single._with_defaults({k: v for k, v in config.items() if k not in WORKER_KEYS})
    max_epochs = int(config.get("_max_iterations", 10))
    cadence = common.Cadence.of(config, default_every=1)
    seed = int(config.get("_seed", params.get("seed", 0)))
    trial_id = str(config.get("_trial_id", ""))
    # Ray Train sets OMP_NUM_THREADS to the worker's CPUs; torch does not read it after import.
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", 1))))
    device = ray.train.torch.get_device()
    # Per-worker batches of the global batch size: the gradient all-reduce averages them into one step.
    batch_size = max(1, int(params["batch_size"]) // workers)

    x_train, y_train = _read_shard(TRAIN, config["_normalisation"])
    x_valid, y_valid = _read_shard(VALID, config["_normalisation"]) if config.get("_has_valid") else (None, None)
    rows = _sum([len(y_train), len(y_valid) if y_valid is not None else 0], device)
    shard_min = -_max([-float(len(y_train))], device)[0]
    shard_max = _max([float(len(y_train))], device)[0]
    x_train, y_train = x_train.to(device), y_train.to(device)

    torch.manual_seed(seed)
    spec = single.model_spec(params, num_classes=single.NUM_CLASSES, in_channels=x_train.shape[1],
                             image_size=tuple(x_train.shape[2:]))
    start_epoch, restored_from = 0, ""
    state = _start_state(config)
    if state is not None:
        spec = state["model_spec"]  # the weights fix the architecture (as in train_fashion)
    module = single.build_from_spec(spec)
    if state is not None:
        module.load_state_dict(state["model"])
        start_epoch, restored_from = int(state["epoch"]), str(state.get("trial_id", ""))
    # DDP broadcasts rank 0's parameters and buffers, so every worker starts from the same weights.
    model = ray.train.torch.prepare_model(module)
    optimizer = single._optimizer(module, params)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        if rank == 0:
            logger.info("trial %s resumes after epoch %d from trial %s's checkpoint on %d workers", trial_id,
                        start_epoch, restored_from, workers)
    single._apply_hyperparameters(module, optimizer, params)

    finite = _all_finite(device)
    for epoch in range(start_epoch + 1, max_epochs + 1):
        # Seeded per epoch and worker: a resumed run draws the batches an uninterrupted one would have.
        gen = torch.Generator().manual_seed((seed * 100_003 + epoch) * 1_009 + rank)
        local = single._train_epoch(model, optimizer, x_train, y_train, batch_size, gen, device,
                                    params["precision"], finite=finite)
        # Equal shards take the same steps, so the mean of the workers' means is the epoch's mean.
        train_loss = _sum([local], device)[0] / workers
        metrics: dict[str, Any] = {"train_loss": train_loss if math.isfinite(train_loss) else float("nan")}
        if x_valid is not None:
            acc, loss = _valid_sums(module, x_valid, y_valid, params["precision"], device, diverged=math.isnan(
                metrics["train_loss"]))
            metrics.update({"mean_accuracy": acc, "loss": loss})
        metrics.update({"epoch": epoch, "lr": float(optimizer.param_groups[0]["lr"]), "restored_epoch": start_epoch,
                        "restored_from": restored_from, "device": device.type, "precision": params["precision"],
                        "workers": workers, "train_rows": int(rows[0]), "valid_rows": int(rows[1]),
                        "shard_rows_min": int(shard_min), "shard_rows_max": int(shard_max)})

        def save(folder: Path, epoch: int = epoch) -> None:
            single._save(folder, module, optimizer, epoch, spec, trial_id)

        _report(metrics, epoch, cadence, save, rank)


def _valid_sums(module: nn.Module, x: torch.Tensor, y: torch.Tensor, precision: str, device: torch.device,
                diverged: bool) -> tuple[float, float]:
    """Accuracy and mean loss over every worker's validation shard (0 and NaN once diverged).

    The unwrapped module evaluates (DDP's forward would broadcast buffers: a collective that shards of
    unequal size would leave unmatched); one all-reduce of the sums then gives the whole split's means.
    """
    correct = loss_sum = 0.0
    if len(y) and not diverged:
        logits = single._logits(module, x, precision=precision)
        loss_sum = float(F.cross_entropy(logits, y, reduction="sum"))
        correct = float((logits.argmax(1) == y).sum())
    total_correct, total_loss, n = _sum([correct, loss_sum, float(len(y))], device)
    if diverged or n == 0:
        return 0.0, float("nan")
    return total_correct / n, total_loss / n


# --------------------------------------------------------------------------- trainers


def worker_config(config: dict[str, Any], normalisation: dict[str, float], *, trial_id: str = "",
                  resume_checkpoint: Checkpoint | None = None, seed: int | None = None,
                  has_valid: bool = True) -> dict[str, Any]:
    """The ``train_loop_config`` of a run of ``config`` (a trial config with its control keys)."""
    out = {**config, "_normalisation": {"mean": float(normalisation["mean"]), "std": float(normalisation["std"])},
           "_trial_id": trial_id, "_resume_checkpoint": resume_checkpoint, "_has_valid": has_valid}
    if seed is not None:
        out["_seed"] = int(seed)
    return out


def torch_trainer(config: dict[str, Any], fs: pafs.FileSystem, version_path: str, *, num_workers: int,
                  cpu_per_worker: float = 1.0, gpu_per_worker: float = 0.0, run_config: RunConfig | None = None,
                  trial_id: str = "", resume_checkpoint: Checkpoint | None = None, seed: int | None = None,
                  train: tuple[str, ...] = (TRAIN,), valid: str | None = VALID) -> Any:
    """A ``ray.train.torch.TorchTrainer`` running ``train_loop_per_worker`` for ``config`` on the data
    version at ``version_path`` in ``fs``: each worker reads its own shard of the ``train`` splits and,
    unless ``valid`` is None, of the ``valid`` split, and the run reports validation metrics.

    The process group uses gloo on CPUs and NCCL when the workers have GPUs (Ray Train's choice).
    """
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    from tuning_core.versioning import read_manifest

    normalisation = read_manifest(fs, version_path)["normalisation"]
    resources = {"CPU": float(cpu_per_worker), **({"GPU": float(gpu_per_worker)} if gpu_per_worker else {})}
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=worker_config(config, normalisation, trial_id=trial_id,
                                        resume_checkpoint=resume_checkpoint, seed=seed,
                                        has_valid=valid is not None),
        scaling_config=ScalingConfig(num_workers=int(num_workers), use_gpu=gpu_per_worker > 0,
                                     resources_per_worker=resources),
        run_config=run_config,
        datasets=shard_datasets(fs, version_path, train, valid),
        dataset_config=dataset_config(),
    )


def fit_final(config: dict[str, Any], fs: pafs.FileSystem, version_path: str, epochs: int, *, num_workers: int,
              storage_path: str, storage_filesystem: pafs.FileSystem | None = None, cpu_per_worker: float = 1.0,
              gpu_per_worker: float = 0.0, seed: int = 0) -> nn.Module:
    """``tuning_core.trainables.torch.fit_final`` on ``num_workers`` DDP workers: a fresh model trained
    with ``config`` for ``epochs`` epochs on train+valid, each worker reading its shard from storage.

    The trained weights come back through one checkpoint written by rank 0 at the end, under
    ``storage_path`` (shared storage when the workers are on other nodes) in a run folder of its own,
    removed once loaded.

    Returns:
        The model in eval mode, on the CPU, with its ``spec`` attribute: what ``fit_final`` returns.
    """
    import uuid

    from ray.train import RunConfig

    name = f"final-fit-{uuid.uuid4().hex[:12]}"
    control = {"_max_iterations": int(epochs), "_checkpoint_every": int(epochs), "_report_at": str(int(epochs))}
    trainer = torch_trainer({**common.model_params(config), **control}, fs, version_path, num_workers=num_workers,
                            cpu_per_worker=cpu_per_worker, gpu_per_worker=gpu_per_worker, seed=seed,
                            train=(TRAIN, VALID), valid=None,
                            run_config=RunConfig(name=name, storage_path=storage_path,
                                                 storage_filesystem=storage_filesystem))
    result = trainer.fit()
    try:
        with result.checkpoint.as_directory() as folder:
            model = single.load_checkpoint_model(Path(folder), config)
    finally:
        _remove_run(result.checkpoint, name)
    logger.info("final fit on %d workers: %d epochs, train loss %.4f", num_workers, epochs,
                result.metrics.get("train_loss", float("nan")))
    return model


def _remove_run(checkpoint: Checkpoint, name: str) -> None:
    """Delete the final fit's run folder (its checkpoint is loaded; nothing resumes a final fit)."""
    path = checkpoint.path.rstrip("/")
    folder = path[: path.rfind(f"/{name}/") + len(name) + 1] if f"/{name}/" in path else ""
    if folder:
        try:
            checkpoint.filesystem.delete_dir(folder)
        except OSError:
            logger.warning("final fit: could not remove %s", folder, exc_info=True)
