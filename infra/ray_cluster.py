"""Ray connection: join an existing cluster (RAY_ADDRESS) or start a local one.

We only ever shut down a Ray instance that we started ourselves.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

from infra.settings import Settings
from infra.storage import Storage
from tuning_core.errors import ConfigError

log = logging.getLogger(__name__)

# Quiet Ray's console: the pipeline reports progress itself (logs, Prefect artifacts).
_RAY_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AIR_NEW_OUTPUT": "0",
    "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0",
    "RAY_DEDUP_LOGS": "0",
}


def _storage_env(settings: Settings) -> dict[str, str]:
    """Env the Ray workers need to reach the same S3 endpoint (trials write checkpoints there)."""
    env = {"AWS_REQUEST_CHECKSUM_CALCULATION": "when_required", "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required"}
    if settings.s3_endpoint_url:
        env["AWS_ENDPOINT_URL_S3"] = settings.s3_endpoint_url
    return env


@contextlib.contextmanager
def ray_session(settings: Settings, storage: Storage, num_cpus: int | None = None) -> Iterator[str]:
    """Connect to Ray for the duration of a stage.

    Yields a short description ("existing", "local", or the address). A multi-node cluster with a
    local-folder storage root is refused: Ray Tune needs shared storage (S3) across nodes.
    """
    import ray

    for k, v in _RAY_ENV.items():
        os.environ.setdefault(k, v)
    started = False
    if ray.is_initialized():
        where = "existing"
    elif settings.ray_address:
        ray.init(address=settings.ray_address, log_to_driver=False, configure_logging=False,
                 runtime_env={"env_vars": _storage_env(settings)})
        where = settings.ray_address
        started = True  # our connection, not the cluster: shutdown() only disconnects this driver
    else:
        ray.init(num_cpus=num_cpus or settings.ray_num_cpus or os.cpu_count(), include_dashboard=False,
                 log_to_driver=False, configure_logging=False)
        where = "local"
        started = True
    try:
        alive = [n for n in ray.nodes() if n.get("Alive")]
        if len(alive) > 1 and not storage.is_s3:
            raise ConfigError(
                f"Ray cluster has {len(alive)} nodes but the storage root {storage.uri} is a local folder; "
                "multi-node tuning needs shared storage: set TUNEPIPE_STORAGE=s3://bucket/prefix"
            )
        log.info("Ray: %s, %d node(s), %s CPUs", where, len(alive), ray.cluster_resources().get("CPU"))
        yield where
    finally:
        if started:
            ray.shutdown()
