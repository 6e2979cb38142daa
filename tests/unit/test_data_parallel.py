"""Data-parallel trials (``tune.resources.workers_per_trial`` > 1): every trial is a Ray Train run of
XGBoost workers, each on its own shard of the data version's parquet splits.

Real parts: the session's local Ray (2 CPUs), Ray Train's XGBoost trainer (2 workers), Ray Data over a
small real flights version (4,000 labelled rows of the ASA 2008 sample) in a tmp folder. Budgets are
tiny: these tests check the plumbing (reports, checkpoints, schedulers, shards, resume), not models.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import pytest

from tests.conftest import ASA_SAMPLE, ROOT
from tuning_core.config import FlightsData, TuneConfig, build_config
from tuning_core.data import flights
from tuning_core.errors import ConfigError
from tuning_core.runner import run_tuning
from tuning_core.trainables.xgboost import MODEL_FILE

# Each test starts Ray Train runs (10-20 s each on 2 CPUs): run once, under `make test`, not again under 3.13.
pytestmark = pytest.mark.slow

LOCAL = pafs.LocalFileSystem()
SPACE: dict[str, Any] = {"max_depth": {"type": "randint", "low": 2, "high": 5},
                         "eta": {"type": "loguniform", "low": 0.05, "high": 0.5}, "tree_method": "hist"}


def dp_cfg(**kw: Any) -> TuneConfig:
    base = {"search": "random", "scheduler": "fifo", "num_samples": 1, "max_iterations": 20, "checkpoint_every": 10,
            "space": SPACE, "max_failures": 1, "resources": {"workers_per_trial": 2, "cpu_per_worker": 1}}
    return build_config(TuneConfig, {**base, **kw})


@pytest.fixture(scope="module")
def version(tmp_path_factory) -> Any:
    root = tmp_path_factory.mktemp("store")
    return flights.prepare(FlightsData(source=str(ASA_SAMPLE), max_rows=4000), LOCAL, str(ASA_SAMPLE), LOCAL,
                           str(root))


def tune_inputs(version: Any, cfg: TuneConfig) -> tuple[Any, dict[str, Any]]:
    """The flights workload's trainable and trial data for ``cfg``, as the tune stage builds them."""
    from tuning_core.workloads.base import Splits
    from tuning_core.workloads.flights import WORKLOAD, FlightsPipeline

    pipeline = FlightsPipeline(tune=cfg)
    never = Splits(lambda name: pytest.fail(f"the driver loaded split {name}"), ("train", "valid"), LOCAL)
    return WORKLOAD.trainable(pipeline), WORKLOAD.tune_data(pipeline, version, never)


def trial_results(exp_dir: Path, trial_id: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (exp_dir / f"trial_{trial_id}" / "result.json").read_text().splitlines()]


def test_asha_stops_the_worse_trial_and_every_worker_reads_only_its_shard(ray_local, version, tmp_path):
    import xgboost as xgb

    # The second (poor) configuration meets the first at the grace rung: top-k with eta 2 keeps one.
    cfg = dp_cfg(scheduler="asha", num_samples=2, scheduler_options={"grace_period": 2, "reduction_factor": 2},
                 points_to_evaluate=[{"max_depth": 4, "eta": 0.3}, {"max_depth": 2, "eta": 0.0501}])
    trainable, data = tune_inputs(version, cfg)
    assert trainable.__name__ == "train_xgboost_distributed"
    result = run_tuning(trainable, data, cfg.space, cfg, LOCAL, str(tmp_path / "ray"), "dp-asha")
    exp_dir = Path(result.experiment_uri)
    by_iters = sorted(result.trials, key=lambda t: t.iterations)
    assert by_iters[0].iterations < 20 <= by_iters[1].iterations  # ASHA stopped one
    for trial in result.trials:
        # Every boosting round is in the history, although the workers reported only at rungs and the end.
        assert [h["training_iteration"] for h in trial.history] == list(range(1, trial.iterations + 1))
        assert "auc" in trial.metrics and "logloss" in trial.metrics
        for row in trial_results(exp_dir, trial.trial_id):
            workers = row["workers"]
            assert [w["rank"] for w in workers] == [0, 1]
            for split in ("train", "valid"):
                rows = [w[f"{split}_rows"] for w in workers]
                assert sum(rows) == version.rows[split], (split, rows)  # none dropped, none twice
                assert all(0 < n < version.rows[split] for n in rows)
        # The Train run's own folder (checkpoints already copied by Tune) is gone, stopped trial's too.
        assert not (exp_dir / f"trial_{trial.trial_id}" / "train").exists()
    best = max(result.trials, key=lambda t: t.iterations)
    ckpt = Path(best.checkpoint_uri)
    assert xgb.Booster(model_file=str(ckpt / MODEL_FILE)).num_boosted_rounds() == 20


