"""MLflow tracking and registry (infra.tracking.Tracker, infra.models): real MLflow on a temp SQLite
file, S3 artifacts through the moto server, models trained on the real ASA 2008 sample.

A migrated, empty MLflow database is made once per module and copied for each test: creating one
runs MLflow's schema migrations, which take seconds (tens of seconds on a busy machine).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.fs as pafs
import pytest

from tests.conftest import ASA_SAMPLE
from tuning_core.config import FlightsData
from tuning_core.data import flights
from tuning_core.evaluate import binary_metrics
from tuning_core.results import TrialRecord, TuningResult
from tuning_core.trainables.xgboost import LABEL, fit_booster

EXPERIMENT = "tunepipe-test"
SECRET = "testing-secret"  # the moto secret key set by the s3_settings fixture


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(autouse=True)
def _restore_mlflow_uris(restore_mlflow_uris):
    """Every test here: see tests.conftest.restore_mlflow_uris."""


@dataclass
class FlightsSample:
    version: str
    train: pd.DataFrame
    test: pd.DataFrame
    categories: dict[str, list[str]]

    @property
    def features(self) -> pd.DataFrame:
        return self.train.drop(columns=[LABEL])

    def consumer_frame(self) -> pd.DataFrame:
        """The test features as a registry consumer builds them: plain strings and default dtypes."""
        x = self.test.drop(columns=[LABEL])
        return pd.DataFrame({c: (x[c].astype(str).tolist() if c in self.categories else x[c].tolist())
                             for c in x.columns})


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> FlightsSample:
    root = str(tmp_path_factory.mktemp("data"))
    fs = pafs.LocalFileSystem()
    version = flights.prepare(FlightsData(source=str(ASA_SAMPLE), max_rows=5000), None, None, fs, root)
    train = pd.concat([flights.load_split(fs, version.path, s) for s in ("train", "valid")], ignore_index=True)
    test = flights.load_split(fs, version.path, "test")
    categories = {c: [str(v) for v in train[c].cat.categories] for c in flights.CATEGORICAL}
    return FlightsSample(version.version, train, test, categories)


@pytest.fixture(scope="module")
def boosters(sample) -> dict[str, Any]:
    """A clearly weaker and a clearly stronger model (one thread: fast on a busy 2-core machine)."""
    return {"weak": fit_booster({"max_depth": 1, "eta": 0.05}, sample.train, 2, nthread=1),
            "strong": fit_booster({"max_depth": 4, "eta": 0.2}, sample.train, 40, nthread=1)}


@pytest.fixture(scope="module")
def mlflow_db_template(tmp_path_factory) -> Path:
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments(max_results=1)
    return path


def _use_template(uri: str, template: Path) -> None:
    shutil.copyfile(template, uri.removeprefix("sqlite:///"))


@pytest.fixture
def tracker(local_settings, mlflow_db_template):
    from infra.storage import build_storage
    from infra.tracking import Tracker

    _use_template(local_settings.mlflow_tracking_uri, mlflow_db_template)
    return Tracker(local_settings, build_storage(local_settings))


@pytest.fixture
def s3_tracker(s3_settings, moto_server, mlflow_db_template, tmp_path, monkeypatch):
    """A Tracker whose storage root is s3://<moto bucket>/root, with the registry on SQLite."""
    from infra.settings import Settings, get_settings
    from infra.storage import build_storage
    from infra.tracking import Tracker

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    _use_template(uri, mlflow_db_template)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    # Set here (Tracker only fills it in when absent) so that it is undone after the test.
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", moto_server)
    get_settings.cache_clear()
    settings = Settings()
    assert settings.is_s3 and settings.mlflow_tracking_uri == uri
    return Tracker(settings, build_storage(settings))


# ----------------------------------------------------------------------------- helpers
def log_model(tracker, sample: FlightsSample, booster, key: str, **lineage: Any) -> tuple[str, str]:
    """A retrain-style child run holding a logged flights model, as the flights workload builds it and
    the tracker logs it: (run_id, model_uri). ``lineage``: ModelSpec's params, metrics, train, test."""
    import tempfile

    from infra.tracking import TAG_STAGE
    from tuning_core.workloads.flights import booster_spec

    parent = tracker.parent_run(EXPERIMENT, "run-key", {"data_version": sample.version}, run_name="parent")
    run_id, _ = tracker.child_run(parent, TAG_STAGE, key, key)
    with tempfile.TemporaryDirectory() as folder:
        uri = tracker.log_model(run_id, booster_spec(booster, sample.features.head(50), Path(folder), **lineage))
    tracker.finish(run_id)
    return run_id, uri


