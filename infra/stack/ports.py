"""Choosing the stack's ports: fixed ones checked, the others chosen once and kept while free."""

from __future__ import annotations

import logging

from infra.stack.net import HOST, free_port, port_free
from infra.stack.state import PORT_NAMES, SERVICE_PORTS, SERVICES, StackState, service_error
from tuning_core.errors import ConfigError

logger = logging.getLogger(__name__)


def assign_ports(state: StackState, fixed: dict[str, int], keep: set[str], starting: list[str]) -> None:
    """Give every port of the ``starting`` services a number, leave those of ``keep`` as they are."""
    unknown = set(fixed) - set(PORT_NAMES)
    if unknown:
        raise ConfigError(f"stack ports: names are {list(PORT_NAMES)}, got {sorted(unknown)}")
    saved: dict[str, int] = dict(state.data.get("ports", {}))
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
                if port in taken or not port_free(port):
                    raise service_error(svc, f"port {name}={port} on {HOST} is in use; pick another "
                                             f"(ports={{{name!r}: ...}}) or stop what holds it", state.log_file(svc))
            elif saved.get(name) and saved[name] not in taken and port_free(saved[name]):
                port = saved[name]
            else:
                port = free_port(taken)
                if saved.get(name):
                    logger.warning("stack %s: port %s=%d is taken; using %d", svc, name, saved[name], port)
            saved[name] = port
            taken.add(port)
    state.data["ports"] = saved
    state.save()
