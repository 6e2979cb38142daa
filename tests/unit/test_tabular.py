"""The tabular workload on small real tables that scikit-learn ships (written to CSV/Parquet here): one test per
task through the workload's own functions (resolve, prepare, load, retrain, evaluate, the served model's code),
and one `tunepipe run tabular` end to end that registers a model and predicts on raw rows from MLflow."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pyarrow.fs as pafs
import pytest

from tuning_core.results import TuningResult
from tuning_core.workloads import WORKLOADS
from tuning_core.workloads.tabular import TabularPipeline

sklearn_datasets = pytest.importorskip("sklearn.datasets")

LOCAL = pafs.LocalFileSystem()
TABULAR = WORKLOADS["tabular"]


# --------------------------------------------------------------------------- tables
def breast_cancer_csv(tmp: Path) -> Path:
    """Binary, the label as class names (strings)."""
    data = sklearn_datasets.load_breast_cancer(as_frame=True)
    frame = data.frame.rename(columns=lambda c: c.replace(" ", "_"))
    frame["diagnosis"] = np.asarray(data.target_names)[frame.pop("target")]
    path = tmp / "breast_cancer.csv"
    frame.to_csv(path, index=False)
    return path


def wine_parquet(tmp: Path) -> Path:
    """Multiclass (three whole-number classes), with a string column that becomes a category."""
    frame = sklearn_datasets.load_wine(as_frame=True).frame
    frame["colour_band"] = pd.cut(frame["color_intensity"], [0, 3, 6, 20], labels=["pale", "mid", "deep"]).astype(str)
    path = tmp / "wine.parquet"
    frame.to_parquet(path, index=False)
    return path


def diabetes_csv(tmp: Path) -> Path:
    """Regression, with a visit date to split on by time."""
    frame = sklearn_datasets.load_diabetes(as_frame=True, scaled=False).frame
    frame["visit"] = pd.date_range("2020-01-01", periods=len(frame), freq="D").strftime("%Y-%m-%d")
    path = tmp / "diabetes.csv"
    frame.to_csv(path, index=False)
    return path


def _tuning(best_iteration: int = 30) -> TuningResult:
    return TuningResult(experiment_name="e", experiment_uri="e", search="random", scheduler="fifo", metric="m",
                        mode="max", num_trials=1, best_trial_id="t", best_config={"max_depth": 3, "eta": 0.2},
                        best_metric=0.0, best_iteration=best_iteration, best_checkpoint_uri=None, resumed=False,
                        wall_time_s=0.0, trials=[])


def _served(model_spec) -> object:
    """The model's own code (infra/model_code), loaded as MLflow would, without MLflow's packaging."""
    path = Path(__file__).resolve().parents[2] / "infra" / "model_code" / model_spec.code
    spec = importlib.util.spec_from_file_location("tabular_model_code_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.TabularModel()
    model.load_context(SimpleNamespace(artifacts=model_spec.artifacts))
    return model


def _through_the_workload(tmp_path: Path, data: dict) -> tuple:
    """resolve → prepare → load → retrain → model spec: (cfg, version, splits, final model, served model)."""
    cfg = TabularPipeline(data=data)
    source = TABULAR.data_source(cfg)
    cfg = TABULAR.resolve(cfg, source, LOCAL)
    TABULAR.check_data(cfg, source, LOCAL)
    version = TABULAR.prepare(cfg, source, LOCAL, LOCAL, str(tmp_path / "store"))
    splits = {s: TABULAR.load_split(LOCAL, version, s) for s in ("train", "valid", "test")}
    final = TABULAR.retrain(cfg, version, _tuning(), splits, None)
    folder = tmp_path / "model"
    folder.mkdir()
    spec = TABULAR.model_spec(cfg, version, _tuning(), final, splits, folder)
    return cfg, version, splits, final, spec, _served(spec)


# --------------------------------------------------------------------------- one test per task
def test_binary_string_label_is_detected_tuned_on_auc_and_served_as_class_names(tmp_path):
    cfg, version, splits, final, spec, model = _through_the_workload(
        tmp_path, {"source": str(breast_cancer_csv(tmp_path)), "label": "diagnosis"})
    assert cfg.data.task == "binary" and (cfg.tune.metric, cfg.tune.mode) == ("auc", "max")
    assert (cfg.registry.metric, cfg.registry.mode) == ("auc", "max")
    assert TABULAR.reported_metrics(cfg) == ("auc", "logloss", "error")
    assert version.manifest["classes"] == ["benign", "malignant"]
    assert sum(version.rows.values()) == 569 and set(splits["train"]["diagnosis"]) == {0, 1}
    assert final.test_metrics["auc"] > 0.95
    raw = pd.read_csv(breast_cancer_csv(tmp_path)).head(40)  # raw records: the label column is ignored
    out = model.predict(None, raw.to_dict(orient="records"))
    assert list(out.columns) == ["label", "probability"] and set(out["label"]) <= {"benign", "malignant"}
    assert (out["label"] == raw["diagnosis"]).mean() > 0.85
    assert spec.outputs == {"columns": [("label", "string"), ("probability", "double")]}


def test_multiclass_whole_numbers_with_a_category_column_on_parquet(tmp_path):
    cfg, version, splits, final, spec, model = _through_the_workload(
        tmp_path, {"source": str(wine_parquet(tmp_path)), "label": "target"})
    assert cfg.data.task == "multiclass" and (cfg.tune.metric, cfg.tune.mode) == ("mlogloss", "min")
    assert (cfg.registry.metric, cfg.registry.mode) == ("logloss", "min")
    assert version.manifest["classes"] == [0, 1, 2]
    assert version.manifest["features"]["colour_band"] == "category"
    assert isinstance(splits["train"]["colour_band"].dtype, pd.CategoricalDtype)
    assert TABULAR.booster_task(version.manifest) == {"objective": "multi:softprob",
                                                      "eval_metric": ["mlogloss", "merror"], "num_class": 3}
    assert final.test_metrics["accuracy"] > 0.8
    raw = pd.read_parquet(wine_parquet(tmp_path))
    out = model.predict(None, raw.drop(columns=["target"]))
    assert list(out.columns) == ["label", "probability_0", "probability_1", "probability_2"]
    assert np.allclose(out.filter(like="probability_").sum(axis=1), 1.0, atol=1e-5)
    assert (out["label"] == raw["target"]).mean() > 0.85
    predictor = SimpleNamespace(predict=lambda rows: model.predict(None, rows))
    metrics = TABULAR.score(predictor, version, splits["test"])
    assert metrics["logloss"] == pytest.approx(final.test_metrics["logloss"], rel=1e-4)
    # The champion's re-evaluation reads the test split in parts (load_parts): the same metrics.
    in_parts = TABULAR.load_parts(LOCAL, version, "test", 5)
    assert TABULAR.score(predictor, version, in_parts) == pytest.approx(metrics)


def test_regression_split_by_time_keeps_the_latest_rows_for_test(tmp_path):
    cfg, version, splits, final, spec, model = _through_the_workload(
        tmp_path, {"source": str(diabetes_csv(tmp_path)), "label": "target", "split": "time", "time_column": "visit"})
    assert cfg.data.task == "regression" and (cfg.tune.metric, cfg.tune.mode) == ("rmse", "min")
    assert "visit" not in version.manifest["features"]  # the time stamp orders the split; it is no feature
    raw = pd.read_csv(diabetes_csv(tmp_path))
    assert splits["test"]["target"].tolist() == raw["target"].tail(len(splits["test"])).astype(float).tolist()
    assert final.test_metrics["rmse"] < raw["target"].std() and final.test_metrics["r2"] > 0.1
    out = model.predict(None, raw.head(10).to_dict(orient="list"))
    assert list(out.columns) == ["prediction"] and len(out) == 10
    with pytest.raises(Exception, match="column 'bmi': 'heavy' is not a number"):
        model.predict(None, {**raw.iloc[0].to_dict(), "bmi": "heavy"})
    with pytest.raises(Exception, match=r"missing columns \['age'\]"):
        model.predict(None, raw.drop(columns=["age"]).head(2))


def test_an_identifier_column_is_left_out_of_the_features_and_named(tmp_path, caplog):
    """A string column with a distinct value per row (an order id) is no category: left out, named in the
    manifest and the log; a string column of few values stays a category; max_unique_fraction 1 keeps it."""
    frame = pd.read_csv(breast_cancer_csv(tmp_path))
    frame["order_id"] = [f"ORD-{i:06d}" for i in range(len(frame))]
    frame["size_band"] = np.where(frame["mean_radius"] > 14, "large", "small")
    path = tmp_path / "orders.csv"
    frame.to_csv(path, index=False)
    versions = {}
    for fraction in (0.5, 1.0):
        cfg = TabularPipeline(data={"source": str(path), "label": "diagnosis", "max_unique_fraction": fraction})
        source = TABULAR.data_source(cfg)
        cfg = TABULAR.resolve(cfg, source, LOCAL)
        with caplog.at_level("WARNING", logger="tuning_core.data.tabular"):
            versions[fraction] = TABULAR.prepare(cfg, source, LOCAL, LOCAL, str(tmp_path / "store"))
    dropped, kept = versions[0.5].manifest, versions[1.0].manifest
    assert "order_id" not in dropped["features"] and dropped["identifier_columns"] == {"order_id": len(frame)}
    assert dropped["features"]["size_band"] == "category"
    assert "['order_id'] look like identifiers" in caplog.text
    assert kept["features"]["order_id"] == "category" and kept["identifier_columns"] == {}
    assert versions[0.5].version != versions[1.0].version


def test_same_table_same_version_and_a_stated_task_wins(tmp_path):
    path = str(wine_parquet(tmp_path))
    cfg = TabularPipeline(data={"source": path, "label": "target", "task": "regression"})
    source = TABULAR.data_source(cfg)
    cfg = TABULAR.resolve(cfg, source, LOCAL)
    assert cfg.data.task == "regression" and cfg.tune.metric == "rmse"
    first = TABULAR.prepare(cfg, source, LOCAL, LOCAL, str(tmp_path / "store"))
    again = TABULAR.prepare(cfg, source, LOCAL, LOCAL, str(tmp_path / "store"))
    assert first.version == again.version and first.manifest["task"] == "regression"
    assert TABULAR.resolve(cfg, source, LOCAL) == cfg  # resolved once, resolved for good
    # `tunepipe prepare` (task auto) and a run (the task resolved from the label) write one version.
    auto = TabularPipeline(data={"source": path, "label": "target"})
    resolved = TABULAR.resolve(auto, source, LOCAL)
    assert resolved.data.task == "multiclass"
    assert TABULAR.prepare(auto, source, LOCAL, LOCAL, str(tmp_path / "store")).version == \
        TABULAR.prepare(resolved, source, LOCAL, LOCAL, str(tmp_path / "store")).version


def test_an_s3_prefix_of_csv_and_parquet_files_reads_as_one_table(tmp_path, s3_settings):
    """Files under an s3:// prefix (moto), one CSV and one Parquet part: the same version as the table read
    locally from a folder holding the same parts."""
    from infra.storage import boto3_client, source_filesystem

    frame = pd.read_csv(breast_cancer_csv(tmp_path))
    parts = tmp_path / "parts"
    parts.mkdir()
    frame.iloc[:300].to_csv(parts / "a.csv", index=False)
    frame.iloc[300:].to_parquet(parts / "b.parquet", index=False)
    bucket = s3_settings.storage.removeprefix("s3://").split("/")[0]
    for part in ("a.csv", "b.parquet"):
        boto3_client(s3_settings).upload_file(str(parts / part), bucket, f"tables/cancer/{part}")
    versions = []
    for where in (f"s3://{bucket}/tables/cancer", str(parts)):
        cfg = TabularPipeline(data={"source": where, "label": "diagnosis"})
        source = TABULAR.data_source(cfg)
        source_fs = source_filesystem(source, s3_settings)
        cfg = TABULAR.resolve(cfg, source, source_fs)
        assert cfg.data.task == "binary" and source.is_s3 == where.startswith("s3://")
        versions.append(TABULAR.prepare(cfg, source, source_fs, LOCAL, str(tmp_path / "store")))
    assert versions[0].version == versions[1].version and sum(versions[0].rows.values()) == 569
    assert versions[0].manifest["source"] == f"s3://{bucket}/tables/cancer"


# --------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_run_tabular_registers_a_model_that_predicts_on_raw_rows(tmp_path, local_settings, prefect_harness,
                                                                ray_local, restore_mlflow_uris):
    import mlflow
    from typer.testing import CliRunner

    import flows.workloads  # noqa: F401 - Prefect binds its log handlers at import, not inside CliRunner
    from flows.cli import app

    path = breast_cancer_csv(tmp_path)
    summary = tmp_path / "summary.json"
    result = CliRunner().invoke(app, ["run", "tabular", "--data", str(path), "--label", "diagnosis",
                                      "--num-samples", "2", "--max-iterations", "6", "--search", "random",
                                      "--scheduler", "fifo", "--model-name", "tabular-e2e",
                                      "--summary-json", str(summary)])
    assert result.exit_code == 0, (result.output, result.exception)
    done = json.loads(summary.read_text())
    assert done["workload"] == "tabular" and done["tuning"]["num_trials"] == 2
    assert done["tuning"]["best_metric"]["name"] == "auc" and done["registry"]["aliases"] == ["champion"]
    model = mlflow.pyfunc.load_model("models:/tabular-e2e@champion")
    raw = pd.read_csv(path).head(25)
    out = model.predict(raw.to_dict(orient="records"))
    assert len(out) == 25 and out["probability"].between(0, 1).all()
    assert set(out["label"]) <= {"benign", "malignant"}
    version = mlflow.MlflowClient().get_model_version_by_alias("tabular-e2e", "champion")
    assert version.tags["tunepipe.workload"] == "tabular"

    # Batch scoring reads the table with the workload that registered the model.
    scored = CliRunner().invoke(app, ["score", "--data", str(path), "--model-name", "tabular-e2e"])
    assert scored.exit_code == 0, (scored.output, scored.exception)
    report = json.loads(scored.stdout)
    predictions = pd.read_parquet(report["output"])
    assert report["rows"] == 569 and len(predictions) == 569
    assert predictions["probability"].between(0, 1).all() and set(predictions["label"]) <= {"benign", "malignant"}