def score(sample: FlightsSample, metric: str = "auc"):
    """The champion re-evaluation the pipeline does: load any model URI, score today's test split."""
    import mlflow

    def evaluate(model_uri: str) -> float:
        out = mlflow.pyfunc.load_model(model_uri).predict(sample.consumer_frame())
        return binary_metrics(sample.test[LABEL].to_numpy(), out["delay_probability"].to_numpy())[metric]

    return evaluate


def registered(tracker, sample, booster, key: str, name: str, metric: str = "auc") -> tuple[str, float]:
    """Log + register a model; (version, its test ``metric``)."""
    run_id, uri = log_model(tracker, sample, booster, key)
    version = tracker.register(name, run_id, uri, {"data_version": sample.version})
    return version, score(sample, metric)(f"models:/{name}/{version}")


def aliases(tracker, name: str) -> dict[str, str]:
    return {alias: str(v) for alias, v in tracker.client.get_registered_model(name).aliases.items()}


# ----------------------------------------------------------------------------- loading by alias
def test_champion_alias_loads_a_model_that_scores_plain_consumer_frames(tracker, sample, boosters):
    import mlflow
    import xgboost as xgb

    run_id, uri = log_model(tracker, sample, boosters["strong"], "retrain")
    version = tracker.register("flights-delay", run_id, uri, {"data_version": sample.version})
    result = tracker.gate("flights-delay", version, 0.7, "auc", "max", 0.0, score(sample))
    assert result.promoted and result.aliases == ["champion"]

    model = mlflow.pyfunc.load_model("models:/flights-delay@champion")
    frame = sample.consumer_frame()
    assert frame["carrier"].map(type).eq(str).all() and frame["year"].dtype == "int64"
    out = model.predict(frame)

    assert list(out.columns) == ["delay_probability", "delayed"]
    assert len(out) == len(frame)
    proba = out["delay_probability"].to_numpy()
    assert np.isfinite(proba).all() and ((proba > 0) & (proba < 1)).all()
    # Same numbers as the booster on the training encoding: strings map onto the same categories.
    expected = boosters["strong"].predict(xgb.DMatrix(sample.test.drop(columns=[LABEL]), enable_categorical=True))
    np.testing.assert_allclose(proba, expected, rtol=1e-5)
    assert (out["delayed"].to_numpy() == (proba >= 0.5)).all()


def test_champion_scores_unseen_airports_and_the_training_dtypes(tracker, sample, boosters):
    import mlflow

    run_id, uri = log_model(tracker, sample, boosters["strong"], "retrain")
    version = tracker.register("flights-delay", run_id, uri, {})
    tracker.gate("flights-delay", version, 0.7, "auc", "max", 0.0, score(sample))
    model = mlflow.pyfunc.load_model("models:/flights-delay@champion")

    unseen = sample.consumer_frame().head(3)
    unseen.loc[0, "origin"] = "XYZ"  # an airport the model never saw: treated as missing
    unseen.loc[1, "flight_number"] = np.nan
    assert np.isfinite(model.predict(unseen)["delay_probability"]).all()
    # The canonical training dtypes (int8, float32) with string categories are accepted too.
    canonical = sample.test.drop(columns=[LABEL]).head(5)
    for c in sample.categories:
        canonical[c] = canonical[c].astype(str)
    assert len(model.predict(canonical)) == 5


def test_champion_takes_distance_and_flight_number_as_integers_and_names_a_non_number(tracker, sample, boosters):
    import mlflow
    from mlflow.exceptions import MlflowException

    run_id, uri = log_model(tracker, sample, boosters["strong"], "retrain")
    model = mlflow.pyfunc.load_model(uri)
    frame = sample.consumer_frame().dropna(subset=["distance", "flight_number"]).head(20)
    # What a consumer's dict / JSON / gap-free CSV gives: int64. MLflow refuses int64 for a
    # "double" column, so these two columns are "any" in the signature and converted by the model.
    ints = frame.astype({"distance": "int64", "flight_number": "int64"})
    np.testing.assert_allclose(model.predict(ints)["delay_probability"], model.predict(frame)["delay_probability"])
    bad = frame.head(2).astype({"distance": object})
    bad.loc[bad.index[0], "distance"] = "far"
    with pytest.raises(MlflowException, match=r"column 'distance' is not numeric \(example value 'far' at row 0\)"):
        model.predict(bad)


