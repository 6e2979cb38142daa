"""PyTorch trainable for FashionMNIST/MNIST: per-epoch metrics, checkpoints, PBT-ready restore.

Used as ``tune.with_parameters(train_fashion, train=(x, y), valid=(x, y))`` so the arrays travel
through Ray's object store once instead of being pickled into every trial. Reporting,
checkpoint cadence and restore go through ``tuning_core.trainables.common`` like every
other trainable.

A checkpoint is one ``state.pt`` holding the model and optimizer state, the number of finished
epochs, the id of the trial that wrote it and the model's build arguments. The trial id is what
lets a restored run tell a PBT exploit (someone else's checkpoint) from a retry (its own).
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tuning_core.errors import ConfigError
from tuning_core.models.cnn import build_from_spec, model_spec
from tuning_core.trainables import common

logger = logging.getLogger(__name__)

CHECKPOINT_FILE = "state.pt"
NUM_CLASSES = 10
# Hyperparameters that live in the optimizer, so a restored optimizer state must be overridden
# with the current config's values (PBT mutates exactly these).
OPTIMIZER_KEYS = ("lr", "momentum", "weight_decay")
CHECK_EVERY = 20  # steps between divergence checks in an epoch (each check waits for the GPU)
DEFAULTS = {"lr": 0.05, "momentum": 0.9, "batch_size": 64, "weight_decay": 1e-4, "model": "cnn", "width": 32,
            "precision": "fp32"}
# "bf16": forward passes under bfloat16 autocast (weights, gradients and optimizer stay float32; no
# loss scaling needed, unlike float16). Pays off on GPUs with bf16 tensor cores (Ampere and later);
# on most CPUs it is slower than float32.
PRECISIONS = ("fp32", "bf16")


# --------------------------------------------------------------------------- helpers


def _tensors(data: tuple[np.ndarray, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = data
    if len(images) != len(labels) or len(images) == 0:
        raise ConfigError(f"training data: {len(images)} images and {len(labels)} labels, expected equal, non-zero")
    with warnings.catch_warnings():
        # Arrays from Ray's object store are read-only; training never writes to them, so sharing
        # the memory is safe and saves a copy of the data set per trial.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        x = torch.from_numpy(np.asarray(images, dtype=np.float32))
        y = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    if x.ndim == 3:  # N×H×W → N×1×H×W
        x = x.unsqueeze(1)
    return x, y


def _trial_resources() -> dict[str, float]:
    """Resources Ray granted this trial ({} outside a Tune trial)."""
    from ray import tune

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # outside a trial Ray warns and returns None
        try:
            pgf = tune.get_context().get_trial_resources()
        except Exception:  # noqa: BLE001 - any failure here just means "not in a trial"
            return {}
    return dict(pgf.required_resources) if pgf is not None else {}


def _trial_id() -> str:
    from ray import tune

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return tune.get_context().get_trial_id() or ""
        except Exception:  # noqa: BLE001
            return ""


def _setup_threads_and_device(resources: dict[str, float]) -> torch.device:
    """Threads = the trial's CPUs; CUDA when the trial was granted a GPU (or, outside a trial, when
    there is one). Ray hides the GPUs of other trials (CUDA_VISIBLE_DEVICES), so "cuda" is ours."""
    cpus = int(resources.get("CPU", 0)) or int(os.environ.get("OMP_NUM_THREADS", 1))
    torch.set_num_threads(max(1, cpus))
    if torch.cuda.is_available() and (resources.get("GPU", 0) > 0 or not resources):
        # Fixed input sizes: let cuDNN pick the fastest kernels; TF32 matmuls (Ampere and later).
        torch.backends.cudnn.benchmark = True
        torch.set_float32_matmul_precision("high")
        return torch.device("cuda")
    return torch.device("cpu")


def _optimizer(model: nn.Module, config: dict[str, Any]) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=float(config["lr"]), momentum=float(config["momentum"]),
                           weight_decay=float(config["weight_decay"]))


def _apply_hyperparameters(model: nn.Module, optimizer: torch.optim.Optimizer, config: dict[str, Any]) -> None:
    """Make a restored model/optimizer follow the current config (PBT's mutated values)."""
    for group in optimizer.param_groups:
        group["lr"] = float(config["lr"])
        group["momentum"] = float(config["momentum"])
        group["weight_decay"] = float(config["weight_decay"])
    if "dropout" in config:
        for m in model.modules():
            if isinstance(m, nn.Dropout):
                m.p = float(config["dropout"])


def _with_defaults(config: dict[str, Any]) -> dict[str, Any]:
    return {**DEFAULTS, **common.model_params(config)}


def _autocast(device: torch.device, precision: str) -> torch.autocast:
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def _finite(total: torch.Tensor) -> bool:
    return bool(torch.isfinite(total))


def _train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                 batch_size: int, generator: torch.Generator, device: torch.device, precision: str = "fp32",
                 finite: Callable[[torch.Tensor], bool] = _finite, rows: int | None = None) -> float:
    """One pass over ``x``/``y`` in seeded random batches; the mean training loss (NaN once diverged).

    ``finite`` decides, from this process's running loss sum, whether training goes on; ``rows`` (None:
    all) caps the rows drawn this epoch. A data-parallel worker (``torch_ddp``) passes a check that
    agrees across workers and the smallest shard's size, so that every worker takes the same steps: one
    leaving the epoch early, or taking a step more, would leave the others waiting in a gradient
    all-reduce.
    """
    model.train()
    # The permutation comes from a CPU generator (same batches on CPU and GPU, same after a resume).
    order = torch.randperm(len(y), generator=generator)[:rows].to(x.device)
    # The loss sum stays a device tensor: reading it back every step would stall the GPU's queue.
    # A diverged trial is noticed every CHECK_EVERY steps and at the end, and reports NaN (the
    # scheduler stops it; training does not crash).
    total, seen = torch.zeros((), device=x.device), 0
    for step, start in enumerate(range(0, len(order), batch_size), 1):
        idx = order[start: start + batch_size]
        if len(idx) < 2 and seen:  # a batch of one breaks batch norm; skip the odd leftover
            continue
        xb, yb = x[idx].to(device, non_blocking=True), y[idx].to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        with _autocast(device, precision):
            loss = F.cross_entropy(model(xb), yb)
        total += loss.detach() * len(idx)
        seen += len(idx)
        if step % CHECK_EVERY == 0 and not finite(total):
            return float("nan")
        loss.backward()
        optimizer.step()
    mean = float(total) / max(seen, 1)
    return mean if math.isfinite(mean) else float("nan")


