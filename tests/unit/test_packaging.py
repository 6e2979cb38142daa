"""torch is the optional ``[torch]`` extra: the flights path imports and runs without it, and FashionMNIST
without it stops in one line (exit 2) before anything is written.

Each test runs a child process in which torch cannot be imported: where torch is installed (``make test``)
a ``None`` entry in ``sys.modules`` hides it (``import torch`` raises ModuleNotFoundError and
``importlib.util.find_spec("torch")`` answers None, as for a missing package); ``make test-py313`` runs
these tests in a virtualenv that never had torch at all.
"""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import FASHION_SAMPLE, ROOT

# Run first in the child: torch is not there for it.
NO_TORCH = """
import sys
sys.modules["torch"] = None
"""

FLIGHTS_PATH = ("flows.cli", "flows.workloads", "tasks.workloads", "tasks.stages", "infra.models", "infra.ray_cluster")


def _without_torch(code: str, tmp_path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TUNEPIPE_STORAGE": str(tmp_path / "store"),
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", NO_TORCH + code, *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=180)


def test_flights_path_and_cli_help_import_no_torch(tmp_path):
    code = f"""
import importlib
for name in {FLIGHTS_PATH!r}:
    importlib.import_module(name)
assert sys.modules.get("torch") is None and not [m for m in sys.modules if m.startswith("torch.")]
sys.argv = ["tunepipe", "--help"]
from flows.cli import main
main()
"""
    done = _without_torch(code, tmp_path)

    assert done.returncode == 0, done.stderr
    assert "Run a whole pipeline" in done.stdout


def test_fashion_mnist_without_torch_exits_2_with_one_line_and_writes_nothing(tmp_path):
    code = """
sys.argv = ["tunepipe", *sys.argv[1:]]
from flows.cli import main
main()
"""
    done = _without_torch(code, tmp_path, "run", "fashion-mnist", "--data", str(FASHION_SAMPLE), "--check")

    assert done.returncode == 2, (done.stdout, done.stderr)
    assert done.stderr.strip().splitlines() == [
        "error: fashion-mnist needs torch, which is not installed: pip install 'tunepipe[torch]'"]
    assert done.stdout == ""
    assert not (tmp_path / "store").exists() and not (tmp_path / "mlflow.db").exists()