# ----------------------------------------------------------------------------- raw records, what a model ships
def test_champion_predicts_raw_rows_of_each_schema_with_the_data_stages_features(tracker, sample, boosters, tmp_path):
    import mlflow
    import xgboost as xgb

    from tests.raw_flights import as_bts, as_nycflights13, asa_rows, canonical_features

    run_id, uri = log_model(tracker, sample, boosters["strong"], "retrain")
    version = tracker.register("flights-delay", run_id, uri, {})
    tracker.gate("flights-delay", version, 0.7, "auc", "max", 0.0, score(sample))
    model = mlflow.pyfunc.load_model("models:/flights-delay@champion")
    asa = asa_rows(40)
    # The features the data stage builds from the same flights in a CSV file, scored by the booster itself.
    expected = boosters["strong"].predict(xgb.DMatrix(canonical_features(asa, sample.categories, tmp_path),
                                                      enable_categorical=True))
    bts = as_bts(asa)
    us_dates = bts.assign(FlightDate=[f"{m}/{d}/{y} 12:00:00 AM" for y, m, d in
                                      zip(asa["Year"], asa["Month"], asa["DayofMonth"], strict=True)])
    layouts = {"asa": asa, "asa as text": asa.astype(str), "bts": bts, "bts US dates": us_dates,
               "nycflights13": as_nycflights13(asa)}
    for name, rows in layouts.items():
        out = model.predict(rows)
        assert len(out) == len(asa), name
        np.testing.assert_allclose(out["delay_probability"].to_numpy(), expected, rtol=1e-6, err_msg=name)
    # Without a DataFrame: one row as a dict, rows as a list of dicts (what JSON gives).
    one = model.predict(bts.iloc[0].to_dict())
    np.testing.assert_allclose(one["delay_probability"].to_numpy(), expected[:1], rtol=1e-6)
    listed = model.predict(json.loads(bts.to_json(orient="records")))
    np.testing.assert_allclose(listed["delay_probability"].to_numpy(), expected, rtol=1e-6)


def test_a_raw_row_the_model_cannot_read_is_refused_naming_the_column(tracker, sample, boosters):
    import mlflow
    from mlflow.exceptions import MlflowException

    from tests.raw_flights import as_bts, as_nycflights13, asa_rows

    _, uri = log_model(tracker, sample, boosters["weak"], "retrain")
    model = mlflow.pyfunc.load_model(uri)
    asa = asa_rows(3)

    def with_value(rows, column, value):
        rows = rows.astype({column: object})
        rows.loc[1, column] = value
        return rows

    cases = [
        (with_value(asa, "CRSDepTime", 2460),
         r"column 'CRSDepTime' \(asa schema\): 2460 at row 1 is not a scheduled time"),
        (with_value(asa, "Distance", "far"), r"column 'Distance': 'far' at row 1 is not a number"),
        (with_value(as_bts(asa), "FlightDate", "2008-02-30"),
         r"column 'FlightDate' \(bts schema\): '2008-02-30' at row 1 is not a date"),
        (with_value(as_nycflights13(asa), "month", 13),
         r"column 'month' \(nycflights13 schema\): 13 at row 1 is not a month"),
        (with_value(as_nycflights13(asa), "day", None),
         r"column 'day' \(nycflights13 schema\): row 1 has no value; expected a day"),
        (asa.drop(columns=["CRSArrTime"]), r"neither the canonical features .* nor raw flights of a known schema"),
    ]
    for rows, message in cases:
        with pytest.raises(MlflowException, match=message) as err:
            model.predict(rows)
        assert err.value.error_code == "INVALID_PARAMETER_VALUE"  # MLflow's scoring server answers 400