@torch.no_grad()
def _logits(model: nn.Module, x: torch.Tensor, batch_size: int = 512, precision: str = "fp32") -> torch.Tensor:
    model.eval()
    device = next(model.parameters()).device
    with _autocast(device, precision):
        out = [model(x[i: i + batch_size].to(device)).float().cpu() for i in range(0, len(x), batch_size)]
    return torch.cat(out) if out else torch.empty(0, 0)


def _valid_metrics(model: nn.Module, x: torch.Tensor, y: torch.Tensor, precision: str = "fp32") -> tuple[float, float]:
    logits = _logits(model, x, precision=precision)
    y = y.cpu()
    loss = float(F.cross_entropy(logits, y))
    acc = float((logits.argmax(1) == y).float().mean())
    return acc, loss


def _save(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, epoch: int, spec: dict[str, Any],
          trial_id: str) -> None:
    state = {
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "epoch": epoch,
        "trial_id": trial_id,
        "model_spec": spec,
    }
    torch.save(state, folder / CHECKPOINT_FILE)


def _load_state(folder: Path) -> dict[str, Any]:
    path = Path(folder) / CHECKPOINT_FILE
    if not path.is_file():
        raise ConfigError(f"checkpoint {folder}: no {CHECKPOINT_FILE}, expected a train_fashion checkpoint")
    # weights_only: a checkpoint is data (tensors, numbers, strings), never code to unpickle.
    return torch.load(path, map_location="cpu", weights_only=True)


# --------------------------------------------------------------------------- public API


# Every hyperparameter the trainable reads; anything else in a trial config would be silently ignored.
KNOWN_PARAMS = (*DEFAULTS, "dropout", "hidden", "seed")


def check_configs(configs: list[tuple[str, dict[str, Any]]]) -> None:
    """``check_config`` for each (where, config) pair, e.g. the edges of a search space."""
    for where, config in configs:
        check_config(config, where)


