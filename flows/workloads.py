"""One Prefect flow per registered workload, generated from ``tuning_core.workloads.WORKLOADS``.

Each flow runs the shared DAG (``flows.pipeline.run_pipeline``) with a ``cfg`` parameter typed by its
workload's config model, so the Prefect UI renders that model as the run form. Each is bound to a
module-level name, ``<workload>_tuning`` with dashes as underscores, which is what ``prefect.yaml``'s
entrypoints name (``flows/workloads.py:<name>``); the flow's name is ``<workload>-tuning``.
"""

from __future__ import annotations

import inspect
from typing import Any

from prefect import Flow, flow

from flows.pipeline import run_pipeline, start_name
from tuning_core.workloads import WORKLOADS
from tuning_core.workloads.base import Workload


def attribute_name(workload: Workload) -> str:
    """The module-level name of a workload's flow."""
    return f"{workload.name.replace('-', '_')}_tuning"


def _default(model: type) -> Any:
    """The config model's default instance, or ``inspect.Parameter.empty`` when a field has no
    default (e.g. a data source that must be given): the form then asks for it."""
    try:
        return model()
    except Exception:  # noqa: BLE001 - pydantic's ValidationError: required fields
        return inspect.Parameter.empty


def build_flow(workload: Workload) -> Flow:
    """The workload's flow: ``cfg`` typed with its config model, then the shared DAG."""
    model = workload.config_model

    def run(cfg: Any) -> dict[str, Any]:
        return run_pipeline(cfg)

    run.__name__ = run.__qualname__ = attribute_name(workload)
    run.__module__ = __name__
    run.__doc__ = f"{workload.title[:1].upper()}{workload.title[1:]}: prepare, tune, retrain the best config, " \
                  f"register it, report."
    # Prefect builds the parameter schema (the UI form) and validates runs from the signature.
    run.__annotations__ = {"cfg": model, "return": dict[str, Any]}
    run.__signature__ = inspect.Signature(
        [inspect.Parameter("cfg", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=_default(model), annotation=model)],
        return_annotation=dict[str, Any])
    return flow(run, name=f"{workload.name}-tuning", flow_run_name=start_name(workload.name),
                validate_parameters=True)


FLOWS: dict[str, Flow] = {name: build_flow(w) for name, w in WORKLOADS.items()}
globals().update({attribute_name(WORKLOADS[name]): f for name, f in FLOWS.items()})