def test_logged_model_ships_only_its_model_code_pins_versions_and_logs_and_loads_quietly(tracker, sample, boosters,
                                                                                           recwarn, caplog):
    import importlib.metadata
    import logging
    import sys

    import mlflow
    from mlflow.artifacts import download_artifacts

    from tuning_core.data import flight_features

    mlflow_logger = logging.getLogger("mlflow")  # MLflow's loggers do not propagate to the root
    mlflow_logger.addHandler(caplog.handler)
    try:
        path_before = list(sys.path)
        _, uri = log_model(tracker, sample, boosters["weak"], "retrain")
        model = mlflow.pyfunc.load_model(uri)
        model.predict(sample.consumer_frame().head(3))
    finally:
        mlflow_logger.removeHandler(caplog.handler)

    assert sys.path == path_before  # nothing of ours went onto a consumer's import path
    assert not [m for m in sys.modules if m.startswith("tunepipe_flight_features") and "." in m]
    local = Path(download_artifacts(uri))
    files = sorted(str(p.relative_to(local)) for p in local.rglob("*") if p.is_file())
    assert [f for f in files if f.endswith(".py")] == ["artifacts/flight_features.py", "flight_delay.py"], files
    assert not [f for f in files if f.startswith("code/") or f.endswith(".pkl")], files
    assert (local / "artifacts" / "flight_features.py").read_bytes() == Path(flight_features.__file__).read_bytes()
    assert (local / "requirements.txt").read_text().split() == [
        f"{d}=={importlib.metadata.version(d)}" for d in ("mlflow", "xgboost", "pandas", "numpy", "pyarrow")]
    said = [str(w.message) for w in recwarn] + [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert said == []


def test_log_model_skips_mlflows_scan_of_every_installed_file(tracker, sample, boosters, monkeypatch):
    """MLflow checks the pinned requirements against this environment by mapping every installed
    file to its distribution (~0.4 s per retrain); ours are pinned from this environment, so the
    check is skipped for the call, and MLflow's function is back afterwards."""
    from mlflow.utils import requirements_utils

    scans = []
    monkeypatch.setattr(requirements_utils, "_MODULES_TO_PACKAGES", None)
    real = requirements_utils.importlib_metadata.packages_distributions
    monkeypatch.setattr(requirements_utils.importlib_metadata, "packages_distributions",
                        lambda: scans.append(1) or real())
    check = requirements_utils._check_requirement_satisfied
    log_model(tracker, sample, boosters["weak"], "retrain")
    assert scans == []
    assert requirements_utils._check_requirement_satisfied is check
    assert check("xgboost==0.0.1") is not None  # the real check, working again outside our call
    assert len(scans) == 1


def test_model_page_shows_test_metrics_on_the_test_dataset_parameters_and_the_commit(tracker, sample, boosters):
    import subprocess

    from tuning_core.workloads.base import DatasetSample

    v = sample.version
    run_id, uri = log_model(tracker, sample, boosters["strong"], "retrain", params={"max_depth": 4, "eta": 0.2},
                            metrics={"test_auc": 0.71, "uplift_auc": 0.02},
                            train=DatasetSample(f"flights-{v}", "/data/flights", v, frame=sample.train),
                            test=DatasetSample(f"flights-{v}-test", "/data/flights", v, frame=sample.test))

    logged = tracker.client.get_logged_model(uri.removeprefix("models:/"))
    assert {m.key: (m.value, m.dataset_name, m.dataset_digest, m.run_id) for m in logged.metrics} == {
        "test_auc": (0.71, f"flights-{v}-test", v, run_id), "uplift_auc": (0.02, f"flights-{v}-test", v, run_id)}
    assert logged.params == {"max_depth": "4", "eta": "0.2"}
    run = tracker.client.get_run(run_id)
    assert run.data.metrics == {"test_auc": 0.71, "uplift_auc": 0.02}  # the run shows them too, once
    assert {d.dataset.name: {t.key: t.value for t in d.tags}["mlflow.data.context"]
            for d in run.inputs.dataset_inputs} == {f"flights-{v}": "training", f"flights-{v}-test": "test"}
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[2])
    commit = head.stdout.strip() if head.returncode == 0 else None
    for tags in (logged.tags, run.data.tags, tracker.client.get_run(run.data.tags["mlflow.parentRunId"]).data.tags):
        assert tags.get("mlflow.source.git.commit") == commit


def test_runs_outside_a_git_checkout_or_without_git_carry_no_commit_tag(tracker, monkeypatch, tmp_path):
    from infra import tracking

    for name, value in (("GIT_DIR", str(tmp_path / "not-a-repository")), ("PATH", str(tmp_path))):
        with monkeypatch.context() as m:
            m.setenv(name, value)
            tracking.git_commit.cache_clear()
            try:
                parent = tracker.parent_run(EXPERIMENT, f"no-git-{name}", {}, run_name="p")
                child, _ = tracker.child_run(parent, "tunepipe.stage", "retrain", "retrain")
            finally:
                tracking.git_commit.cache_clear()
        for run_id in (parent, child):
            assert "mlflow.source.git.commit" not in tracker.client.get_run(run_id).data.tags, name


