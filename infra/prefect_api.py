"""Prefect's local API for one ``tunepipe run``, started before anything imports Prefect.

Without a ``PREFECT_API_URL``, Prefect starts a temporary API server (``SubprocessASGIServer``) the
first time a flow needs it. That server takes ~5 s to come up, and the CLI could only ask for it once
Prefect itself was imported (~4 s of imports). Here the console script starts the very same server
command (uvicorn on Prefect's app factory, UI off, the same database under ``PREFECT_HOME``) as its
first step, using only the standard library, and points ``PREFECT_API_URL`` at it *before* Prefect is
imported (Prefect reads its settings once, at import). The two start-ups then overlap.

Hand-written rather than Prefect's class because that class can only be reached by importing
Prefect's server package (the cost we overlap), and because its child outlives a SIGKILLed parent:
ours dies with this process (``PR_SET_PDEATHSIG`` on Linux) and is stopped at exit otherwise.

Nothing is started when an API is configured (environment or the active Prefect profile), when the
ephemeral mode is switched off, or for commands that start no flow (``--help``, ``--check``); the
CLI then falls back to Prefect's own behaviour.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
import urllib.request
from pathlib import Path

_SERVER: dict[str, object] = {}


def _profile_setting(name: str) -> str | None:
    """A setting of the active profile of ``$PREFECT_HOME/profiles.toml``, if any."""
    home = Path(os.environ.get("PREFECT_HOME", "~/.prefect")).expanduser()
    path = Path(os.environ.get("PREFECT_PROFILES_PATH", home / "profiles.toml")).expanduser()
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return None
    active = os.environ.get("PREFECT_PROFILE") or data.get("active", "ephemeral")
    value = (data.get("profiles", {}).get(active) or {}).get(name)
    return None if value is None else str(value)


def wanted(argv: list[str]) -> bool:
    """True for a command that runs a flow on Prefect's temporary API."""
    if not argv or argv[0] != "run" or {"--check", "--help", "-h"} & set(argv):
        return False
    if os.environ.get("PREFECT_API_URL") or _profile_setting("PREFECT_API_URL"):
        return False
    allow = os.environ.get("PREFECT_SERVER_ALLOW_EPHEMERAL_MODE", "true").lower()
    return allow not in ("0", "false", "no", "off")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


# Automations (Prefect's triggers service and the actions it fires) are not served by the one-run API:
# with no UI and no clients but this run, none can be created on it, and a real Prefect server (the
# local stack's or yours) serves them. Starting them cost this API ~1.3 s of CPU on 2 cores (the
# actions service builds a second copy of the whole API app for its client) while the run starts.
# ``PREFECT_SERVER_SERVICES_TRIGGERS_ENABLED=true`` (environment or profile) turns them back on.
_TRIGGERS = "PREFECT_SERVER_SERVICES_TRIGGERS_ENABLED"


def _server_env(port: int) -> dict[str, str]:
    env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
           "PREFECT__SERVER_FINAL": "1", "PREFECT_API_URL": f"http://127.0.0.1:{port}/api"}
    if _TRIGGERS not in env and _profile_setting(_TRIGGERS) is None:
        env[_TRIGGERS] = "false"
    return env


def _spawn(port: int) -> subprocess.Popen[bytes]:
    spec = importlib.util.find_spec("prefect")  # finds the package without importing it
    assert spec is not None and spec.origin is not None
    return subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--app-dir", str(Path(spec.origin).parent.parent), "--factory",
         "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port),
         "--log-level", "error", "--lifespan", "on"],
        env=_server_env(port), stdin=subprocess.DEVNULL,
        preexec_fn=_die_with_parent if sys.platform == "linux" else None,  # noqa: PLW1509 - no threads yet
    )


def start_early(argv: list[str]) -> None:
    """Start the server for a ``tunepipe run`` and point this process's Prefect at it."""
    # Prefect reads PREFECT_API_URL once, when imported: too late once it is.
    if started() or "prefect" in sys.modules or not wanted(argv) or importlib.util.find_spec("uvicorn") is None:
        return
    port = _free_port()
    _SERVER.update(process=_spawn(port), port=port)
    os.environ["PREFECT_API_URL"] = f"http://127.0.0.1:{port}/api"
    # The server serves no UI; without this Prefect would print links to one.
    os.environ.setdefault("PREFECT_UI_URL", "")
    atexit.register(stop)


def started() -> bool:
    return "process" in _SERVER


def wait_ready(timeout_s: float = 120.0) -> None:
    """Block until the server answers ``/health`` (a no-op when none was started here)."""
    if not started():
        return
    deadline = time.monotonic() + timeout_s
    process: subprocess.Popen[bytes] = _SERVER["process"]  # type: ignore[assignment]
    while time.monotonic() < deadline:
        code = process.poll()
        if code is not None:
            raise RuntimeError(f"Prefect's local API server exited with code {code} while starting")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(f"http://127.0.0.1:{_SERVER['port']}/api/health", timeout=2) as r:
                if r.status == 200:
                    return
        time.sleep(0.05)
    raise RuntimeError(f"Prefect's local API server did not answer within {timeout_s:.0f} s")


def stop() -> None:
    """Stop the server (SIGTERM, then SIGKILL after 5 s), as Prefect's own temporary server stops."""
    process: subprocess.Popen[bytes] | None = _SERVER.pop("process", None)  # type: ignore[assignment]
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