# Two configurations whose logloss differs from the first round on, whatever the data: eta 0.5 moves the
# prediction away from the base score ten times faster than eta 0.05.
GOOD, POOR = {"max_depth": 4, "eta": 0.5}, {"max_depth": 2, "eta": 0.05}


def test_median_stopping_stops_a_data_parallel_trial_below_the_median(ray_local, version, tmp_path):
    """Median stopping (grace 2, 2 samples needed), one trial at a time (2 workers x 1 CPU): the two good
    trials finish first; the poor third is stopped at the grace period, its logloss above their median."""
    cfg = dp_cfg(scheduler="median", num_samples=3, max_iterations=4, metric="logloss", mode="min",
                 scheduler_options={"grace_period": 2}, points_to_evaluate=[GOOD, {**GOOD, "max_depth": 3}, POOR])
    trainable, data = tune_inputs(version, cfg)
    result = run_tuning(trainable, data, cfg.space, cfg, LOCAL, str(tmp_path / "ray"), "dp-median")
    iterations = sorted((round(t.config["eta"], 2), t.iterations) for t in result.trials)
    assert iterations == [(0.05, 2), (0.5, 4), (0.5, 4)], iterations
    for t in result.trials:
        assert [h["training_iteration"] for h in t.history] == list(range(1, t.iterations + 1))


def test_hyperband_stops_the_poor_data_parallel_trial_as_with_one_worker(ray_local, version, tmp_path, caplog):
    """The one-worker test's run (test_runner: max_t 4, eta 4, HyperOpt, the poor configuration last) with
    two workers a trial, where the workers fit one trial at a time: all four trials start at once (a cap
    would let them out one by one into a bracket that never halves), three wait for workers, and HyperBand
    halves the second bracket at round 1, where the poor configuration stops."""
    cfg = dp_cfg(scheduler="hyperband", search="hyperopt", num_samples=4, max_iterations=4, checkpoint_every=1,
                 metric="logloss", mode="min", scheduler_options={"reduction_factor": 4},
                 points_to_evaluate=[GOOD, GOOD, GOOD, POOR])
    trainable, data = tune_inputs(version, cfg)
    with caplog.at_level("INFO", logger="tuning_core.runner"):
        result = run_tuning(trainable, data, cfg.space, cfg, LOCAL, str(tmp_path / "ray"), "dp-hyperband")
    assert "under hyperband: all 4 start at once" in caplog.text and "trials at a time:" not in caplog.text
    iterations = sorted((round(t.config["eta"], 2), t.iterations) for t in result.trials)
    assert iterations == [(0.05, 1), (0.5, 4), (0.5, 4), (0.5, 4)], iterations
    for t in result.trials:
        assert [h["training_iteration"] for h in t.history] == list(range(1, t.iterations + 1))


