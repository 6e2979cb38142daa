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
    from tests.unit.test_bad_inputs import _model_versions, _written

    ok = CliRunner().invoke(app, ["run", "flights", "--data", str(ASA_SAMPLE), "--num-samples", "3", "--check"])
    assert ok.exit_code == 0, ok.output
    assert ok.stdout.startswith("checks passed: flights config") and "3 trials of hyperopt+asha" in ok.stdout
    typo = tmp_path / "typo.yaml"
    typo.write_text("tune:\n  space:\n    max_dpth: {type: randint, low: 3, high: 8}\n")
    bad = CliRunner().invoke(app, ["run", "flights", "--data", str(ASA_SAMPLE), "--config", str(typo), "--check"])
    assert bad.exit_code == 2 and "did you mean 'max_depth'?" in bad.stderr
    # Neither started anything: no data version, no Ray experiment, no model version.
    assert _written(str(tmp_path / "store"), local_settings) == []
    assert _model_versions(tmp_path / "mlflow.db") == []
