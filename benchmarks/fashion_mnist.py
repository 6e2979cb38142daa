"""FashionMNIST: accuracy against wall time for the small CNN and ResNet-18, ASHA and PBT, in one run.

    python -m benchmarks.fashion_mnist [--data DIR] [--out FILE.json]

Default (CPU; about 4 minutes on 2 idle cores, much longer when other work shares them): the real
2k sample (``../shared/data/fashion-mnist-2k``, 1,359 train / 241 valid / 400 test images after the
pipeline's stratified split) through ``tuning_core.data.idx.prepare`` and
``tuning_core.runner.run_tuning`` on a local Ray with 2 CPUs, random search, seed 0:

- ``cnn+asha``: the small CNN, ASHA (grace 1, reduction 3), 6 trials x up to 6 epochs, 2 at a time
  on 1 CPU each;
- ``cnn+pbt``: the small CNN, the pipeline's (asynchronous) PBT: population 4 running together on
  half a CPU each, perturbation after every epoch, mutating lr, momentum and weight decay, 6 epochs.
  The ``exploits`` column counts trials that restarted from another trial's checkpoint;
- ``resnet18``: ResNet-18 (1x28x28 stem, 11.2M parameters), 1 trial x 1 epoch on both CPUs (FIFO:
  one epoch leaves nothing for a scheduler to stop), because one of its epochs costs about 100x a
  small-CNN epoch on a CPU.

For each run: wall time of the tuning stage (``run_tuning``; Ray start-up excluded), trial-epochs
run, CPU-seconds per trial-epoch (seconds x CPUs of the trial, so 1- and 2-CPU trials compare), best
validation accuracy, the best validation accuracy after the first epoch (the like-for-like point
across models), and the test accuracy of the best trial's best checkpoint. Ratios are against
``cnn+asha`` measured in the same process. Other work on the machine inflates every wall time: the
JSON records the load average. The last line printed is ``ratio=<resnet18 over cnn CPU-s/epoch>``.

Full data set on a GPU machine (60,000 / 10,000 official files, gz or raw, in a folder or in
torchvision's ``FashionMNIST/raw`` layout; trials get GPU resources and train on CUDA):

    python -m benchmarks.fashion_mnist --full-gpu --data /path/to/fashion-mnist --out fashion_gpu.json

``--full-gpu`` runs ``cnn+asha`` 16 trials x 15 epochs and ``cnn+pbt`` population 4 x 15 epochs with
gpu=0.25 and 3 CPUs per trial (four small CNNs share one GPU; the PBT population runs together),
and ``resnet18+asha`` 8 trials x 10 epochs with gpu=0.5 and 6 CPUs per trial, on a local Ray that
sees all the machine's CPUs and GPUs (sized for one GPU and 16 cores; more GPUs run more trials
at once). For whole-GPU trials, edit ``GPU_RUNS`` (gpus=1).

The full data set is not available offline. To time the ``--full-gpu`` budgets at full size anyway:

    python -m benchmarks.fashion_mnist --full-gpu --stand-in --out fashion_gpu_stand_in.json

``--stand-in`` tiles the 2k sample's 1,600 train / 400 t10k images to the official 60,000 / 10,000
counts (IDX files in a temporary folder) and runs the same pipeline on them: wall times and
per-epoch costs are those of the full data set; the accuracies mean nothing (the tiles repeat
across the train/valid split, so validation accuracy reaches 1.0; the test split is 400 real
images repeated).
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import finish, quiet_env, r

SAMPLE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "fashion-mnist-2k"
BASELINE = "cnn+asha"
STAND_IN_NOTE = ("the 2k sample tiled to 60,000/10,000 images: full-size timing; accuracies mean nothing "
                 "(tiles repeat across train/valid; test is 400 real images repeated)")


@dataclass(frozen=True)
class Run:
    name: str
    model: str
    scheduler: str
    trials: int
    epochs: int
    cpus: float = 1.0  # per trial
    gpus: float = 0.0  # per trial; fractions let several small trials share one GPU
    concurrency: int | None = 2  # None: as many trials as the resources allow


# PBT runs its whole population at once (half a CPU each): with 2 of 4 trials running at a time,
# the first pair would finish before the second pair reports, and nobody would be exploited.
CPU_RUNS = (Run("cnn+asha", "cnn", "asha", 6, 6), Run("cnn+pbt", "cnn", "pbt", 4, 6, cpus=0.5, concurrency=4),
            Run("resnet18", "resnet18", "fifo", 1, 1, cpus=2, concurrency=1))
GPU_RUNS = (Run("cnn+asha", "cnn", "asha", 16, 15, cpus=3, gpus=0.25, concurrency=None),
            Run("cnn+pbt", "cnn", "pbt", 4, 15, cpus=3, gpus=0.25, concurrency=None),
            Run("resnet18+asha", "resnet18", "asha", 8, 10, cpus=6, gpus=0.5, concurrency=None))


def _space(model: str, full: bool) -> dict[str, Any]:
    from tuning_core.config import ParamSpec

    if model == "resnet18":
        return {"model": "resnet18", "lr": ParamSpec(type="loguniform", low=0.01, high=0.1), "momentum": 0.9,
                "batch_size": 128 if full else 64, "weight_decay": 5e-4, "width": 64}
    return {
        "model": "cnn",
        "lr": ParamSpec(type="loguniform", low=0.005, high=0.2),
        "momentum": ParamSpec(type="uniform", low=0.8, high=0.95),
        "batch_size": ParamSpec(type="choice", values=[64, 128] if full else [32, 64]),
        "weight_decay": ParamSpec(type="loguniform", low=1e-5, high=1e-3),
        "width": ParamSpec(type="choice", values=[32, 48, 64] if full else [8, 16]),
        "hidden": 128 if full else 64,
    }


def _recorder() -> Any:
    """Driver-side Tune callback: every result's wall time, trial and accuracy, in order."""
    from ray.tune import Callback

    class Recorder(Callback):
        def __init__(self) -> None:
            self.events: list[dict[str, Any]] = []

        def on_trial_result(self, iteration, trials, trial, result, **info):
            self.events.append({"t": time.perf_counter(), "trial_id": trial.trial_id,
                                "epoch": int(result.get("epoch", 0)),
                                "time_this_iter_s": float(result.get("time_this_iter_s", 0.0)),
                                "mean_accuracy": float(result.get("mean_accuracy", float("nan"))),
                                "restored": (str(result.get("restored_from", "")),
                                             int(result.get("restored_epoch", 0)))})

    return Recorder()


