"""Run one tuning experiment in a separate process, on its own local Ray, so a test can SIGKILL it.

Used by ``test_runner.test_resume_after_sigkill_keeps_finished_trials``:

    python -m tests.unit._tune_child <spec.json>

The spec names the data version, the TuneConfig (as a dict), the space, the storage path, the
experiment name and a progress file; every ``progress`` event is appended to that file as one
JSON line. The process is meant to be killed; if it is not, it exits 0 when the run ends.
"""

from __future__ import annotations

import json
import logging
import os
import sys

import pyarrow.fs as pafs


def main(spec_path: str) -> int:
    import ray

    from tuning_core.config import TuneConfig, build_config
    from tuning_core.data import flights
    from tuning_core.runner import run_tuning
    from tuning_core.trainables.xgboost import train_xgboost

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    with open(spec_path) as f:
        spec = json.load(f)
    fs = pafs.LocalFileSystem()
    data = {split: flights.load_split(fs, spec["version_path"], split) for split in ("train", "valid")}
    cfg = build_config(TuneConfig, spec["tune"])

    def progress(event: dict) -> None:
        with open(spec["progress_file"], "a") as out:
            out.write(json.dumps(event) + "\n")

    # address="local": always a fresh cluster of our own, never the test session's (or any `ray start`
    # head that /tmp/ray/ray_current_cluster points to); it dies with this process group.
    os.environ.pop("RAY_ADDRESS", None)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    result = run_tuning(train_xgboost, data, cfg.space, cfg, fs, spec["storage_path"], spec["name"],
                        progress=progress)
    logging.getLogger(__name__).info("child run finished: %d trials", result.num_trials)
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