def check_config(config: dict[str, Any], where: str = "") -> None:
    """Refuse a trial config this trainable would ignore in part or fail on, before Ray starts:
    unknown names, a model it cannot build, values the optimizer refuses, a batch size below 1.

    Raises:
        ConfigError: naming the parameter and what was expected.
    """
    prefix = f"search space ({where})" if where else "search space"
    params = _with_defaults(config)
    unknown = sorted(set(params) - set(KNOWN_PARAMS))
    if unknown:
        raise ConfigError(f"{prefix}: {unknown} are not parameters of the torch trainable, which would ignore "
                          f"them; expected some of {sorted(KNOWN_PARAMS)}")
    for key, kind in (("lr", float), ("momentum", float), ("weight_decay", float), ("dropout", float),
                      ("batch_size", int), ("width", int), ("hidden", int), ("seed", int)):
        if key in params and (isinstance(params[key], bool) or not isinstance(params[key], (int, float))
                              or (kind is int and params[key] != int(params[key]))):
            expected = "a whole number" if kind is int else "a number"
            raise ConfigError(f"{prefix}: {key}: expected {expected}, got {params[key]!r}")
    if params["precision"] not in PRECISIONS:
        raise ConfigError(f"{prefix}: precision: one of {list(PRECISIONS)}, got {params['precision']!r}")
    if int(params["batch_size"]) < 1:
        raise ConfigError(f"{prefix}: batch_size: expected >= 1, got {params['batch_size']!r}")
    try:
        model = build_from_spec(model_spec(params, num_classes=NUM_CLASSES))
        _optimizer(model, params)  # torch's own checks: lr, momentum and weight_decay >= 0
    except (ConfigError, ValueError) as err:
        raise ConfigError(f"{prefix}: {err}") from None


def _splits_on(device: torch.device, train: tuple, valid: tuple, data_key: str | None) -> tuple:
    """Both splits as tensors on ``device``: once per actor and data version when ``data_key`` names it."""
    def build() -> tuple:
        return tuple([t.to(device) for t in _tensors(split)] for split in (train, valid))

    return build() if data_key is None else common.per_actor(("torch", data_key, str(device)), build)


def train_fashion(config: dict[str, Any], train: tuple, valid: tuple, data_key: str | None = None) -> None:
    """Ray Tune function trainable: reports and checkpoints per epoch on ``common.Cadence``.

    Reports ``mean_accuracy`` and ``loss`` (validation), ``train_loss``, ``epoch``, ``lr``,
    ``restored_epoch`` (epochs in the checkpoint this run started from, 0 for a fresh start) and
    ``restored_from`` (the trial id that wrote that checkpoint, "" for a fresh start): after a PBT
    exploit it names the donor trial, after a retry the trial itself; ``device`` ("cuda" when the
    trial's resources include a GPU and CUDA is there, else "cpu"); ``precision`` ("fp32" or "bf16").

    Args:
        config: lr, momentum, batch_size, weight_decay, model, width, precision, optional dropout/hidden/seed,
            and the runner's control keys (_max_iterations, _checkpoint_every, _report_at).
        train: (images N×1×H×W float32, labels int64).
        valid: same shape as ``train``.
        data_key: the data version; the actor then keeps the splits' tensors from one trial to the next.
    """
    params = _with_defaults(config)
    max_epochs = int(config.get("_max_iterations", 10))
    cadence = common.Cadence.of(config, default_every=1)
    seed = int(params.get("seed", 0))
    device = _setup_threads_and_device(_trial_resources())
    # Each split goes to the trial's device once (60k images are ~190 MB): batches are then gathered
    # on the GPU, not copied host→device every step. On the CPU ``.to`` returns the same tensors.
    (x_train, y_train), (x_valid, y_valid) = _splits_on(device, train, valid, data_key)
    trial_id = _trial_id()

    torch.manual_seed(seed)
    spec = model_spec(params, num_classes=NUM_CLASSES, in_channels=x_train.shape[1],
                      image_size=tuple(x_train.shape[2:]))
    start_epoch, restored_from = 0, ""
    with common.restored_state() as folder:
        state = _load_state(folder) if folder is not None else None
    if state is not None:
        # The weights fix the architecture: rebuild what the checkpoint holds, even if the config
        # (e.g. a PBT donor's) names another width.
        spec = state["model_spec"]
        model = build_from_spec(spec).to(device)
        model.load_state_dict(state["model"])
        optimizer = _optimizer(model, params)
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, restored_from = int(state["epoch"]), str(state.get("trial_id", ""))
        logger.info("trial %s resumes after epoch %d from trial %s's checkpoint", trial_id, start_epoch,
                    restored_from)
    else:
        model = build_from_spec(spec).to(device)
        optimizer = _optimizer(model, params)
    _apply_hyperparameters(model, optimizer, params)

    for epoch in range(start_epoch + 1, max_epochs + 1):
        # Seed per epoch so a resumed run draws the same batches an uninterrupted one would have.
        gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
        train_loss = _train_epoch(model, optimizer, x_train, y_train, int(params["batch_size"]), gen, device,
                                  params["precision"])
        if math.isnan(train_loss):
            acc, loss = 0.0, float("nan")
        else:
            acc, loss = _valid_metrics(model, x_valid, y_valid, params["precision"])
        metrics = {"mean_accuracy": acc, "loss": loss, "train_loss": train_loss, "epoch": epoch,
                   "lr": float(optimizer.param_groups[0]["lr"]), "restored_epoch": start_epoch,
                   "restored_from": restored_from, "device": device.type, "precision": params["precision"]}

        def save(folder: Path, epoch: int = epoch) -> None:
            _save(folder, model, optimizer, epoch, spec, trial_id)

        common.report(metrics, iteration=epoch, cadence=cadence, save=save)


