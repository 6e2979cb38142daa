"""The embedded default's local Ray: its own cluster whatever /tmp/ray says, started ahead of the
tune stage and owned by it."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

_CHILD = textwrap.dedent("""
    import ray
    from infra.ray_cluster import ray_session, start_in_background, wait_for_shutdown
    from infra.settings import Settings
    from infra.storage import build_storage

    settings = Settings(storage=STORAGE, ray_num_cpus=1)
    storage = build_storage(settings)
    if AHEAD:
        start_in_background(settings)
    with ray_session(settings, storage) as where:
        assert ray.cluster_resources().get("CPU") == 1.0, ray.cluster_resources()
        print("session", where, ray.get(ray.remote(lambda: 41 + 1).remote()))
    wait_for_shutdown()
    assert not ray.is_initialized(), "the session started this Ray: it must shut it down"
    # A stage that succeeded leaves no session folder behind; one that failed keeps its logs.
    import glob, os
    sessions = lambda: sorted(p for p in glob.glob(os.environ["RAY_TMPDIR"] + "/ray/session_*") if "latest" not in p)
    print("left after success", sessions())
    try:
        with ray_session(settings, storage):
            raise KeyError("the stage failed")
    except KeyError:
        pass
    wait_for_shutdown()
    print("left after failure", len(sessions()))
""")


def _run_child(tmp_path: Path, ahead: bool) -> subprocess.CompletedProcess:
    # A short temp dir of Ray's own (socket paths are limited to ~107 characters), holding the file a
    # SIGKILLed cluster leaves behind: its address, where nothing listens any more.
    ray_tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    Path(ray_tmp, "ray").mkdir()
    Path(ray_tmp, "ray", "ray_current_cluster").write_text("127.0.0.1:1")
    code = _CHILD.replace("STORAGE", repr(str(tmp_path / "store"))).replace("AHEAD", repr(ahead))
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "RAY_TMPDIR": ray_tmp,
           "RAY_USAGE_STATS_ENABLED": "0"}
    try:
        return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=180)
    finally:
        subprocess.run(["rm", "-rf", ray_tmp], check=False)


def test_embedded_default_starts_its_own_ray_despite_a_stale_cluster_file(tmp_path):
    done = _run_child(tmp_path, ahead=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "session local 42" in done.stdout
    # The finished session's folder is gone from /tmp/ray; the failed one's logs are kept.
    assert "left after success []" in done.stdout and "left after failure 1" in done.stdout


def test_ray_started_ahead_is_adopted_and_shut_down_by_the_session(tmp_path):
    done = _run_child(tmp_path, ahead=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "session local 42" in done.stdout
    assert "not the main thread" not in done.stderr


def test_a_ray_address_where_nothing_listens_is_one_line_before_anything_starts():
    """ray.init on such an address waits for minutes; the preflight says so at once."""
    import socket

    import pytest

    from infra.ray_cluster import check_local_resources
    from infra.settings import Settings
    from tuning_core.errors import ServiceUnavailable

    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        address = f"127.0.0.1:{listening.getsockname()[1]}"
        check_local_resources(Settings(ray_address=address), cpu=64, gpu=0)  # answers; its nodes are Ray's to check
        check_local_resources(Settings(ray_address="auto"), cpu=1, gpu=0)  # not a host:port: left to Ray
    for given in (address, f"ray://{address}"):
        with pytest.raises(ServiceUnavailable) as err:
            check_local_resources(Settings(ray_address=given), cpu=1, gpu=0)
        assert str(err.value) == (f"RAY_ADDRESS {given}: no Ray cluster answers there (Connection refused); start it, "
                                  "or unset RAY_ADDRESS to tune on a local Ray")


def test_the_local_start_drops_rays_token_auth_enabled_note_but_not_its_auth_off_warning():
    """Ray printed "Token authentication is enabled for this Ray cluster..." as the first line of every run."""
    import logging

    from ray._private.authentication import authentication_token_setup as auth

    from infra.ray_cluster import _quiet_local_start

    class Kept(logging.Handler):  # on Ray's logger itself: whether it propagates depends on who set Ray up
        def __init__(self) -> None:
            super().__init__(logging.WARNING)
            self.messages: list[str] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.messages.append(record.getMessage()[:40])

    _quiet_local_start()
    _quiet_local_start()  # once is enough: no second filter
    kept, level = Kept(), auth.logger.level
    auth.logger.addHandler(kept)
    auth.logger.setLevel(logging.WARNING)
    try:
        auth._warn_token_auth_enabled()
        auth._warn_token_auth_disabled()
    finally:
        auth.logger.removeHandler(kept)
        auth.logger.setLevel(level)
    assert kept.messages == ["Token authentication is disabled for thi"]
    assert len(auth.logger.filters) == len({type(f) for f in auth.logger.filters})
