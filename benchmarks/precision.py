"""bfloat16 autocast against float32 for the FashionMNIST models, side by side in one process.

    python -m benchmarks.precision [--data DIR] [--stand-in] [--epochs 3] [--models cnn resnet18]
                                   [--batch-size 128] [--out FILE.json]

For each model, the same config is trained with ``precision: fp32`` and ``precision: bf16`` by
``tuning_core.trainables.torch.fit_final`` (the pipeline's final fit: the same epoch loop as a
trial) on the train+valid images, on the GPU when there is one. Each pair first runs one warm-up
epoch on 2,048 images (CUDA context, cuDNN autotuning; not timed). Printed per model: seconds per
epoch for each precision, the speed-up ``fp32 s/epoch / bf16 s/epoch`` and the test accuracy of
each (same seed, so the two differ only by precision). The last line is ``speedup=<resnet18 or
the last model>``.

On a CPU, bf16 autocast is usually slower than float32 (no bf16 matrix units on most CPUs); the
option is meant for GPUs. ``--stand-in`` tiles the 2k sample to the official 60,000 / 10,000
images (timing only; see ``benchmarks.fashion_mnist``).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import finish, quiet_env, r
from benchmarks.fashion_mnist import SAMPLE, prepare_splits

CONFIG = {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-4, "batch_size": 128, "width": 32}


def measure(data_dir: Path, models: list[str], epochs: int, stand_in: bool = False, seed: int = 0,
            batch_size: int = CONFIG["batch_size"]) -> dict[str, Any]:
    import numpy as np
    import torch

    from tuning_core.trainables.torch import evaluate, fit_final

    quiet_env()
    root = tempfile.mkdtemp(prefix="tunepipe-bench-precision-")
    try:
        version, s = prepare_splits(data_dir, root, seed, stand_in)
        print(f"prepared {version.rows} images", flush=True)
        full = (np.concatenate([s["train"][0], s["valid"][0]]), np.concatenate([s["train"][1], s["valid"][1]]))
        warm = (full[0][:2048], full[1][:2048])
        out: dict[str, Any] = {"data": {"version": version.version, "rows": version.rows, "stand_in": stand_in},
                               "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
                               "epochs": epochs, "config": {**CONFIG, "batch_size": batch_size}, "models": {}}
        for model in models:
            res: dict[str, Any] = {}
            for precision in ("fp32", "bf16"):
                cfg = {**CONFIG, "batch_size": batch_size, "model": model, "precision": precision}
                fit_final(cfg, warm, 1, seed=seed)
                t0 = time.perf_counter()
                trained = fit_final(cfg, full, epochs, seed=seed)  # returns a CPU model: the GPU is done
                wall = time.perf_counter() - t0
                # Scored on the training device (a ResNet-18 on 10,000 images is slow on a CPU), in float32.
                scored = trained.to("cuda") if torch.cuda.is_available() else trained
                res[precision] = {"s_per_epoch": r(wall / epochs, 3),
                                  "test_accuracy": r(evaluate(scored, s["test"])["accuracy"], 4)}
                print(f"{model} {precision}: {wall / epochs:.2f} s/epoch, test accuracy "
                      f"{res[precision]['test_accuracy']}", flush=True)
            res["speedup_bf16"] = r(res["fp32"]["s_per_epoch"] / res["bf16"]["s_per_epoch"], 3)
            res["accuracy_bf16_minus_fp32"] = r(res["bf16"]["test_accuracy"] - res["fp32"]["test_accuracy"], 4)
            out["models"][model] = res
        return out
    finally:
        shutil.rmtree(root, ignore_errors=True)


def show(res: dict[str, Any]) -> None:
    print(f"device: {res['device']}; {res['data']['rows']} images{' (stand-in)' if res['data']['stand_in'] else ''}; "
          f"{res['epochs']} epochs per run, batch size {res['config']['batch_size']}")
    for model, m in res["models"].items():
        print(f"{model}: fp32 {m['fp32']['s_per_epoch']} s/epoch (test {m['fp32']['test_accuracy']}), bf16 "
              f"{m['bf16']['s_per_epoch']} s/epoch (test {m['bf16']['test_accuracy']}); speed-up "
              f"{m['speedup_bf16']}, accuracy difference {m['accuracy_bf16_minus_fp32']:+}")
    last = res["models"].get("resnet18") or list(res["models"].values())[-1]
    print(f"speedup={last['speedup_bf16']}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=SAMPLE, help="folder with the IDX files (default: 2k sample)")
    p.add_argument("--stand-in", action="store_true", help="tile the data to 60,000 / 10,000 images (timing only)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--models", nargs="+", default=["cnn", "resnet18"], choices=["cnn", "resnet18"])
    p.add_argument("--batch-size", type=int, default=CONFIG["batch_size"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write {'precision': ...} as JSON here")
    a = p.parse_args(argv)
    res = measure(a.data, a.models, a.epochs, a.stand_in, a.seed, a.batch_size)
    return finish("precision", res, a.out, show)


if __name__ == "__main__":
    main()