# ----------------------------------------------------------------------------- champion / challenger
@pytest.mark.parametrize(("metric", "mode"), [("auc", "max"), ("logloss", "min")])
def test_better_challenger_becomes_champion_and_tags_explain(tracker, sample, boosters, metric, mode):
    name = f"flights-{metric}"
    v1, weak = registered(tracker, sample, boosters["weak"], "weak", name, metric)
    first = tracker.gate(name, v1, weak, metric, mode, 0.001, score(sample, metric))
    assert first.promoted and first.champion_before is None and "first version" in first.decision

    v2, strong = registered(tracker, sample, boosters["strong"], "strong", name, metric)
    result = tracker.gate(name, v2, strong, metric, mode, 0.001, score(sample, metric))

    assert result.promoted and result.champion_before == v1 and result.aliases == ["champion"]
    assert aliases(tracker, name) == {"champion": v2}
    tags = tracker.client.get_model_version(name, v2).tags
    assert tags["tunepipe.decision"] == result.decision and result.decision.startswith("promoted")
    assert float(tags[f"tunepipe.challenger_{metric}"]) == pytest.approx(strong, abs=1e-6)
    assert float(tags[f"tunepipe.champion_{metric}"]) == pytest.approx(weak, abs=1e-6)  # re-evaluated today
    assert tags["tunepipe.previous_champion"] == v1
    assert tracker.client.get_model_version(name, v1).aliases == []


def test_gate_killed_before_its_aliases_decides_again_on_the_rerun(tracker, sample, boosters, monkeypatch):
    """A registration killed after the gate's tags, before its alias: the rerun sets the champion alias."""
    name = "flights-delay"
    v1, strong = registered(tracker, sample, boosters["strong"], "strong", name)

    def killed(*args: Any) -> None:
        raise KeyboardInterrupt("killed")  # the process dies here

    with monkeypatch.context() as m:
        m.setattr(tracker.client, "set_registered_model_alias", killed)
        with pytest.raises(KeyboardInterrupt):
            tracker.gate(name, v1, strong, "auc", "max", 0.0, score(sample))
    assert "tunepipe.decision" not in tracker.client.get_model_version(name, v1).tags

    result = tracker.gate(name, v1, strong, "auc", "max", 0.0, score(sample))
    assert result.promoted and aliases(tracker, name) == {"champion": v1}
    assert tracker.client.get_model_version(name, v1).tags["tunepipe.decision"] == "first version: promoted"


def test_worse_challenger_leaves_champion_and_gets_the_challenger_alias(tracker, sample, boosters):
    name = "flights-delay"
    v1, strong = registered(tracker, sample, boosters["strong"], "strong", name)
    tracker.gate(name, v1, strong, "auc", "max", 0.0, score(sample))
    v2, weak = registered(tracker, sample, boosters["weak"], "weak", name)
    assert weak < strong

    result = tracker.gate(name, v2, weak, "auc", "max", 0.0, score(sample))

    assert not result.promoted and result.aliases == ["challenger"] and result.champion_before == v1
    assert aliases(tracker, name) == {"champion": v1, "challenger": v2}
    tags = tracker.client.get_model_version(name, v2).tags
    assert tags["tunepipe.decision"].startswith(f"kept champion v{v1}")
    assert float(tags["tunepipe.challenger_auc"]) == pytest.approx(weak, abs=1e-6)
    assert float(tags["tunepipe.champion_auc"]) == pytest.approx(strong, abs=1e-6)
    assert tags["tunepipe.previous_champion"] == v1


def test_margin_keeps_a_slightly_better_challenger_out_until_forced(tracker, sample, boosters):
    name = "flights-delay"
    v1, weak = registered(tracker, sample, boosters["weak"], "weak", name)
    tracker.gate(name, v1, weak, "auc", "max", 0.0, score(sample))
    v2, strong = registered(tracker, sample, boosters["strong"], "strong", name)
    delta = strong - weak
    assert delta > 0

    kept = tracker.gate(name, v2, strong, "auc", "max", delta + 0.01, score(sample))
    assert not kept.promoted and aliases(tracker, name) == {"champion": v1, "challenger": v2}
    assert f"< margin {delta + 0.01}" in kept.decision

    forced = tracker.gate(name, v2, strong, "auc", "max", delta + 0.01, score(sample), force=True)
    assert forced.promoted and forced.decision.startswith("forced promotion")
    # The forced version leaves the challenger slot: it is the champion now.
    assert aliases(tracker, name) == {"champion": v2}
    assert tracker.client.get_model_version(name, v2).tags["tunepipe.decision"] == forced.decision


