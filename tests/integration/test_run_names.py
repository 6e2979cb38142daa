"""Flow run names as the Prefect UI lists them: meaningful from the start, refined by the data stage."""

from __future__ import annotations

import re

import pytest

pytestmark = pytest.mark.integration

STAMP = r"\d{8}-\d{4}"


def _run_name(state) -> str:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(state.state_details.flow_run_id).name


def test_run_failing_before_the_data_stage_is_named_for_workload_and_date(local_settings, prefect_harness, tmp_path):
    from flows.workloads import flights_tuning
    from tuning_core.config import FlightsData, FlightsPipeline

    cfg = FlightsPipeline(data=FlightsData(source=str(tmp_path / "missing.csv")))
    state = flights_tuning(cfg, return_state=True)
    assert state.is_failed()
    assert re.fullmatch(f"flights-{STAMP}", _run_name(state))  # was "flights-flights"


def test_data_stage_puts_the_version_into_the_name_and_keeps_the_date(prefect_harness):
    from prefect import flow

    from flows.pipeline import rename_run, start_name
    from tuning_core.config import FlightsPipeline

    @flow(flow_run_name=start_name("flights"))
    def named() -> str:
        from prefect.runtime import flow_run

        started_as = flow_run.name
        rename_run(FlightsPipeline(), "4ac2bd6457e1fd0d")
        return started_as

    state = named(return_state=True)
    started_as, name = state.result(), _run_name(state)
    assert re.fullmatch(f"flights-{STAMP}", started_as)
    assert name == f"flights-4ac2bd6457-{started_as.removeprefix('flights-')}"
