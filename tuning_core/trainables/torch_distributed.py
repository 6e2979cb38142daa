"""Data-parallel FashionMNIST: each trial (and the final retrain) trains on N Ray Train workers (DDP).

Used when ``tune.resources.workers_per_trial`` > 1 (``workers_per_trial: 1`` keeps
``tuning_core.trainables.torch``'s ``train_fashion``, which imports nothing of Ray Train). A trial is a
``TorchTrainer`` run started and relayed to Tune by ``distributed.run_in_trial``; its workers train the
same networks (``tuning_core.models``) with the same epoch loop, optimizer and hyperparameters as
``train_fashion``, report the same metrics under the same names on the same cadence, and rank 0 writes
the same checkpoint (``state.pt``), so schedulers, PBT exploits, resume, the leaderboard,
``retrain: false`` and ``load_checkpoint_model`` see no difference. The process group is gloo on CPUs
(Ray Train's choice for CPU workers).

Data: each worker reads only its shard of the data version's splits through Ray Data over the files
on storage (local folder or S3), never arrays from the driver. The splits are ``.npz`` archives
(``tuning_core.data.idx``), which Ray Data has no reader for (``read_numpy`` takes ``.npy`` only) and
which cannot be read by row range (compressed zip members): each archive is read as one binary file by
a Ray Data task and decoded into blocks of ``BLOCK_ROWS`` uint8 images, which
``distributed.exact_shards`` cuts into one contiguous shard per worker (none dropped, none repeated).
A worker reads its shard once, normalises it exactly as ``idx.load_split`` does, and reshuffles it
locally every epoch.

Steps: DDP all-reduces the gradients of every step, so every worker must take the same number of
steps, or the ones with a step more wait forever. Shards differ by up to one row, so every worker draws
as many rows per epoch as the smallest shard holds (a larger shard leaves a different random row out
each epoch), and the divergence check inside an epoch is agreed across workers. ``batch_size`` stays
the global batch (each worker takes ``batch_size // workers``), so a configuration means the same at
any number of workers. Evaluation runs on the unwrapped module over each worker's validation shard and
all-reduces the sums once: the metrics are those of the whole validation split, the same on every rank.
"""

from __future__ import annotations

import io
import logging
import math
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tuning_core.trainables import torch as single
from tuning_core.trainables.common import CONTROL_KEYS, Cadence
from tuning_core.trainables.distributed import (
    RESTORE_KEY,
    Workers,
    fit_once,
    report_round,
    restored_folder,
    run_in_trial,
    world_rank,
)

logger = logging.getLogger(__name__)

BLOCK_ROWS = 512  # images per Ray Data block (400 KB of uint8)
_SPEC_KEY = "_torch_shards"  # what the workers need besides the trial config (files, trial id, seed)


# --------------------------------------------------------------------------- data


def _decode_npz(batch: dict[str, np.ndarray]):
    """Ray Data map: one ``.npz`` split file (a row of raw bytes) → blocks of uint8 images and labels."""
    for raw in batch["bytes"]:
        with np.load(io.BytesIO(raw)) as npz:
            images, labels = npz["images"], npz["labels"].astype(np.int64)
        for start in range(0, len(labels), BLOCK_ROWS):
            yield {"image": images[start: start + BLOCK_ROWS], "label": labels[start: start + BLOCK_ROWS]}


@dataclass(frozen=True)
class ImageFiles:
    """Where a data-parallel job reads a FashionMNIST data version's splits.

    Attributes:
        fs: the storage filesystem as Ray holds it (without keys on S3: workers have them in their env).
        folder: the version's folder in ``fs`` (``<folder>/<split>.npz``).
        normalisation: the manifest's {mean, std} of the training pixels (applied on the workers).
    """

    fs: Any
    folder: str
    normalisation: dict[str, float]

    def dataset(self, split: str) -> Any:
        """A lazy Ray Data dataset of one split's raw images (uint8) and labels, read from storage.

        The read and decode tasks ask for no CPU, as ``distributed.read_parquet_split``'s do: they run
        while other trials' workers may hold every CPU, and they run once per Train run.
        """
        import ray.data

        files = ray.data.read_binary_files(f"{self.folder.rstrip('/')}/{split}.npz", filesystem=self.fs, num_cpus=0)
        return files.map_batches(_decode_npz, batch_size=1, batch_format="numpy", num_cpus=0)


