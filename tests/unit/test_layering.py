"""The layering of DESIGN.md, checked by parsing every import: flows → tasks → {tuning_core, infra}."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

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
            "flows.flights", "flows.cli"]
    code = "import importlib\n" + "".join(f"importlib.import_module({m!r})\n" for m in mods)
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True, timeout=120,
                   env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "HOME": str(tmp_path)})
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == []
