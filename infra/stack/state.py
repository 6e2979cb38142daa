"""The stack's state folder: its layout, state.json (ports, S3 credentials), the run records of the
services it started, and the environment that points clients at it."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import secrets
import signal
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from infra.stack.net import HOST
from tuning_core.errors import StorageError, TrackingError, TunepipeError

logger = logging.getLogger(__name__)

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
NEEDS = {"mlflow": ("s3",), "worker": ("prefect",)}
# Services in one stage start side by side, then the stage waits for all of them to be healthy.
STAGES = (("s3",), ("mlflow", "prefect", "ray"), ("worker",))
_ERRORS: dict[str, type[TunepipeError]] = {"s3": StorageError, "mlflow": TrackingError}
# Prefect's worker stops at once on SIGINT; on SIGTERM it lingers ~15 s. SeaweedFS takes a few
# seconds on SIGTERM; `ray start --block` drains the node and stops its own children.
STOP_SIGNALS = {"worker": signal.SIGINT}

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
CHECKSUM_ENV = {
    "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required",
    "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required",
}


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


def default_state_dir() -> Path:
    """$TUNEPIPE_STACK_DIR, or ./.tunepipe/stack."""
    return Path(os.environ.get("TUNEPIPE_STACK_DIR") or DEFAULT_STATE_DIR).expanduser()


def resolve_dir(state_dir: Path | str | None) -> Path:
    return Path(state_dir).expanduser().absolute() if state_dir else default_state_dir().absolute()


def runtime_dir(state_dir: Path | None = None) -> Path:
    """The stack's short folder for unix sockets (Ray's session folder, SeaweedFS's sockets).

    Socket paths must stay under 107 characters, which a state folder deep in a project (or a
    pytest tmp_path) can exceed. Removed once no service of the stack runs.
    """
    digest = hashlib.sha1(str(resolve_dir(state_dir)).encode()).hexdigest()[:10]
    return Path(tempfile.gettempdir()) / f"tunepipe-{digest}"


def service_error(service: str, what: str, log: Path) -> TunepipeError:
    cls = _ERRORS.get(service, TunepipeError)
    return cls(f"stack service {service}: {what}; see {log}")


def write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read, atomically (credentials, tokens, pids)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


class StackState:
    """One state folder: state.json (``data``: ports, S3 credentials), run records, logs, secrets."""

    def __init__(self, state_dir: Path):
        self.dir = state_dir
        self.data: dict[str, Any] = {}

    # ---- files --------------------------------------------------------------------------------

    @property
    def state_file(self) -> Path:
        return self.dir / "state.json"

    def log_file(self, name: str) -> Path:
        return self.dir / "logs" / f"{name}.log"

    def run_file(self, name: str) -> Path:
        return self.dir / "run" / f"{name}.json"

    def ray_token_file(self) -> Path:
        return self.dir / "ray" / "auth_token"

    @property
    def runtime_dir(self) -> Path:
        return runtime_dir(self.dir)

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
                self.data = {}
                return
            raise TunepipeError(f"stack {self.dir}: not set up yet (no state.json); run `tunepipe stack up`")
        try:
            self.data = json.loads(self.state_file.read_text())
        except (OSError, ValueError) as err:
            raise TunepipeError(f"stack {self.dir}: state.json unreadable ({type(err).__name__}); "
                                "fix or remove it (credentials are stored there)") from None

    def load_or_init(self) -> None:
        self.load(missing_ok=True)
        if not self.data:
            # Generated once and kept: the S3 data and MLflow artifacts stay readable across restarts.
            self.data = {
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
        write_private(self.state_file, json.dumps(self.data, indent=2))

    # ---- run records --------------------------------------------------------------------------

    def record(self, name: str) -> dict[str, Any] | None:
        try:
            return json.loads(self.run_file(name).read_text())
        except (OSError, ValueError):
            return None

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

    # ---- where clients reach it ---------------------------------------------------------------

    def port(self, name: str) -> int:
        try:
            return int(self.data["ports"][name])
        except KeyError:
            raise TunepipeError(f"stack {self.dir}: no port for {name!r} yet; run `tunepipe stack up`") from None

    def url(self, name: str) -> str | None:
        """Where clients reach ``name`` (known once its port is chosen, running or not)."""
        port = self.data.get("ports", {}).get(SERVICE_PORTS[name][0])
        if not port:
            return None
        return {"s3": f"http://{HOST}:{port}", "mlflow": f"http://{HOST}:{port}",
                "prefect": f"http://{HOST}:{port}/api", "worker": f"http://{HOST}:{port}/health",
                "ray": f"{HOST}:{port}"}[name]

    def s3_endpoint(self) -> str:
        return f"http://{HOST}:{self.port('s3')}"

    def client_env(self, show_secrets: bool = False) -> dict[str, str]:
        s3 = self.data["s3"]
        env = {
            "TUNEPIPE_STORAGE": STORAGE_URI,
            "AWS_ENDPOINT_URL_S3": self.s3_endpoint(),
            "AWS_ACCESS_KEY_ID": s3["access_key"] if show_secrets else MASK,
            "AWS_SECRET_ACCESS_KEY": s3["secret_key"] if show_secrets else MASK,
            "AWS_DEFAULT_REGION": s3.get("region", REGION),
            **CHECKSUM_ENV,
        }
        ports = self.data.get("ports", {})
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
        s3 = self.data.get("s3", {})
        values = [s3.get("secret_key"), s3.get("access_key")]
        token = self.ray_token_file()
        if token.exists():
            values.append(token.read_text().strip())
        return [v for v in values if v]

    def redact(self, text: str) -> str:
        for value in self.secrets():
            text = text.replace(value, MASK)
        return text