def image_files(fs: Any, folder: str, manifest: dict[str, Any]) -> ImageFiles:
    norm = manifest["normalisation"]
    return ImageFiles(fs, folder.removeprefix("s3://"), {"mean": float(norm["mean"]), "std": float(norm["std"])})


def _read_shard(name: str, normalisation: dict[str, float]) -> tuple[torch.Tensor, torch.Tensor]:
    """This worker's shard of dataset ``name``, normalised exactly as ``idx.load_split`` normalises a split."""
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


def _reduce(values: list[float], device: torch.device, op: str = "sum") -> list[float]:
    """Element-wise ``op`` ("sum", "min" or "max") over the workers (identity for a single process)."""
    import torch.distributed as dist

    # float64 where gloo has it (CPU); NCCL reduces float32 on the GPU.
    t = torch.tensor(values, dtype=torch.float64 if device.type == "cpu" else torch.float32, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op])
    return [float(v) for v in t.cpu()]


def _all_finite(device: torch.device) -> Callable[[torch.Tensor], bool]:
    """A divergence check every worker answers alike: NaN on any worker ends every worker's epoch."""
    def finite(total: torch.Tensor) -> bool:
        return math.isfinite(_reduce([float(total)], device)[0])

    return finite


# --------------------------------------------------------------------------- training on a worker


