"""The local Prefect API a ``tunepipe run`` starts before importing Prefect (infra/prefect_api.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from infra import prefect_api

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("argv", "env", "expected"), [
    (["run", "flights"], {}, True),
    (["run", "flights", "--check"], {}, False),
    (["run", "flights", "--help"], {}, False),
    (["prepare", "flights"], {}, False),
    ([], {}, False),
    (["run", "flights"], {"PREFECT_API_URL": "http://127.0.0.1:4200/api"}, False),
    (["run", "flights"], {"PREFECT_SERVER_ALLOW_EPHEMERAL_MODE": "false"}, False),
])
def test_only_a_run_without_a_configured_api_starts_one(monkeypatch, tmp_path, argv, env, expected):
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path))
    for name in ("PREFECT_API_URL", "PREFECT_PROFILE", "PREFECT_PROFILES_PATH", "PREFECT_SERVER_ALLOW_EPHEMERAL_MODE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert prefect_api.wanted(argv) is expected


def test_an_api_url_in_the_active_profile_is_respected(monkeypatch, tmp_path):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.delenv("PREFECT_PROFILES_PATH", raising=False)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path))
    (tmp_path / "profiles.toml").write_text(textwrap.dedent("""
        active = "team"
        [profiles.team]
        PREFECT_API_URL = "http://prefect.internal:4200/api"
        [profiles.local]
    """))
    monkeypatch.delenv("PREFECT_PROFILE", raising=False)
    assert not prefect_api.wanted(["run", "flights"])
    monkeypatch.setenv("PREFECT_PROFILE", "local")
    assert prefect_api.wanted(["run", "flights"])


def test_automations_are_off_in_the_one_run_api_unless_asked_for(monkeypatch, tmp_path):
    """The triggers service (and the actions it fires) cost the one-run API ~1.3 s of a 2-core start;
    no automation can be created on that API. Asked for in the environment or the profile, they run."""
    name = "PREFECT_SERVER_SERVICES_TRIGGERS_ENABLED"
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path))
    for var in (name, "PREFECT_PROFILE", "PREFECT_PROFILES_PATH"):
        monkeypatch.delenv(var, raising=False)
    assert prefect_api._server_env(4321)[name] == "false"
    monkeypatch.setenv(name, "true")
    assert prefect_api._server_env(4321)[name] == "true"
    monkeypatch.delenv(name)
    (tmp_path / "profiles.toml").write_text(f'active = "mine"\n[profiles.mine]\n{name} = true\n')
    assert name not in prefect_api._server_env(4321)  # the server reads the profile's value itself


def test_the_server_answers_and_dies_with_a_sigkilled_parent():
    """A run SIGKILLed (OOM killer, kill -9) must not leave Prefect's server behind: Prefect's own
    temporary server outlived its parent; ours has PR_SET_PDEATHSIG."""
    if sys.platform != "linux":
        pytest.skip("PR_SET_PDEATHSIG is Linux's")
    script = textwrap.dedent("""
        import os, sys, time
        from infra import prefect_api
        prefect_api.start_early(["run", "flights"])
        assert os.environ["PREFECT_API_URL"].startswith("http://127.0.0.1:")
        prefect_api.wait_ready()
        print(prefect_api._SERVER["process"].pid, flush=True)
        time.sleep(600)
    """)
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    parent = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    try:
        line = parent.stdout.readline()
        assert line.strip().isdigit(), f"the server did not come up (parent exit {parent.poll()})"
        server = psutil.Process(int(line))
        assert "uvicorn" in " ".join(server.cmdline()) and "127.0.0.1" in server.cmdline()
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
    deadline = time.monotonic() + 20
    while server.is_running() and server.status() != psutil.STATUS_ZOMBIE and time.monotonic() < deadline:
        time.sleep(0.1)
    alive = server.is_running() and server.status() != psutil.STATUS_ZOMBIE
    if alive:
        server.kill()
    assert not alive, "Prefect's API server outlived its SIGKILLed parent"
