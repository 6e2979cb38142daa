"""The layering of DESIGN.md, checked by parsing every import: flows → tasks → {tuning_core, infra}; and
one door per concern: workloads only behind the registry, MLflow written only by infra/tracking.py."""

from __future__ import annotations

import ast
import re
import tokenize
from pathlib import Path

import pytest

from tests.conftest import ASA_SAMPLE

ROOT = Path(__file__).resolve().parents[2]

FORBIDDEN = {
    "tuning_core": {"prefect", "mlflow", "boto3", "infra", "tasks", "flows"},
    "infra": {"prefect", "tasks", "flows"},
    "tasks": {"flows"},
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_respect_layering(package):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"no python files in {package}"
    bad = {str(f.relative_to(ROOT)): sorted(_imports(f) & FORBIDDEN[package]) for f in files}
    assert {f: v for f, v in bad.items() if v} == {}


def test_mlflow_and_boto3_only_in_infra():
    offenders = []
    for package in ("flows", "tasks", "tuning_core"):
        for f in (ROOT / package).rglob("*.py"):
            if _imports(f) & {"boto3"}:
                offenders.append(str(f.relative_to(ROOT)))
    for f in (ROOT / "tuning_core").rglob("*.py"):
        if _imports(f) & {"mlflow"}:
            offenders.append(str(f.relative_to(ROOT)))
    assert offenders == []


def test_importing_modules_has_no_side_effects(tmp_path):
    """Importing the packages creates no files in the working directory (no import-time set-up)."""
    import subprocess
    import sys

    mods = ["tuning_core.config", "infra.settings", "infra.storage", "infra.tracking", "tasks.stages",
            "flows.workloads", "flows.cli"]
    code = "import importlib\n" + "".join(f"importlib.import_module({m!r})\n" for m in mods)
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True, timeout=120,
                   env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "HOME": str(tmp_path)})
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == []


# --------------------------------------------------------------------------- one door per concern
# Workload names and what only one workload uses (its reader, its framework); "preflight" is not a flight.
WORKLOAD_WORDS = re.compile(r"(?<![a-z])flights?(?![a-z])|fashion|mnist|tabular|(?<![a-z])idx(?![a-z])|xgboost|torch",
                            re.IGNORECASE)


def _workload_mentions(path: Path) -> list[str]:
    """Names and strings (docstrings too) of a module that name a workload or what only one uses."""
    found = []
    with path.open("rb") as f:
        for tok in tokenize.tokenize(f.readline):
            if tok.type in (tokenize.NAME, tokenize.STRING) and WORKLOAD_WORDS.search(tok.string):
                found.append(f"{path.relative_to(ROOT)}:{tok.start[0]}: {tok.string[:60]}")
    return found


def _workload_branches(path: Path) -> list[str]:
    """Comparisons and matches on a config's ``workload`` field (``if cfg.workload == ...``)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        subjects = ([node.left, *node.comparators] if isinstance(node, ast.Compare)
                    else [node.subject] if isinstance(node, ast.Match) else [])
        if any(isinstance(s, ast.Attribute) and s.attr == "workload" for s in subjects):
            found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    return found


def test_tasks_and_flows_name_no_workload_and_never_branch_on_one():
    """Workloads live in tuning_core/workloads/ behind one protocol; tasks/ and flows/ reach them only
    through the WORKLOADS table, so adding one touches neither."""
    files = [f for package in ("tasks", "flows") for f in sorted((ROOT / package).rglob("*.py"))]
    assert files
    assert [m for f in files for m in _workload_mentions(f)] == []
    assert [b for f in files for b in _workload_branches(f)] == []


def test_the_workload_check_sees_a_name_and_a_branch(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text('def f(cfg):\n    if cfg.workload == "x":\n        from tuning_core.data import idx\n')
    global ROOT
    saved, ROOT = ROOT, tmp_path
    try:
        assert _workload_mentions(bad) == ["bad.py:3: idx"]
        assert _workload_branches(bad) == ["bad.py:2"]
    finally:
        ROOT = saved


# A write call on MLflow's fluent API or on a client (``mlflow.log_metric``, ``tracker.client.set_tag``,
# ``MlflowClient().create_run``); calls of Tracker's own methods are the door itself.
MLFLOW_WRITES = re.compile(
    r"(\bmlflow(\.\w+)*|\bclient|MlflowClient\([^)]*\))\.(log_batch|log_params?|log_metrics?|log_artifacts?|"
    r"log_model|log_input|log_table|log_dict|log_figure|log_image|log_text|set_tags?|set_terminated|create_run|create_experiment|create_registered_model|"
    r"create_model_version|register_model|set_registered_model_alias|delete_registered_model_alias|"
    r"set_model_version_tag|set_registered_model_tag|start_run|end_run|delete_run|set_experiment_tag)\(")


def test_every_mlflow_write_happens_in_infra_tracking():
    """One door to MLflow: runs, params, metrics, artifacts, models, tags, registrations and aliases are
    written in infra/tracking.py only (infra/models.py builds what a model is; it writes nothing)."""
    writes = []
    for package in ("tuning_core", "infra", "tasks", "flows"):
        for f in sorted((ROOT / package).rglob("*.py")):
            if f == ROOT / "infra" / "tracking.py":
                continue
            for n, line in enumerate(f.read_text().splitlines(), start=1):
                if MLFLOW_WRITES.search(line.split("#", 1)[0]):
                    writes.append(f"{f.relative_to(ROOT)}:{n}: {line.strip()}")
    assert writes == []
    assert MLFLOW_WRITES.search((ROOT / "infra" / "tracking.py").read_text())  # the pattern does find writes


def test_a_flights_run_loads_no_module_of_another_workload(tmp_path):
    """In a fresh interpreter: the CLI, the flows, the stage glue and the flights workload's whole path
    (preflight checks included) load neither the FashionMNIST reader nor torch."""
    import subprocess
    import sys

    code = f"""
import importlib, sys
for name in ("flows.cli", "flows.workloads", "tasks.stages", "tasks.workloads", "infra.models"):
    importlib.import_module(name)
from infra.settings import get_settings
from tasks import workloads
from tuning_core.config import FlightsPipeline
cfg = FlightsPipeline(data={{"source": {str(ASA_SAMPLE)!r}, "max_rows": 500}})
workloads.preflight(cfg, workloads.Context.build(get_settings()))
loaded = sorted(m for m in sys.modules if m == "tuning_core.data.idx" or m.split(".")[0] == "torch"
                or m.startswith(("tuning_core.trainables.torch", "tuning_core.models.cnn")))
print("LOADED", loaded)
"""
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "HOME": str(tmp_path),
           "TUNEPIPE_STORAGE": str(tmp_path / "store"), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db",
           "RAY_USAGE_STATS_ENABLED": "0"}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "LOADED []" in done.stdout, done.stdout
