"""Whether a RAY_ADDRESS answers at all, before ``ray.init`` is asked to join it.

``ray.init`` on a ``host:port`` where nothing listens waits for minutes (seen: over 3, up to ~5) before it
gives up. The tune stage (``infra.ray_cluster``) and the flights data stage's Ray engine both check
first, each naming its own way out.
"""

from __future__ import annotations

import socket

from tuning_core.errors import ServiceUnavailable


def check_answers(address: str, remedy: str, timeout_s: float = 5.0) -> None:
    """A ``host:port`` (or ``ray://host:port``) address must accept a connection within ``timeout_s``;
    other forms ("auto") are left to Ray.

    Raises:
        ServiceUnavailable: "RAY_ADDRESS <address>: no Ray cluster answers there (<why>); start it, or
            <remedy>" (retryable: the cluster may be starting).
    """
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not host or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as err:
        raise ServiceUnavailable(f"RAY_ADDRESS {address}: no Ray cluster answers there ({err.strerror or err}); "
                                 f"start it, or {remedy}") from None