def test_pbt_exploits_and_workers_continue_from_the_cloned_checkpoint(ray_local, version, tmp_path):
    import xgboost as xgb

    # 2 workers x 0.5 CPU: both trials fit the 2 CPUs side by side, as PBT's population must.
    # Paused trials' Train runs must free their CPUs (distributed.stopped_run_releaser): without it the
    # run stalled after the first exploits, a paused trial waiting for CPUs forever.
    cfg = dp_cfg(scheduler="pbt", num_samples=2, max_iterations=4, checkpoint_every=2,
                 resources={"workers_per_trial": 2, "cpu_per_worker": 0.5},
                 scheduler_options={"perturbation_interval": 2, "quantile_fraction": 0.5, "synch": True})
    trainable, data = tune_inputs(version, cfg)
    result = run_tuning(trainable, data, cfg.space, cfg, LOCAL, str(tmp_path / "ray"), "dp-pbt")
    exp_dir = Path(result.experiment_uri)
    exploits = [json.loads(line) for line in (exp_dir / "pbt_global.txt").read_text().splitlines()]
    assert exploits
    for t in result.trials:
        assert t.status == "TERMINATED" and t.iterations == 4
        assert [h["training_iteration"] for h in t.history] == list(range(1, 5))
        # An exploiting trial's workers continue from the clone's booster: rounds keep pace with iterations.
        ckpts = sorted((exp_dir / f"trial_{t.trial_id}").glob("checkpoint_*"))
        assert xgb.Booster(model_file=str(ckpts[-1] / MODEL_FILE)).num_boosted_rounds() == 4


def test_pbt_that_cannot_run_two_trials_side_by_side_is_refused(ray_local, version, tmp_path):
    cfg = dp_cfg(scheduler="pbt", num_samples=2, resources={"workers_per_trial": 2, "cpu_per_worker": 1})
    trainable, data = tune_inputs(version, cfg)
    with pytest.raises(ConfigError, match="PBT needs at least 2 side by side"):
        run_tuning(trainable, data, cfg.space, cfg, LOCAL, str(tmp_path / "ray"), "dp-pbt-refused")


def test_workers_that_do_not_fit_the_cluster_fail_before_tuning(ray_local, version, tmp_path):
    cfg = dp_cfg(resources={"workers_per_trial": 3, "cpu_per_worker": 1})
    trainable, data = tune_inputs(version, cfg)
    with pytest.raises(ConfigError, match="workers_per_trial=3 workers of cpu_per_worker=1 CPU, but the cluster"):
        run_tuning(trainable, data, cfg.space, cfg, LOCAL, str(tmp_path / "ray"), "dp-too-big")
    assert not (tmp_path / "ray" / "dp-too-big").exists()


def test_gpu_with_workers_per_trial_is_a_config_error():
    with pytest.raises(ConfigError, match="data-parallel trials run on CPU workers only"):
        dp_cfg(resources={"workers_per_trial": 2, "gpu": 1})


def failing_after_first_checkpoint(marker: str) -> Any:
    """The data-parallel trainable, failing once right after its first Tune checkpoint: the trial
    process raises, which ends its Train run; Tune's retry must resume from that checkpoint."""
    from tests.faults import fail_once
    from tuning_core.trainables import distributed
    from tuning_core.trainables.xgboost_distributed import train_xgboost_distributed

    def run(config: dict[str, Any], **data: Any) -> None:
        real = distributed._tune_report

        def report(item: dict[str, Any]) -> None:
            real(item)
            if item.get("checkpoint") is not None:
                fail_once(marker)

        distributed._tune_report = report
        try:
            return train_xgboost_distributed(config, **data)
        finally:
            distributed._tune_report = real

    run.__name__ = "failing_dp"
    return run


def seen_iterations() -> tuple[Any, list[int]]:
    """A Tune callback recording every reported iteration as the driver receives it, and that list.

    (Not the trial's result.json: Ray's logger re-copies a stale storage copy of it when a trial
    restarts, so it loses rows; the runner fills those from what it saw live, like this.)"""
    from ray.tune import Callback

    seen: list[int] = []

    class Seen(Callback):
        def on_trial_result(self, iteration, trials, trial, result, **info):
            seen.append(int(result["training_iteration"]))

    return Seen(), seen


