"""Starting, watching and stopping the stack's processes, and the public ``up``/``down``/``status``/
``env`` over them.

Only the processes this stack started are ever signalled: each one is the leader of its own session
(``start_new_session=True``), recorded with its start time so that a reused pid is never mistaken
for ours, and stopped with SIGTERM (SIGINT for the Prefect worker) and then SIGKILL for whatever is
left in its process group.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from infra.stack.net import HOST, read_from
from infra.stack.ports import assign_ports
from infra.stack.services import Services
from infra.stack.state import (
    CORE_SERVICES,
    NEEDS,
    SERVICE_PORTS,
    SERVICES,
    STAGES,
    STOP_SIGNALS,
    ServiceStatus,
    StackState,
    StackStatus,
    resolve_dir,
    service_error,
    write_private,
)
from tuning_core.errors import ConfigError, TunepipeError

logger = logging.getLogger(__name__)

# Variables a child must not inherit from the caller: they would point it at another server.
_SCRUB = ("AWS_ENDPOINT_URL", "AWS_PROFILE", "AWS_SESSION_TOKEN", "PREFECT_API_URL", "PREFECT_API_KEY",
          "PREFECT_PROFILE", "MLFLOW_TRACKING_URI", "RAY_ADDRESS")


def up(
    state_dir: Path | None = None,
    *,
    ray_head: bool = False,
    ports: dict[str, int] | None = None,
    timeout_s: float = 90,
    services: Iterable[str] | None = None,
    ray_num_cpus: int | None = None,
) -> StackStatus:
    """Start the stack (or what of it is not running yet) and wait until every service is healthy.

    Args:
        state_dir: the stack's folder (default $TUNEPIPE_STACK_DIR or ./.tunepipe/stack).
        ray_head: also start a Ray head (a head that already runs is kept either way).
        ports: fixed ports by name (see ``PORT_NAMES``; "s3", "mlflow", "prefect", "ray" are the
            ones clients use). A fixed port that is taken is an error; any other port is free,
            chosen once and kept while it stays free.
        timeout_s: how long to wait for each service to become healthy.
        services: start only these services (and what they need), e.g. ``("s3",)``.
        ray_num_cpus: CPUs the Ray head offers (default: $TUNEPIPE_RAY_NUM_CPUS or all).

    Returns:
        The status of every service of the stack.

    Raises:
        ConfigError: unknown service or port name.
        StorageError, TrackingError, TunepipeError: a service (S3, MLflow, others) could not be
            started; the one-line message names it and its log file.
    """
    sup = Supervisor(resolve_dir(state_dir))
    st = sup.state
    wanted = _wanted(services)
    with st.locked():
        st.load_or_init()
        if ray_head or st.alive("ray"):
            wanted.add("ray")  # asked for, or kept: a head a previous `up --ray-head` started
        assign_ports(st, ports or {}, keep={s for s in SERVICES if st.alive(s)},
                     starting=[s for s in wanted if not st.alive(s)])
        if ray_num_cpus is not None:
            st.data["ray_num_cpus"] = int(ray_num_cpus)
            st.save()
        for stage in STAGES:
            names = [s for s in stage if s in wanted]
            started = [name for name in names if sup.ensure_started(name)]
            for name in names:
                sup.wait_ready(name, timeout_s, fresh=name in started)
        return sup.status(include=wanted)


def down(state_dir: Path | None = None, *, timeout_s: float = 20) -> StackStatus:
    """Stop every service this stack started: SIGTERM (SIGINT for the worker), then SIGKILL.

    Data, ports and credentials stay in the state folder for the next ``up()``.

    Raises:
        TunepipeError: a process survived SIGKILL (names the service).
    """
    sup = Supervisor(resolve_dir(state_dir))
    st = sup.state
    if not st.dir.exists():
        return StackStatus(state_dir=str(st.dir))
    with st.locked():
        st.load(missing_ok=True)
        sup.stop([s for s in reversed(SERVICES) if st.record(s)], timeout_s)
        return sup.status()


def status(state_dir: Path | None = None) -> StackStatus:
    """Each service with its pid (None when not running), URL and a fresh health check."""
    sup = Supervisor(resolve_dir(state_dir))
    sup.state.load(missing_ok=True)
    return sup.status()


def env(state_dir: Path | None = None, *, show_secrets: bool = False) -> dict[str, str]:
    """The environment that points tunepipe (and boto3, MLflow, Prefect, Ray) at this stack.

    Args:
        state_dir: the stack's folder.
        show_secrets: give the S3 keys (and nothing masked) instead of "***".

    Raises:
        TunepipeError: the stack was never set up in this folder.
    """
    st = StackState(resolve_dir(state_dir))
    st.load()
    return st.client_env(show_secrets=show_secrets)


def shell_exports(variables: dict[str, str]) -> str:
    """``export K='V'`` lines for a POSIX shell (``eval "$(tunepipe stack env --show-secrets)"``)."""
    lines = []
    for key, value in variables.items():
        quoted = "'" + str(value).replace("'", "'\"'\"'") + "'"
        lines.append(f"export {key}={quoted}")
    return "\n".join(lines) + ("\n" if lines else "")


def _wanted(services: Iterable[str] | None) -> set[str]:
    names = set(CORE_SERVICES if services is None else services)
    unknown = names - set(SERVICES)
    if unknown:
        raise ConfigError(f"stack services: one of {list(SERVICES)}, got {sorted(unknown)}")
    for name in list(names):
        names.update(NEEDS.get(name, ()))
    return names


class Supervisor:
    """Starts the services of one state folder, waits for their health, stops them, reports them."""

    def __init__(self, state_dir: Path):
        self.state = StackState(state_dir)
        self.services = Services(self.state)

    def ensure_started(self, name: str) -> bool:
        """Start ``name`` unless it already runs with the same configuration. True if started."""
        st = self.state
        launch = self.services.launch(name)
        rec = st.record(name)
        if st.alive(name):
            if rec and rec.get("fingerprint") == launch.fingerprint():
                logger.info("stack %s: already running (pid %d)", name, rec["pid"])
                return False
            logger.info("stack %s: configuration changed; restarting", name)
            self.stop([name], timeout_s=20)
            launch = self.services.launch(name)
        elif rec:
            st.run_file(name).unlink(missing_ok=True)
        log = st.log_file(name)
        log.parent.mkdir(parents=True, exist_ok=True)
        launch.cwd.mkdir(parents=True, exist_ok=True)
        if launch.prepare:
            launch.prepare()
        log_offset = log.stat().st_size if log.exists() else 0
        child_env = {k: v for k, v in os.environ.items() if k not in _SCRUB}
        child_env.update(launch.env)
        # Local endpoints must never go through a corporate proxy.
        no_proxy = ",".join(filter(None, [os.environ.get("NO_PROXY", ""), HOST, "localhost"]))
        child_env["NO_PROXY"] = child_env["no_proxy"] = no_proxy
        with open(log, "ab") as out:
            out.write(f"\n=== tunepipe stack: starting {name} at {time.strftime('%Y-%m-%d %H:%M:%S')} ===\n".encode())
            out.flush()
            try:
                proc = subprocess.Popen(
                    launch.argv, cwd=launch.cwd, env=child_env, stdin=subprocess.DEVNULL, stdout=out,
                    stderr=subprocess.STDOUT, start_new_session=True, close_fds=True,
                )
            except OSError as err:
                why = f"cannot start {launch.argv[0]} ({type(err).__name__}: {err.strerror})"
                raise service_error(name, why, log) from None
        import psutil

        try:
            create_time = psutil.Process(proc.pid).create_time()
        except psutil.NoSuchProcess:
            create_time = time.time()
        write_private(st.run_file(name), json.dumps({
            "pid": proc.pid, "create_time": create_time, "fingerprint": launch.fingerprint(),
            "url": launch.url, "argv0": Path(launch.argv[0]).name, "started_at": time.time(),
            "log_offset": log_offset,
        }))
        logger.info("stack %s: started pid %d (%s), log %s", name, proc.pid, launch.url, log)
        return True

    def wait_ready(self, name: str, timeout_s: float, fresh: bool) -> None:
        launch = self.services.launch(name)
        deadline = time.monotonic() + timeout_s
        self.services.last_probe_error = ""
        while True:
            if not self.state.alive(name):
                self.stop([name], timeout_s=5)
                raise service_error(name, "exited during start-up" + self._tail(name), self.state.log_file(name))
            try:
                if launch.ready():
                    return
            except TunepipeError:
                self.stop([name], timeout_s=10)
                raise
            if time.monotonic() > deadline:
                last = self.services.last_probe_error
                why = f" (last error: {last})" if last else self._tail(name)
                self.stop([name], timeout_s=10)
                raise service_error(name, f"not healthy after {timeout_s:g} s at {launch.url}{why}",
                                    self.state.log_file(name))
            time.sleep(0.25 if fresh else 0.1)

    def _tail(self, name: str) -> str:
        """The last meaningful log line, redacted, to make the one-line error self-explaining."""
        text = read_from(self.state.log_file(name), 0)[-4000:]
        lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("===")]
        return f": {self.state.redact(lines[-1])[:200]}" if lines else ""

    def stop(self, names: list[str], timeout_s: float) -> None:
        """Graceful stop of every named service at once, then SIGKILL for anything left."""
        import psutil

        st = self.state
        records = {n: r for n in names if (r := st.record(n))}
        for name, rec in records.items():
            proc = st.process(name)
            if proc is not None:
                sig = STOP_SIGNALS.get(name, signal.SIGTERM)
                logger.info("stack %s: stopping pid %d", name, rec["pid"])
                with contextlib.suppress(psutil.Error):
                    proc.send_signal(sig)
        # Leaders first: `ray start --block` and `mlflow server` stop their own children in order.
        grace = time.monotonic() + max(timeout_s - 3, 1)
        while time.monotonic() < grace and any(st.process(n) for n in records):
            _reap(records)
            time.sleep(0.2)
        for name, rec in records.items():
            members = _group(rec)
            if members:
                logger.warning("stack %s: %d process(es) still running; killing", name, len(members))
            for proc in members:
                with contextlib.suppress(psutil.Error):
                    proc.kill()
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and any(_group(r) for r in records.values()):
            _reap(records)
            time.sleep(0.1)
        _reap(records)
        for name, rec in records.items():
            if _group(rec):
                raise TunepipeError(f"stack service {name}: processes of pid {rec['pid']} survived SIGKILL; "
                                    f"see {st.log_file(name)}")
            st.run_file(name).unlink(missing_ok=True)
            for path in self.services.leftovers(name):  # only now: the sockets are the stopped process's
                path.unlink(missing_ok=True)
        if not any(st.alive(s) for s in SERVICES):
            # Sockets and Ray's session folder; data and logs stay in the state folder.
            shutil.rmtree(st.runtime_dir, ignore_errors=True)

    def status(self, include: Iterable[str] | None = None) -> StackStatus:
        # The services this stack has (a port chosen) plus any with a run record; a Ray head
        # counts only while it has a record, since it is optional from one `up` to the next.
        st = self.state
        ports = st.data.get("ports", {})
        names = set(include or ()) | {s for s in CORE_SERVICES if SERVICE_PORTS[s][0] in ports}
        names |= {s for s in SERVICES if st.record(s)}
        out = []
        for name in (s for s in SERVICES if s in names):
            proc = st.process(name)
            healthy = False
            if proc is not None:
                try:
                    healthy = self.services.launch(name).probe()
                except TunepipeError:
                    healthy = False
            out.append(ServiceStatus(name=name, pid=proc.pid if proc else None, url=st.url(name),
                                     healthy=healthy, log=str(st.log_file(name))))
        return StackStatus(state_dir=str(st.dir), services=tuple(out))


def _group(rec: dict[str, Any]) -> list:
    """Processes still in the leader's process group, started no earlier than the leader."""
    import psutil

    members = []
    for proc in psutil.process_iter(["pid", "create_time"]):
        try:
            if os.getpgid(proc.pid) == rec["pid"] and proc.info["create_time"] >= rec["create_time"] - 0.5:
                if proc.status() != psutil.STATUS_ZOMBIE:
                    members.append(proc)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return members


def _reap(records: dict[str, dict[str, Any]]) -> None:
    """Collect exit statuses of leaders that are children of this process, so none stays a zombie."""
    for rec in records.values():
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(rec["pid"], os.WNOHANG)