def test_a_champion_registered_on_the_same_data_version_is_not_scored_again(tracker, sample, boosters):
    """Same content hash, same test split: the champion's registered test metric is the score; a
    champion from another data version is loaded and scored on today's split."""
    name = "flights-same-data"
    run_id, uri = log_model(tracker, sample, boosters["strong"], "strong")
    v1 = tracker.register(name, run_id, uri, {"data_version": sample.version, "test_auc": "0.612345"})
    tracker.gate(name, v1, 0.612345, "auc", "max", 0.0, score(sample))
    run_id, uri = log_model(tracker, sample, boosters["weak"], "weak")
    v2 = tracker.register(name, run_id, uri, {"data_version": sample.version, "test_auc": "0.6"})
    calls: list[str] = []

    def never(model_uri: str) -> float:
        calls.append(model_uri)
        return 0.0

    kept = tracker.gate(name, v2, 0.6, "auc", "max", 0.0, never)
    assert calls == [] and not kept.promoted
    assert tracker.client.get_model_version(name, v2).tags["tunepipe.champion_auc"] == "0.612345"

    run_id, uri = log_model(tracker, sample, boosters["weak"], "weak-new-data")
    v3 = tracker.register(name, run_id, uri, {"data_version": "another-version", "test_auc": "0.6"})
    rescored = tracker.gate(name, v3, 0.6, "auc", "max", 0.0, score(sample))
    tags = tracker.client.get_model_version(name, v3).tags
    assert float(tags["tunepipe.champion_auc"]) == pytest.approx(score(sample)(f"models:/{name}/{v1}"), abs=1e-6)
    assert tags["tunepipe.champion_auc"] != "0.612345" and rescored.champion_before == v1


def test_a_model_loaded_for_scoring_leaves_no_copy_behind(tracker, sample, boosters, tmp_path, monkeypatch):
    """Champion re-evaluation and batch scoring load registered models; MLflow's own download
    folder would stay in /tmp after every one (found by the soak benchmark)."""
    import tempfile

    from infra.models import loaded_pyfunc

    _, uri = log_model(tracker, sample, boosters["strong"], "strong")
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    with loaded_pyfunc(uri) as model:
        assert list(scratch.iterdir())  # the copy it predicts from
        out = model.predict(sample.consumer_frame())
    assert len(out) == len(sample.test) and out["delay_probability"].between(0, 1).all()
    assert list(scratch.iterdir()) == []


# ----------------------------------------------------------------------------- idempotency
def test_register_and_gate_again_for_the_same_run_change_nothing(tracker, sample, boosters, capfd):
    name = "flights-delay"
    run_id, uri = log_model(tracker, sample, boosters["strong"], "retrain")
    capfd.readouterr()
    v_first = tracker.register(name, run_id, uri, {"data_version": sample.version})
    # MLflow's notices ("Registered model ... already exists", "Created version ...") are not printed.
    printed = capfd.readouterr().err
    assert "already exists" not in printed and "Created version" not in printed, printed
    first = tracker.gate(name, v_first, 0.7, "auc", "max", 0.0, score(sample))
    tags_first = tracker.client.get_model_version(name, v_first).tags

    def never_called(_: str) -> float:
        raise AssertionError("a decided version must not be re-evaluated")

    v_again = tracker.register(name, run_id, uri, {"data_version": sample.version})
    again = tracker.gate(name, v_again, 0.1, "auc", "max", 0.0, never_called)

    assert v_again == v_first
    assert [str(v.version) for v in tracker.client.search_model_versions(f"name = '{name}'")] == [v_first]
    assert again == first
    assert aliases(tracker, name) == {"champion": v_first}
    assert tracker.client.get_model_version(name, v_first).tags == tags_first


def test_parent_run_is_found_again_by_its_run_key(tracker):
    first = tracker.parent_run(EXPERIMENT, "key-1", {"data_version": "a"}, run_name="p")
    again = tracker.parent_run(EXPERIMENT, "key-1", {"data_version": "a"}, run_name="p")
    other = tracker.parent_run(EXPERIMENT, "key-2", {}, run_name="p")
    assert first == again != other
    exp_id = tracker.client.get_experiment_by_name(EXPERIMENT).experiment_id
    assert len(tracker.client.search_runs([exp_id])) == 2


# ----------------------------------------------------------------------------- trials
def _trial(trial_id: str, etas: list[float], status: str = "TERMINATED") -> TrialRecord:
    history = [{"training_iteration": i, "auc": 0.6 + 0.01 * i, "logloss": 0.7 - 0.01 * i,
                "config/eta": eta, "config/max_depth": 4} for i, eta in enumerate(etas, start=1)]
    return TrialRecord(trial_id=trial_id, config={"eta": etas[-1], "max_depth": 4, "grow_policy": "depthwise"},
                       status=status, iterations=len(etas), metric=history[-1]["auc"],
                       best_metric=max(h["auc"] for h in history), metrics={"auc": history[-1]["auc"]},
                       time_s=1.0, history=history)


