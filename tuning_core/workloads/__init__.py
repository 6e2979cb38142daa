"""Workloads by name: the one table tasks/, flows/, the CLI and the Prefect deployments read.

Each entry is a ``tuning_core.workloads.base.Workload`` defined in its own module; adding a workload is
adding its module and one line here (see README, "Add a workload"). The modules import their readers,
trainables and frameworks only when a method needs them, so this table costs nothing to import and a
flights run never loads the FashionMNIST reader or torch.
"""

from __future__ import annotations

from tuning_core.errors import ConfigError
from tuning_core.workloads.base import Workload
from tuning_core.workloads.fashion_mnist import WORKLOAD as _FASHION_MNIST
from tuning_core.workloads.flights import WORKLOAD as _FLIGHTS
from tuning_core.workloads.tabular import WORKLOAD as _TABULAR

WORKLOADS: dict[str, Workload] = {w.name: w for w in (_FLIGHTS, _FASHION_MNIST, _TABULAR)}


def get_workload(name: str) -> Workload:
    """The workload called ``name``; a ConfigError listing the valid names otherwise."""
    if name not in WORKLOADS:
        raise ConfigError(f"workload: one of {sorted(WORKLOADS)}, got {name!r}")
    return WORKLOADS[name]


def workload_of(cfg: object) -> Workload:
    """The workload a pipeline config belongs to (its ``workload`` field)."""
    return get_workload(getattr(cfg, "workload", ""))