class _Run:
    """One model's training on this worker: the DDP-wrapped network, its optimizer and its epochs."""

    def __init__(self, params: dict[str, Any], seed: int, x: torch.Tensor, state: dict[str, Any] | None,
                 device: torch.device) -> None:
        import ray.train.torch

        self.params, self.seed, self.device = params, seed, device
        torch.manual_seed(seed)
        self.spec = single.model_spec(params, num_classes=single.NUM_CLASSES, in_channels=x.shape[1],
                                      image_size=tuple(x.shape[2:]))
        if state is not None:
            self.spec = state["model_spec"]  # the weights fix the architecture (as in train_fashion)
        self.module = single.build_from_spec(self.spec)
        if state is not None:
            self.module.load_state_dict(state["model"])
        # DDP broadcasts rank 0's parameters and buffers: every worker starts from the same weights.
        self.model = ray.train.torch.prepare_model(self.module)
        self.optimizer = single._optimizer(self.module, params)
        if state is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        single._apply_hyperparameters(self.module, self.optimizer, params)
        self.workers = ray.train.get_context().get_world_size()
        self.finite = _all_finite(device)

    def epoch(self, epoch: int, x: torch.Tensor, y: torch.Tensor, rows: int) -> float:
        """Train one epoch on this worker's shard; the mean training loss over all workers."""
        # Seeded per epoch and worker: a resumed run draws the batches an uninterrupted one would have.
        gen = torch.Generator().manual_seed((self.seed * 100_003 + epoch) * 1_009 + world_rank())
        # The global batch is split among the workers; the gradient all-reduce averages their batches.
        batch_size = max(1, int(self.params["batch_size"]) // self.workers)
        local = single._train_epoch(self.model, self.optimizer, x, y, batch_size, gen, self.device,
                                    self.params["precision"], finite=self.finite, rows=rows)
        # Every worker drew ``rows`` rows in the same steps, so the mean of their means is the epoch's.
        mean = _reduce([local], self.device)[0] / self.workers
        self.sync_buffers()
        return mean if math.isfinite(mean) else float("nan")

    def sync_buffers(self) -> None:
        """Average the batch-norm statistics over the workers.

        Each worker updates its running statistics from its own batches (DDP broadcasts rank 0's at the
        start of each forward, not after it), so after an epoch they differ slightly; averaged, every
        worker evaluates the very model rank 0 checkpoints, with statistics of all the shards.
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return
        with torch.no_grad():
            for buffer in self.module.buffers():
                if buffer.is_floating_point():
                    dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
                    buffer /= self.workers

    def valid_metrics(self, x: torch.Tensor, y: torch.Tensor, diverged: bool) -> tuple[float, float]:
        """Accuracy and mean loss over every worker's validation shard (0 and NaN once diverged).

        The unwrapped module evaluates (DDP's forward may broadcast buffers, a collective that shards
        of unequal size would leave unmatched); one all-reduce of the sums gives the whole split's means.
        """
        correct = loss_sum = 0.0
        if len(y) and not diverged:
            logits = single._logits(self.module, x, precision=self.params["precision"])  # on the CPU
            loss_sum = float(F.cross_entropy(logits, y, reduction="sum"))
            correct = float((logits.argmax(1) == y).sum())
        total_correct, total_loss, n = _reduce([correct, loss_sum, float(len(y))], self.device)
        if diverged or n == 0:
            return 0.0, float("nan")
        return total_correct / n, total_loss / n

    def save(self, folder: Path, epoch: int, trial_id: str) -> None:
        single._save(folder, self.module, self.optimizer, epoch, self.spec, trial_id)


def _setup() -> torch.device:
    import ray.train.torch

    # Ray Train sets OMP_NUM_THREADS to the worker's CPUs; torch reads it only at import.
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", 1))))
    return ray.train.torch.get_device()


def _model_config(config: dict[str, Any]) -> dict[str, Any]:
    return single._with_defaults({k: v for k, v in config.items() if k not in (RESTORE_KEY, _SPEC_KEY, *CONTROL_KEYS)})


def _trial_loop(config: dict[str, Any]) -> None:
    """On every worker of a trial's Train run: DDP training on this worker's shards, reported on the cadence.

    Reports ``train_fashion``'s metrics (``mean_accuracy``, ``loss``, ``train_loss``, ``epoch``, ``lr``,
    ``restored_epoch``, ``restored_from``, ``device``, ``precision``), the same on every rank, with each
    worker's ``train_rows`` and ``valid_rows`` (its shards) in Tune's ``workers`` list.
    """
    spec = config[_SPEC_KEY]
    files: ImageFiles = spec["files"]
    params, cadence = _model_config(config), Cadence.of(config, default_every=1)
    device = _setup()
    x_train, y_train = _read_shard("train", files.normalisation)
    x_valid, y_valid = _read_shard("valid", files.normalisation)
    rows = {"train_rows": len(y_train), "valid_rows": len(y_valid)}
    draw = int(_reduce([float(len(y_train))], device, "min")[0])
    x_train, y_train = x_train.to(device), y_train.to(device)  # the validation shard is moved per batch

    with restored_folder(config) as folder:
        state = single._load_state(folder) if folder is not None else None
    start_epoch = int(state["epoch"]) if state is not None else 0
    restored_from = str(state.get("trial_id", "")) if state is not None else ""
    run = _Run(params, int(spec["seed"]), x_train, state, device)
    if state is not None and world_rank() == 0:
        logger.info("trial %s resumes after epoch %d from trial %s's checkpoint on %d workers", spec["trial_id"],
                    start_epoch, restored_from, run.workers)

    for epoch in range(start_epoch + 1, cadence.last + 1):
        train_loss = run.epoch(epoch, x_train, y_train, draw)
        acc, loss = run.valid_metrics(x_valid, y_valid, diverged=math.isnan(train_loss))
        metrics = {"mean_accuracy": acc, "loss": loss, "train_loss": train_loss, "epoch": epoch,
                   "lr": float(run.optimizer.param_groups[0]["lr"]), "restored_epoch": start_epoch,
                   "restored_from": restored_from, "device": device.type, "precision": params["precision"]}

        def save(folder: Path, epoch: int = epoch) -> None:
            run.save(folder, epoch, spec["trial_id"])

        report_round(metrics, epoch, cadence, save, worker=rows)


def train_fashion_distributed(config: dict[str, Any], files: ImageFiles, workers: Workers,
                              datasets: dict[str, Any] | None = None) -> None:
    """Ray Tune function trainable: one ``TorchTrainer`` run on ``workers`` per trial (see module doc).

    ``files`` and ``workers`` come through ``tune.with_parameters`` (small: paths, two numbers, the shape);
    ``datasets``: the train and valid splits the driver read once for all trials (``distributed.read_once``).
    """
    from ray.train.torch import TorchTrainer

    spec = {"files": files, "trial_id": single._trial_id(), "seed": int(_model_config(config).get("seed", 0))}
    datasets = datasets or {split: files.dataset(split) for split in ("train", "valid")}
    run_in_trial(TorchTrainer, _trial_loop, {**config, _SPEC_KEY: spec}, workers, datasets=datasets)


# --------------------------------------------------------------------------- retrain


def _fit_loop(config: dict[str, Any]) -> None:
    """On every worker of a retrain: train each (config, epochs) on this worker's shards of train+valid;
    rank 0 sends the trained models back, as ``train_fashion`` checkpoints (``state.pt`` bytes)."""
    spec = config[_SPEC_KEY]
    files: ImageFiles = spec["files"]
    device = _setup()
    parts = [_read_shard(split, files.normalisation) for split in ("train", "valid")]
    x, y = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    del parts
    draw, total = (int(v) for v in (_reduce([float(len(y))], device, "min")[0], _reduce([float(len(y))], device)[0]))
    x, y = x.to(device), y.to(device)
    states = []
    for fit_config, epochs in spec["fits"]:
        run = _Run(single._with_defaults(fit_config), int(spec["seed"]), x, None, device)
        for epoch in range(1, int(epochs) + 1):
            loss = run.epoch(epoch, x, y, draw)
            if world_rank() == 0:
                logger.info("final fit epoch %d/%d on %d workers: train loss %.4f", epoch, epochs, run.workers, loss)
        if world_rank() == 0:
            with tempfile.TemporaryDirectory() as tmp:
                run.save(Path(tmp), int(epochs), "final-fit")
                states.append((Path(tmp) / single.CHECKPOINT_FILE).read_bytes())
    if world_rank() == 0:
        spec["outbox"].put({"states": states, "rows": total})


def fit_models(fits: list[tuple[dict[str, Any], int]], files: ImageFiles, workers: Workers, seed: int = 0
               ) -> list[nn.Module]:
    """Models trained on train+valid by one ``TorchTrainer`` run on ``workers``, one per (config, epochs),
    in order: the retrain of the winner and its untuned baseline, each worker on its shard only.

    Runs on the driver of the retrain stage (no Tune session); the weights come back from rank 0
    through a queue, in ``train_fashion``'s checkpoint format, so nothing but Train's run state is
    written, to a temporary folder.

    Returns:
        What ``tuning_core.trainables.torch.fit_final`` returns for each: a CPU model in eval mode with
        its ``spec`` (build arguments).
    """
    from ray.train.torch import TorchTrainer

    spec = {"files": files, "fits": [(dict(c), int(e)) for c, e in fits], "seed": int(seed)}
    out = fit_once(TorchTrainer, _fit_loop, _SPEC_KEY, spec, workers,
                   {split: files.dataset(split) for split in ("train", "valid")})
    logger.info("retrained %d model(s) on %d workers (%d rows)", len(out["states"]), workers.count, out["rows"])
    models = []
    for (fit_config, _), raw in zip(fits, out["states"], strict=True):
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / single.CHECKPOINT_FILE).write_bytes(raw)
            models.append(single.load_checkpoint_model(Path(tmp), fit_config))
    return models


def workers_of(resources: Any) -> Workers:
    """The ``Workers`` of a ``tuning_core.config.Resources``."""
    return Workers(resources.workers_per_trial, resources.cpu_per_worker)
