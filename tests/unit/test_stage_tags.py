"""A stage task's tags cost no write to Prefect's API when no concurrency limit is set on them
(``tasks.stages.note_tags_without_limits``), and a limit that is set still holds."""

from __future__ import annotations

import uuid

import pytest


@pytest.fixture
def slot_requests(prefect_harness, monkeypatch):
    """The tag sets for which task runs asked the API for concurrency slots (``increment-with-lease``)."""
    from prefect.client.orchestration import PrefectClient
    from prefect.concurrency import services

    asked: list[list[str]] = []
    ask = PrefectClient.increment_concurrency_slots_with_lease

    async def counted(self, names, *args, **kwargs):
        asked.append(sorted(names))
        return await ask(self, names, *args, **kwargs)

    monkeypatch.setattr(PrefectClient, "increment_concurrency_slots_with_lease", counted)
    services._no_limits_cache.clear()
    yield asked
    services._no_limits_cache.clear()


def _flow_with_tagged_task(tags: list[str], noted: list[bool]):
    from prefect import flow, task

    from tasks.stages import _Stage

    @task(tags=tags)
    def step() -> int:
        return 1

    @flow
    def pipeline() -> int:
        stage = _Stage(step)
        noted.append(stage.task.tags == set(tags))
        return stage() + stage()

    return pipeline


def test_without_limits_a_tagged_stage_asks_for_no_slots(slot_requests):
    tags = [f"t-{uuid.uuid4().hex[:8]}", "tunepipe"]
    noted: list[bool] = []
    assert _flow_with_tagged_task(tags, noted)() == 2
    assert noted == [True] and slot_requests == []

    # The control: the same task without the note asks the API (a write transaction) first.
    from prefect import flow, task

    @task(tags=tags)
    def plain() -> int:
        return 1

    @flow
    def unnoted() -> int:
        return plain()

    from prefect.concurrency import services

    services._no_limits_cache.clear()
    assert unnoted() == 1
    assert slot_requests == [sorted(f"tag:{t}" for t in tags)]


def test_a_limit_on_one_of_the_tags_is_left_to_prefect(slot_requests):
    from prefect.client.orchestration import get_client

    from tasks.stages import note_tags_without_limits

    limited = f"limited-{uuid.uuid4().hex[:8]}"
    with get_client(sync_client=True) as client:
        client.create_concurrency_limit(tag=limited, concurrency_limit=1)
        try:
            assert note_tags_without_limits([limited, "tunepipe"]) is False
            assert note_tags_without_limits(["tunepipe", "ray-tune"]) is True
            noted: list[bool] = []
            assert _flow_with_tagged_task([limited, "tunepipe"], noted)() == 2
            # Prefect took a slot on the limited tag for each run of the task.
            assert slot_requests == [sorted([f"tag:{limited}", "tag:tunepipe"])] * 2
        finally:
            client.delete_concurrency_limit_by_tag(limited)
