"""The console script (flows/console.py): exit codes and output survive its fast exit."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _console(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "flows.console", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=120, check=False)


@pytest.mark.parametrize("full_exit", ["0", "1"])
def test_exit_codes_and_output_are_the_commands(full_exit):
    done = _console("--version", TUNEPIPE_FULL_EXIT=full_exit)
    assert done.returncode == 0 and done.stdout.startswith("tunepipe ")
    bad = _console("run", "flights", "--num-samples", "0", TUNEPIPE_FULL_EXIT=full_exit)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        "error: invalid config for FlightsPipeline: tune.num_samples: Input should be greater than or equal to 1"]