def _measure_run(run: Run, data: dict[str, Any], test: tuple, root: str, full: bool, seed: int) -> dict[str, Any]:
    import pyarrow.fs as pafs

    from tuning_core.config import Resources, SchedulerOptions, TuneConfig
    from tuning_core.runner import run_tuning
    from tuning_core.trainables.torch import evaluate, load_checkpoint_model, train_fashion

    resources = Resources(cpu=run.cpus, gpu=run.gpus)
    options = SchedulerOptions(grace_period=1, reduction_factor=3, perturbation_interval=3 if full else 1,
                               quantile_fraction=0.25)
    cfg = TuneConfig(search="random", scheduler=run.scheduler, scheduler_options=options, metric="mean_accuracy",
                     mode="max", num_samples=run.trials, max_iterations=run.epochs, checkpoint_every=1,
                     max_concurrent_trials=run.concurrency, resources=resources, seed=seed,
                     max_failures=0)
    rec = _recorder()
    t0 = time.perf_counter()
    result = run_tuning(train_fashion, data, _space(run.model, full), cfg, pafs.LocalFileSystem(),
                        f"{root}/ray", run.name.replace("+", "-"), callbacks=[rec])
    wall = time.perf_counter() - t0
    epochs = len(rec.events)
    epoch_cpu_s = [e["time_this_iter_s"] * resources.cpu for e in rec.events]
    first = [e["mean_accuracy"] for e in rec.events if e["epoch"] == 1 and not math.isnan(e["mean_accuracy"])]
    # A PBT exploit shows as a trial restarting from another trial's checkpoint (see train_fashion).
    exploits = {(e["trial_id"], *e["restored"]) for e in rec.events if e["restored"][0] not in ("", e["trial_id"])}
    test_acc = None
    if result.best_checkpoint_uri:
        model = load_checkpoint_model(Path(result.best_checkpoint_uri), result.best_config)
        test_acc = evaluate(model, test)["accuracy"]
    return {
        "model": run.model, "scheduler": run.scheduler, "search": "random", "trials": len(result.trials),
        "max_epochs": run.epochs, "cpus_per_trial": resources.cpu, "gpus_per_trial": resources.gpu,
        "trial_epochs": epochs, "wall_s": r(wall, 2),
        "cpu_s_per_trial_epoch": r(sum(epoch_cpu_s) / max(1, len(epoch_cpu_s)), 3),
        "errored_trials": sum(t.status == "ERROR" for t in result.trials), "pbt_exploits": len(exploits),
        "best_valid_accuracy": r(result.best_metric, 4),
        "best_valid_accuracy_epoch1": r(max(first), 4) if first else None,
        "test_accuracy_best_checkpoint": r(test_acc, 4),
        "best_config": {k: v for k, v in result.best_config.items() if not k.startswith("_")},
    }