def _tuning(trials: list[TrialRecord], resumed: bool) -> TuningResult:
    best = max(trials, key=lambda t: t.best_metric)
    return TuningResult(experiment_name="flights-exp", experiment_uri="/tmp/ray/flights-exp", search="random",
                        scheduler="pbt", metric="auc", mode="max", num_trials=len(trials),
                        best_trial_id=best.trial_id, best_config=best.config, best_metric=best.best_metric,
                        best_iteration=best.iterations, best_checkpoint_uri=None, resumed=resumed,
                        wall_time_s=3.0, trials=trials)


def _children(tracker, parent: str) -> dict[str, Any]:
    from infra.tracking import TAG_TRIAL

    exp_id = tracker.client.get_run(parent).info.experiment_id
    runs = tracker.client.search_runs([exp_id], f"tags.`mlflow.parentRunId` = '{parent}'")
    ids = [r.data.tags[TAG_TRIAL] for r in runs]
    assert len(ids) == len(set(ids)), f"duplicate child runs: {ids}"
    return {r.data.tags[TAG_TRIAL]: r for r in runs}


def _steps(tracker, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in tracker.client.get_metric_history(run_id, key))


def test_log_trials_of_a_resumed_run_adds_what_is_new_without_duplicates(tracker):
    parent = tracker.parent_run(EXPERIMENT, "flights-exp", {}, run_name="flights-exp")
    first = [_trial("t_00000", [0.1, 0.1, 0.2]), _trial("t_00001", [0.3, 0.3], status="ERROR")]
    assert tracker.log_trials(parent, _tuning(first, resumed=False), mutated=["eta"]) == 2

    # The resumed experiment: t_00000 ran two more iterations, t_00001 is unchanged, t_00002 is new.
    resumed = [_trial("t_00000", [0.1, 0.1, 0.2, 0.2, 0.05]), first[1], _trial("t_00002", [0.3])]
    tracker.log_trials(parent, _tuning(resumed, resumed=True), mutated=["eta"])

    runs = _children(tracker, parent)
    assert sorted(runs) == ["t_00000", "t_00001", "t_00002"]
    a = runs["t_00000"]
    assert _steps(tracker, a.info.run_id, "auc") == [(i, pytest.approx(0.6 + 0.01 * i)) for i in range(1, 6)]
    assert [s for s, _ in _steps(tracker, a.info.run_id, "logloss")] == [1, 2, 3, 4, 5]
    assert a.data.metrics["training_iteration"] == 5 and a.info.status == "FINISHED"
    assert a.data.metrics["best_auc"] == pytest.approx(0.65)
    # PBT mutated eta: its value per iteration is a metric history, the param is the starting value.
    assert _steps(tracker, a.info.run_id, "hp.eta") == [(1, 0.1), (2, 0.1), (3, 0.2), (4, 0.2), (5, 0.05)]
    assert a.data.params["eta"] == "0.1"
    assert a.data.tags["tunepipe.pbt_mutated"] == "eta"
    assert "hp.max_depth" not in a.data.metrics  # not mutated: a plain param
    assert a.data.params["max_depth"] == "4" and a.data.params["grow_policy"] == "depthwise"
    b = runs["t_00001"]
    assert b.info.status == "FAILED" and b.data.tags["status"] == "ERROR"
    assert [s for s, _ in _steps(tracker, b.info.run_id, "auc")] == [1, 2]
    assert [s for s, _ in _steps(tracker, runs["t_00002"].info.run_id, "auc")] == [1]

    # A third identical call (a re-run pipeline) writes nothing new.
    assert tracker.log_trials(parent, _tuning(resumed, resumed=True), mutated=["eta"]) <= 1  # the failed one
    again = _children(tracker, parent)
    assert [s for s, _ in _steps(tracker, again["t_00000"].info.run_id, "auc")] == [1, 2, 3, 4, 5]


def test_log_trials_without_pbt_keeps_config_out_of_the_metrics(tracker):
    parent = tracker.parent_run(EXPERIMENT, "asha-exp", {}, run_name="asha-exp")
    tracker.log_trials(parent, _tuning([_trial("t_00000", [0.1, 0.1])], resumed=False))

    run = _children(tracker, parent)["t_00000"]
    assert not [k for k in run.data.metrics if k.startswith("hp.")]
    assert "tunepipe.pbt_mutated" not in run.data.tags
    assert run.data.params["eta"] == "0.1"