def fit_final(config: dict[str, Any], train: tuple, epochs: int, seed: int = 0) -> nn.Module:
    """Train a fresh model with ``config`` for ``epochs`` epochs (the caller passes train+valid).

    Returns:
        The trained model in eval mode, on the CPU; its ``spec`` attribute holds the
        ``build_model`` arguments to save beside the weights.
    """
    params = _with_defaults(config)
    device = _setup_threads_and_device({})
    x, y = (t.to(device) for t in _tensors(train))
    torch.manual_seed(seed)
    spec = model_spec(params, num_classes=NUM_CLASSES, in_channels=x.shape[1], image_size=tuple(x.shape[2:]))
    model = build_from_spec(spec).to(device)
    optimizer = _optimizer(model, params)
    _apply_hyperparameters(model, optimizer, params)
    for epoch in range(1, epochs + 1):
        gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
        loss = _train_epoch(model, optimizer, x, y, int(params["batch_size"]), gen, device, params["precision"])
        logger.info("final fit epoch %d/%d: train loss %.4f", epoch, epochs, loss)
    model.spec = spec  # type: ignore[assignment]  # lets callers save the build arguments beside the weights
    return model.cpu().eval()


def predict_proba(model: nn.Module, images: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """Class probabilities (N×classes softmax) for normalised images (N×1×H×W or N×H×W)."""
    x, _ = _tensors((images, np.zeros(len(images), dtype=np.int64)))
    return torch.softmax(_logits(model, x, batch_size), dim=1).numpy()


def evaluate(model: nn.Module, test: tuple) -> dict[str, Any]:
    """Accuracy, log loss, error rate and confusion matrix (rows: true class, columns: predicted)."""
    images, labels = test
    proba = predict_proba(model, images)
    labels = np.asarray(labels, dtype=np.int64)
    pred = proba.argmax(1)
    k = proba.shape[1]
    eps = 1e-15  # the usual clip, so one confident mistake gives a large but finite log loss
    logloss = float(-np.mean(np.log(np.clip(proba[np.arange(len(labels)), labels], eps, 1.0))))
    accuracy = float((pred == labels).mean())
    confusion = np.zeros((k, k), dtype=np.int64)
    np.add.at(confusion, (labels, pred), 1)
    return {"accuracy": accuracy, "logloss": logloss, "error": 1.0 - accuracy, "confusion": confusion.tolist()}


def load_checkpoint_model(checkpoint_dir: Path, config: dict[str, Any]) -> nn.Module:
    """Rebuild the model a ``train_fashion`` checkpoint holds (eval mode, CPU).

    The checkpoint's own build arguments win; ``config`` fills them in for checkpoints that lack them.
    """
    state = _load_state(Path(checkpoint_dir))
    spec = state.get("model_spec") or model_spec(_with_defaults(config))
    model = build_from_spec(spec)
    model.load_state_dict(state["model"])
    model.spec = spec  # type: ignore[assignment]
    return model.eval()