def test_a_trial_raising_then_losing_a_worker_resumes_its_train_run_from_the_checkpoint_each_time(
        ray_local, version, tmp_path):
    """Two faults in one trial of 12 rounds, checkpointed every 4: the trial process raises right after
    its first checkpoint (round 4), which ends its Train run; later one XGBoost Train worker is SIGKILLed
    at round 8. Each time Tune restores the trial, and its new Train run continues from the last booster
    instead of boosting from round 1: every round is reported once."""
    import xgboost as xgb

    from tests.faults import train_worker_killer

    marker = tmp_path / "failed-once"
    killer, killed = train_worker_killer(at_iteration=8)
    cfg = dp_cfg(max_iterations=12, checkpoint_every=4, max_failures=2, stop_metric_threshold=1.0)
    _, data = tune_inputs(version, cfg)
    recorder, iterations = seen_iterations()
    result = run_tuning(failing_after_first_checkpoint(str(marker)), data, cfg.space, cfg, LOCAL,
                        str(tmp_path / "ray"), "dp-faults", callbacks=[killer, recorder])
    assert marker.exists() and killed, (marker.exists(), killed)
    (trial,) = result.trials
    assert trial.status == "TERMINATED" and trial.iterations == 12
    exp_dir = Path(result.experiment_uri)
    assert "injected trial failure" in (exp_dir / f"trial_{trial.trial_id}" / "error.txt").read_text()
    # Resumed after round 4's checkpoint, then after round 8's: rounds 1-12 reported once each.
    assert iterations == list(range(1, 13)), iterations
    assert [h["training_iteration"] for h in trial.history] == list(range(1, 13))
    assert xgb.Booster(model_file=str(Path(trial.checkpoint_uri) / MODEL_FILE)).num_boosted_rounds() == 12