# ----------------------------------------------------------------------------- S3 artifacts, secrets
def test_s3_storage_root_puts_model_and_plot_artifacts_in_the_bucket(s3_tracker, sample, boosters):
    import mlflow

    from infra.storage import boto3_client

    bucket = s3_tracker.storage.root.split("/", 1)[0]
    run_id, uri = log_model(s3_tracker, sample, boosters["strong"], "retrain")
    s3_tracker.log_files(run_id, {"roc_curve.png": b"\x89PNG\r\n\x1a\nnot-really"})
    version = s3_tracker.register("flights-delay", run_id, uri, {})
    s3_tracker.gate("flights-delay", version, 0.7, "auc", "max", 0.0, score(sample))

    location = s3_tracker.client.get_experiment_by_name(EXPERIMENT).artifact_location
    assert location == f"s3://{bucket}/root/mlflow/{EXPERIMENT}"
    listed = boto3_client(s3_tracker.settings).list_objects_v2(Bucket=bucket, Prefix=f"root/mlflow/{EXPERIMENT}/")
    keys = [o["Key"] for o in listed.get("Contents", [])]
    assert any(k.endswith("/MLmodel") for k in keys), keys
    assert any(k.endswith("/model.ubj") for k in keys), keys
    assert any(k.endswith(f"{run_id}/artifacts/roc_curve.png") for k in keys), keys
    assert not Path(".tunepipe", "mlflow", EXPERIMENT).exists()  # nothing went to a local folder instead

    out = mlflow.pyfunc.load_model("models:/flights-delay@champion").predict(sample.consumer_frame())
    assert len(out) == len(sample.test)


def test_no_secret_reaches_run_params_tags_or_artifacts(s3_tracker, sample, boosters):
    from infra.storage import boto3_client

    client = s3_tracker.client
    run_id, uri = log_model(s3_tracker, sample, boosters["weak"], "retrain")
    parent = client.get_run(run_id).data.tags["mlflow.parentRunId"]
    s3_tracker.log_trials(parent, _tuning([_trial("t_00000", [0.1, 0.2])], resumed=False), mutated=["eta"])
    version = s3_tracker.register("flights-delay", run_id, uri, {"data_version": sample.version})
    s3_tracker.gate("flights-delay", version, 0.6, "auc", "max", 0.0, score(sample))

    exp_id = client.get_experiment_by_name(EXPERIMENT).experiment_id
    runs = client.search_runs([exp_id])
    assert len(runs) == 3  # parent, retrain, one trial
    texts = [json.dumps([r.data.params, r.data.tags]) for r in runs]
    mv = client.get_model_version("flights-delay", version)
    texts.append(json.dumps([mv.tags, mv.source, dict(client.get_registered_model("flights-delay").tags)]))
    assert not [t for t in texts if SECRET in t]
    s3 = boto3_client(s3_tracker.settings)
    bucket = s3_tracker.storage.root.split("/", 1)[0]
    objects = s3.list_objects_v2(Bucket=bucket, Prefix="root/mlflow/")["Contents"]
    assert objects
    leaked = [o["Key"] for o in objects
              if SECRET.encode() in s3.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()]
    assert not leaked


def test_check_names_an_unreachable_tracking_server_in_one_line(local_settings, tmp_path):
    from infra.storage import build_storage
    from infra.tracking import Tracker
    from tests.conftest import free_port
    from tuning_core.errors import ServiceUnavailable

    settings = local_settings.model_copy(update={"mlflow_tracking_uri": f"http://127.0.0.1:{free_port()}"})
    tracker = Tracker(settings, build_storage(settings))
    with pytest.raises(ServiceUnavailable, match=r"MLflow tracking URI http://127\.0\.0\.1:\d+: unreachable") as err:
        tracker.check()
    assert "\n" not in str(err.value)


def test_tracker_drops_s3_credentials_cached_before_the_keys_changed(local_settings, monkeypatch):
    """MLflow uploads with boto3's default session, which keeps the first keys it resolved (the CI failure:
    a stack's keys set after an earlier test's left uploads signed with the old, unknown key)."""
    import boto3
    from mlflow.store.artifact.s3_artifact_repo import _get_s3_client

    from infra.storage import build_storage
    from infra.tracking import Tracker

    monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)  # put back afterwards: later tests keep theirs
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "old-key-id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "old-secret")
    assert _get_s3_client(s3_endpoint_url="http://127.0.0.1:1")._request_signer._credentials.access_key \
        == "old-key-id"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "new-key-id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "new-secret")
    assert boto3.DEFAULT_SESSION.get_credentials().access_key == "old-key-id"  # the trap itself

    Tracker(local_settings, build_storage(local_settings))
    client = _get_s3_client(s3_endpoint_url="http://127.0.0.1:1")
    assert client._request_signer._credentials.access_key == "new-key-id"
