"""Environment defaults every tunepipe process sets before Prefect, Ray or MLflow is imported (each
reads its settings once, at import). A variable the user set wins."""

from __future__ import annotations

import os

QUIET_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0", "RAY_AIR_NEW_OUTPUT": "0",
    "GIT_PYTHON_REFRESH": "quiet",
    # Prefect's ephemeral API can take longer than its 20 s default on a busy machine.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "PREFECT_LOGGING_EXTRA_LOGGERS": "tuning_core,infra",
    # No telemetry from the embedded API: machines without internet (and its heartbeat
    # raced our SQLite writes: "database is locked" in the logs).
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    # The CLI prints its own lines and table; MLflow's INFO chatter (database set-up on a fresh store,
    # "Created version", input-example validation) and artifact progress bars only bury them.
    "MLFLOW_LOGGING_LEVEL": "WARNING",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required",
    "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required",
}


def apply_quiet_env() -> None:
    for k, v in QUIET_ENV.items():
        os.environ.setdefault(k, v)
