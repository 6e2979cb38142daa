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

The package, one job per module:
    state       the state folder: layout, state.json, run records, the clients' environment
    ports       choosing and keeping the services' ports
    services    how each service starts and how its health is checked (one ``Launch`` each)
    supervisor  starting, waiting for, stopping and reporting the processes; up/down/status/env
    net         loopback probes (TCP, HTTP) and free ports
"""

from infra.stack.net import HOST
from infra.stack.services import Launch, Services, find_binary
from infra.stack.state import (
    ARTIFACTS_URI,
    BUCKET,
    CORE_SERVICES,
    DEFAULT_STATE_DIR,
    MASK,
    PORT_NAMES,
    REGION,
    SERVICE_PORTS,
    SERVICES,
    STORAGE_URI,
    WORK_POOL,
    WORKER_NAME,
    ServiceStatus,
    StackState,
    StackStatus,
    default_state_dir,
    runtime_dir,
)
from infra.stack.supervisor import Supervisor, down, env, shell_exports, status, up

__all__ = [
    "ARTIFACTS_URI", "BUCKET", "CORE_SERVICES", "DEFAULT_STATE_DIR", "HOST", "MASK", "PORT_NAMES", "REGION",
    "SERVICES", "SERVICE_PORTS", "STORAGE_URI", "WORKER_NAME", "WORK_POOL", "Launch", "ServiceStatus",
    "Services", "StackState", "StackStatus", "Supervisor", "default_state_dir", "down", "env", "find_binary",
    "runtime_dir", "shell_exports", "status", "up",
]