def test_one_worker_per_trial_keeps_the_single_process_path_without_ray_train():
    code = (
        "import sys\n"
        "from tuning_core.workloads.flights import WORKLOAD, FlightsPipeline\n"
        "from tuning_core.runner import run_tuning\n"
        "import tasks.workloads\n"
        "cfg = FlightsPipeline()\n"
        "assert WORKLOAD.trainable(cfg).__name__ == 'train_xgboost'\n"
        "WORKLOAD.tune_data(cfg, type('V', (), {'version': 'v'})(), {'train': 1, 'valid': 2})\n"
        "bad = [m for m in ('ray.train.xgboost', 'ray.train.v2.xgboost', 'ray.data',\n"
        "       'tuning_core.trainables.distributed', 'tuning_core.trainables.xgboost_distributed')\n"
        "       if m in sys.modules]\n"
        "print(bad)\n"
        "sys.exit(1 if bad else 0)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_tabular_multiclass_with_a_category_tunes_and_retrains_on_two_workers(ray_local, tmp_path):
    pytest.importorskip("sklearn.datasets")
    from tests.unit.test_tabular import wine_parquet
    from tuning_core.workloads import WORKLOADS
    from tuning_core.workloads.base import Splits
    from tuning_core.workloads.tabular import TabularPipeline

    tabular = WORKLOADS["tabular"]
    cfg = TabularPipeline(data={"source": str(wine_parquet(tmp_path)), "label": "target"},
                          tune={"search": "random", "scheduler": "fifo", "num_samples": 1, "max_iterations": 6,
                                "checkpoint_every": 3, "space": SPACE,
                                "resources": {"workers_per_trial": 2, "cpu_per_worker": 1}})
    source = tabular.data_source(cfg)
    cfg = tabular.resolve(cfg, source, LOCAL)
    version = tabular.prepare(cfg, source, LOCAL, LOCAL, str(tmp_path / "store"))

    def load(name: str) -> Any:
        pytest.fail(f"the driver loaded split {name}")  # train/valid stay with the workers, test comes in parts

    parts_read: list[int] = []

    def in_parts(name: str, rows: int) -> Any:
        assert name == "test", name
        for part in tabular.load_parts(LOCAL, version, name, 7):  # 7 rows a part: the split comes in several
            parts_read.append(len(part))
            yield part

    splits = Splits(load, ("train", "valid", "test"), LOCAL,
                    head=lambda name, rows: tabular.load_head(LOCAL, version, name, rows), in_parts=in_parts)
    data = tabular.tune_data(cfg, version, splits)
    result = run_tuning(tabular.trainable(cfg), data, cfg.tune.space, cfg.tune, LOCAL, str(tmp_path / "ray"), "dp-tab")
    (trial,) = result.trials
    assert trial.iterations == 6 and "mlogloss" in trial.metrics and "merror" in trial.metrics
    final = tabular.retrain(cfg, version, result, splits, None)
    assert final.rounds >= 1 and final.test_metrics["accuracy"] > 0.8
    # Evaluated part by part, the metrics are those of the whole test split.
    assert len(parts_read) > 1 and sum(parts_read) == version.rows["test"]
    from tuning_core.retrain import predict_parts
    from tuning_core.workloads.tabular import evaluate

    label = version.manifest["label"]
    y, whole = predict_parts(tabular.load_split(LOCAL, version, "test"), final.model, label=label)
    assert final.test_metrics == pytest.approx(evaluate(version.manifest, y, whole))
    # The model record (schema, input example, lineage) takes the first rows of each split, typed as
    # load_split types them, still without the driver loading those splits.
    (tmp_path / "model").mkdir()
    spec = tabular.model_spec(cfg, version, result, final, splits, tmp_path / "model")
    assert spec.train is not None and len(spec.train.frame) == version.rows["train"] + version.rows["valid"]
    assert spec.test is not None and len(spec.test.frame) == version.rows["test"]
    import pandas as pd

    pd.testing.assert_frame_equal(tabular.load_head(LOCAL, version, "train", 7),
                                  tabular.load_split(LOCAL, version, "train").head(7))


def test_the_head_of_a_flights_split_is_typed_as_the_split(version):
    import pandas as pd

    from tuning_core.workloads.flights import WORKLOAD

    head = WORKLOAD.load_head(LOCAL, version, "valid", 100)
    pd.testing.assert_frame_equal(head, WORKLOAD.load_split(LOCAL, version, "valid").head(100))
    assert len(WORKLOAD.load_head(LOCAL, version, "test", 10 ** 9)) == version.rows["test"]
    # In parts, typed the same: the parts together are the split.
    parts = list(WORKLOAD.load_parts(LOCAL, version, "test", 128))
    assert len(parts) == -(-version.rows["test"] // 128) > 1 and max(len(p) for p in parts) == 128
    pd.testing.assert_frame_equal(pd.concat(parts, ignore_index=True), WORKLOAD.load_split(LOCAL, version, "test"))


def test_splits_head_uses_the_head_loader_until_the_split_is_loaded_and_cuts_image_tuples():
    import numpy as np

    from tuning_core.workloads.base import Splits

    heads: list[tuple[str, int]] = []
    splits = Splits(lambda name: (np.arange(10), np.arange(10) * 2), ("train",),
                    head=lambda name, rows: heads.append((name, rows)) or "from the head loader")
    assert splits.head("train", 3) == "from the head loader" and heads == [("train", 3)]
    splits["train"]  # loaded now: cut from it, both arrays of the (images, labels) pair
    images, labels = splits.head("train", 3)
    assert list(images) == [0, 1, 2] and list(labels) == [0, 2, 4] and heads == [("train", 3)]
    with pytest.raises(KeyError):
        splits.head("valid", 3)
