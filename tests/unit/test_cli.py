"""The `tunepipe` CLI on real data: the data stage command and config loading."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from flows.cli import app
from tests.conftest import ASA_SAMPLE


def test_prepare_flights_on_the_asa_sample_writes_a_version(local_settings, tmp_path):
    result = CliRunner().invoke(app, ["prepare", "flights", "--data", str(ASA_SAMPLE)])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["schema"] == "asa"
    assert sum(out["rows"].values()) > 20000
    assert (tmp_path / "store" / "data" / "flights" / out["version"] / "manifest.json").is_file()
    again = CliRunner().invoke(app, ["prepare", "flights", "--data", str(ASA_SAMPLE)])
    assert json.loads(again.stdout)["version"] == out["version"]  # same input, same version


def test_yaml_config_is_merged_under_cli_flags(tmp_path):
    from flows.cli import _config, _overrides
    from tuning_core.config import FlightsPipeline

    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("tune: {num_samples: 7, search: optuna}\nregistry: {model_name: from-yaml}\n")
    cfg = _config(FlightsPipeline, cfg_file, {}, _overrides(num_samples=3, search=None))
    assert cfg.tune.num_samples == 3 and cfg.tune.search == "optuna"
    assert cfg.registry.model_name == "from-yaml"


def test_run_check_runs_the_pre_run_checks_only_and_writes_nothing(local_settings, tmp_path):
    from tests.unit.test_bad_inputs import _mlflow_written, _written

    ok = CliRunner().invoke(app, ["run", "flights", "--data", str(ASA_SAMPLE), "--num-samples", "3", "--check"])
    assert ok.exit_code == 0, ok.output
    assert ok.stdout.startswith("checks passed: flights config") and "3 trials of hyperopt+asha" in ok.stdout
    typo = tmp_path / "typo.yaml"
    typo.write_text("tune:\n  space:\n    max_dpth: {type: randint, low: 3, high: 8}\n")
    bad = CliRunner().invoke(app, ["run", "flights", "--data", str(ASA_SAMPLE), "--config", str(typo), "--check"])
    assert bad.exit_code == 2 and "did you mean 'max_depth'?" in bad.stderr
    # Neither started anything: no data version, no Ray experiment, no model version.
    assert _written(str(tmp_path / "store"), local_settings) == []
    assert _mlflow_written(tmp_path / "mlflow.db") == []


# ---- choices, defaults, version: what `--help`, the config and the Prefect form offer ----------------


def test_version_prints_the_installed_package_version():
    from importlib.metadata import version

    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"tunepipe {version('tunepipe')}"


def test_help_lists_the_registry_choices_and_the_pipeline_defaults():
    from tuning_core.schedulers import SCHEDULERS
    from tuning_core.search import SEARCHERS

    # Wide enough that rich does not wrap the choices or the defaults.
    out = CliRunner().invoke(app, ["run", "flights", "--help"], env={"COLUMNS": "200"}).stdout
    assert "[" + "|".join(SEARCHERS) + "]" in out and "[" + "|".join(SCHEDULERS) + "]" in out
    assert "[default: (hyperopt)]" in out and "[default: (asha)]" in out and "[default: (12)]" in out
    fashion = CliRunner().invoke(app, ["run", "fashion-mnist", "--help"], env={"COLUMNS": "200"}).stdout
    assert "[cnn|resnet18]" in fashion and "[default: (4)]" in fashion  # FashionMNIST's own budget


def test_choice_fields_are_typed_from_the_registries():
    import pytest

    from tuning_core.config import FlightsPipeline, TuneConfig, build_config
    from tuning_core.errors import ConfigError
    from tuning_core.schedulers import SCHEDULERS
    from tuning_core.search import SEARCHERS

    schema = TuneConfig.model_json_schema()["properties"]
    assert schema["search"]["enum"] == list(SEARCHERS) and schema["scheduler"]["enum"] == list(SCHEDULERS)
    for name in SEARCHERS:
        assert TuneConfig(search=name).search == name
    with pytest.raises(ConfigError) as err:
        build_config(FlightsPipeline, {"tune": {"scheduler": "ASHA"}})
    assert str(err.value) == ("invalid config for FlightsPipeline: tune.scheduler: Input should be 'fifo', 'asha', "
                              "'hyperband', 'median' or 'pbt', got 'ASHA'")


def test_prefect_form_offers_dropdowns_and_the_model_choice_reaches_the_space():
    from flows.workloads import fashion_mnist_tuning
    from tuning_core.config import FASHION_SPACE, FashionPipeline

    definitions = fashion_mnist_tuning.parameters.model_dump()["definitions"]
    assert definitions["TuneConfig"]["properties"]["search"]["enum"] == ["random", "grid", "hyperopt", "optuna"]
    model = definitions["FashionPipeline"]["properties"]["model"]["anyOf"]
    assert {"enum": ["cnn", "resnet18"], "type": "string"} in model
    # As the form submits it: a partial tune section and the model dropdown's value.
    cfg = FashionPipeline.model_validate({"data": {"source": "x"}, "tune": {"num_samples": 2}, "model": "resnet18"})
    assert cfg.tune.space == {**FASHION_SPACE, "model": "resnet18"}
    assert cfg.tune.metric == "mean_accuracy" and cfg.tune.num_samples == 2
    assert FashionPipeline.model_validate(cfg.model_dump(mode="json")) == cfg  # Prefect's JSON round trip
    assert FashionPipeline(data={"source": "x"}).tune.space is None  # no model given: the default space stands


def test_search_and_scheduler_modules_import_on_their_own():
    import subprocess
    import sys

    for module in ("tuning_core.search", "tuning_core.schedulers", "tuning_core.config"):
        subprocess.run([sys.executable, "-c", f"import {module}"], check=True, timeout=60)


def test_bad_input_run_leaves_no_prefect_api_behind(tmp_path):
    """`run` starts Prefect's ephemeral API before its checks (so that it is up by the time the flow
    starts): a run that then fails its checks must stop it, not leave it running without a parent."""
    import os
    import subprocess
    import sys
    import time
    import uuid

    import psutil

    mark = uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "RAY_ADDRESS")}
    env.update(TUNEPIPE_STORAGE=str(tmp_path / "store"), TUNEPIPE_TEST_MARK=mark)
    done = subprocess.run([sys.executable, "-c", "from flows.cli import main; main()", "run", "flights", "--data",
                           str(tmp_path / "missing.csv")], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr

    def ours() -> list[psutil.Process]:
        found = []
        for p in psutil.process_iter():
            try:
                if p.environ().get("TUNEPIPE_TEST_MARK") == mark:
                    found.append(p)
            except psutil.Error:
                continue
        return found

    deadline = time.monotonic() + 10
    while (left := ours()) and time.monotonic() < deadline:
        time.sleep(0.2)
    for p in left:
        p.kill()
    assert not left, f"left running: {[' '.join(p.cmdline()[:6]) for p in left]}"


def test_a_locked_tracking_database_is_one_line_naming_the_lock_not_an_internal_error(tmp_path, capsys):
    """SQLAlchemy's message ends with a link to its docs; the CLI's line was that link ("internal error
    (OperationalError): (Background on this error at ...)") when a stopped run held MLflow's SQLite lock."""
    import sqlite3

    import pytest
    import sqlalchemy
    import typer

    from flows.cli import _guard

    db = tmp_path / "mlflow.db"
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("CREATE TABLE t (x INTEGER)")
    holder.execute("BEGIN EXCLUSIVE")  # as a process stopped inside a write holds it
    engine = sqlalchemy.create_engine(f"sqlite:///{db}", connect_args={"timeout": 0})

    @_guard
    def command() -> None:
        try:
            with engine.connect() as conn:
                conn.execute(sqlalchemy.text("SELECT * FROM t"))
        except sqlalchemy.exc.OperationalError as err:
            raise RuntimeError("Finished in state Failed") from err  # as Prefect re-raises a task's failure

    try:
        with pytest.raises(typer.Exit) as exit_:
            command()
    finally:
        holder.execute("ROLLBACK")
    [line] = capsys.readouterr().err.splitlines()
    assert exit_.value.exit_code == 1
    assert line.startswith("error: MLflow tracking store ") and "database is locked" in line, line
    assert "tracking server" in line and "Background on this error" not in line