def tile_to_full_size(sample: Path, dest: Path) -> Path:
    """Write IDX files holding the sample's images repeated to the official 60,000 / 10,000 counts."""
    import numpy as np
    import pyarrow.fs as pafs

    from tuning_core.data import idx

    fs = pafs.LocalFileSystem()
    _, paths = idx.locate_files(fs, str(sample))
    dest.mkdir(parents=True, exist_ok=True)
    for split, role, n in (("train", "train", 60_000), ("t10k", "test", 10_000)):
        images, labels = idx.read_idx(fs, paths[f"{role}_images"]), idx.read_idx(fs, paths[f"{role}_labels"])
        reps = -(-n // len(labels))
        images, labels = np.tile(images, (reps, 1, 1))[:n], np.tile(labels, reps)[:n]
        rows, cols = images.shape[1:]
        (dest / f"{split}-images-idx3-ubyte").write_bytes(
            np.array([idx.IMAGES_MAGIC, n, rows, cols], ">u4").tobytes() + images.astype(np.uint8).tobytes())
        (dest / f"{split}-labels-idx1-ubyte").write_bytes(
            np.array([idx.LABELS_MAGIC, n], ">u4").tobytes() + labels.astype(np.uint8).tobytes())
    return dest


def prepare_splits(data_dir: Path, root: str, seed: int = 0, stand_in: bool = False) -> tuple[Any, dict[str, Any]]:
    """A data version of ``data_dir`` (tiled to full size first with ``stand_in``) under ``root``, and
    its normalised train/valid/test splits."""
    import pyarrow.fs as pafs

    from tuning_core.config import FashionData
    from tuning_core.data import idx

    fs = pafs.LocalFileSystem()
    if stand_in:
        data_dir = tile_to_full_size(data_dir, Path(root) / "stand-in")
    version = idx.prepare(FashionData(source=str(data_dir), seed=seed), fs, str(data_dir), fs, root)
    return version, {s: idx.load_split(fs, version.path, s) for s in ("train", "valid", "test")}


def measure(data_dir: Path, full: bool = False, seed: int = 0, stand_in: bool = False) -> dict[str, Any]:
    """Prepare the data and run every configuration; returns the ``fashion_mnist`` section."""
    import ray

    quiet_env()
    root = tempfile.mkdtemp(prefix="tunepipe-bench-fashion-")
    try:
        t0 = time.perf_counter()
        version, splits = prepare_splits(data_dir, root, seed, stand_in)
        prepare_s = time.perf_counter() - t0
        print(f"prepared {version.rows} images in {prepare_s:.1f} s", flush=True)
        num_cpus = os.cpu_count() if full else 2
        t0 = time.perf_counter()
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
        ray_init_s = time.perf_counter() - t0
        try:
            runs = {}
            for run in GPU_RUNS if full else CPU_RUNS:
                runs[run.name] = res = _measure_run(run, {"train": splits["train"], "valid": splits["valid"]},
                                                    splits["test"], root, full, seed)
                # One line per run as it ends: a long GPU run that is cut short still shows what it did.
                print(f"{run.name}: {res['trials']} trials, {res['trial_epochs']} trial-epochs in {res['wall_s']} s, "
                      f"best valid {res['best_valid_accuracy']}, test {res['test_accuracy_best_checkpoint']}",
                      flush=True)
        finally:
            ray.shutdown()
        return {"data": {"source": str(data_dir), "version": version.version, "rows": version.rows,
                         "stand_in": STAND_IN_NOTE if stand_in else None},
                "device": "gpu" if full else "cpu", "ray_num_cpus": num_cpus,
                "prepare_s": r(prepare_s, 2), "ray_init_s": r(ray_init_s, 2), "runs": runs,
                "ratios": _ratios(runs)}
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _ratios(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    base = runs[BASELINE]
    out: dict[str, Any] = {}
    for name, res in runs.items():
        if name == BASELINE:
            continue
        out[name] = {
            "wall_over_baseline": r(res["wall_s"] / base["wall_s"], 3),
            "cpu_s_per_epoch_over_baseline": r(res["cpu_s_per_trial_epoch"] / base["cpu_s_per_trial_epoch"], 2),
            "valid_accuracy_minus_baseline": r(res["best_valid_accuracy"] - base["best_valid_accuracy"], 4),
            "test_accuracy_minus_baseline": (r(res["test_accuracy_best_checkpoint"]
                                               - base["test_accuracy_best_checkpoint"], 4)
                                             if res["test_accuracy_best_checkpoint"] is not None
                                             and base["test_accuracy_best_checkpoint"] is not None else None),
        }
    return out


def show(res: dict[str, Any]) -> None:
    d = res["data"]
    gpu = res.get("environment", {}).get("gpu")
    print(f"data: {d['rows']} images ({d['source']}), device {res['device']}{f' ({gpu})' if gpu else ''}, "
          f"Ray {res['ray_num_cpus']} CPUs (init {res['ray_init_s']} s, not counted)")
    if d.get("stand_in"):
        print(f"STAND-IN DATA: {d['stand_in']}")
    head = (f"{'run':<15}{'trials':>7}{'epochs':>7}{'wall s':>9}{'CPU-s/ep':>9}{'valid@1':>9}"
            f"{'valid':>8}{'test':>8}{'wall x':>8}{'CPU-s/ep x':>11}{'exploits':>9}{'errors':>7}")
    print(head)
    print("-" * len(head))
    for name, x in res["runs"].items():
        ratio = res["ratios"].get(name, {"wall_over_baseline": 1.0, "cpu_s_per_epoch_over_baseline": 1.0})
        print(f"{name:<15}{x['trials']:>7}{x['trial_epochs']:>7}{x['wall_s']:>9.1f}{x['cpu_s_per_trial_epoch']:>9.2f}"
              f"{_fmt(x['best_valid_accuracy_epoch1']):>9}{_fmt(x['best_valid_accuracy']):>8}"
              f"{_fmt(x['test_accuracy_best_checkpoint']):>8}{ratio['wall_over_baseline']:>8.2f}"
              f"{ratio['cpu_s_per_epoch_over_baseline']:>11.1f}{x['pbt_exploits']:>9}{x['errored_trials']:>7}")
    print(f"load average at the end: {res.get('environment', {}).get('loadavg_1_5_15')}")
    print(f"(ratios against {BASELINE}; valid@1 = best validation accuracy after one epoch; test = best "
          "trial's best checkpoint on the test split)")
    resnet = next((v for k, v in res["ratios"].items() if k.startswith("resnet18")), None)
    if resnet:
        print(f"ratio={resnet['cpu_s_per_epoch_over_baseline']}")


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=SAMPLE, help="folder or torchvision root with the IDX files")
    p.add_argument("--full-gpu", action="store_true", help="GPU budgets (see the module docstring)")
    p.add_argument("--stand-in", action="store_true",
                   help="tile --data (the 2k sample) to the full data set's size: timing only (see above)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write {'fashion_mnist': ...} as JSON here")
    a = p.parse_args(argv)
    res = measure(a.data, full=a.full_gpu, seed=a.seed, stand_in=a.stand_in)
    return finish("fashion_mnist", res, a.out, show)


if __name__ == "__main__":
    main()
