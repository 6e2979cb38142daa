"""The experiment lease (infra.lease) on a local folder and on moto's S3: acquire, re-enter, refuse a second
holder, heartbeat, expiry and take-over, a dead local holder, racing acquirers, release."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import replace

import pytest

from infra.lease import ExperimentLease, Holder, lease_store
from infra.storage import build_storage
from tuning_core.errors import ExperimentBusy, StorageError

EXPERIMENT = "flights-0123456789-abcdef0123"


@pytest.fixture(params=["local", "s3"])
def store_factory(request, tmp_path, monkeypatch):
    """A function experiment → lease store, on a temp folder or on a fresh moto bucket."""
    if request.param == "s3":
        settings = request.getfixturevalue("s3_settings")
    else:
        from infra.settings import Settings

        settings = Settings(storage=str(tmp_path / "store"))
    storage = build_storage(settings)
    return lambda experiment=EXPERIMENT: lease_store(storage, settings, experiment)


def other_host(name: str = "elsewhere") -> Holder:
    """A holder on another machine: its liveness cannot be judged from here, only its record."""
    return Holder(host=name, pid=4242, flow_run_id=f"run-{name}", token=uuid.uuid4().hex)


def lease(store, holder: Holder, ttl_s: float = 30.0, wait_s: float = 0.0) -> ExperimentLease:
    return ExperimentLease(store, EXPERIMENT, holder, ttl_s=ttl_s, wait_s=wait_s)


def record(store) -> dict:
    rec, _ = store.read()
    assert rec is not None
    return rec


def test_acquire_writes_the_holder_and_release_marks_it_released(store_factory):
    store = store_factory()
    me = Holder.this_process("flow-run-1")

    with lease(store, me):
        held = record(store)
        assert held["state"] == "held" and held["experiment"] == EXPERIMENT
        assert held["holder"]["token"] == me.token and held["holder"]["flow_run_id"] == "flow-run-1"
        assert held["holder"]["pid"] == me.pid and held["expires_at"] > time.time() + 25

    assert record(store)["state"] == "released"


def test_a_second_holder_is_refused_at_once_with_one_line_and_exit_code_3(store_factory):
    store = store_factory()
    first = other_host()
    with lease(store, first):
        started = time.monotonic()
        with pytest.raises(ExperimentBusy) as err:
            lease(store, Holder.this_process("flow-run-2")).acquire()
        assert time.monotonic() - started < 5
    message = str(err.value)
    assert "\n" not in message and err.value.exit_code == 3 and not err.value.retryable
    for part in (f"experiment {EXPERIMENT} is busy", "flow run run-elsewhere on host elsewhere, pid 4242",
                 "--wait-lease SECONDS", "TUNEPIPE_LEASE_WAIT_S"):
        assert part in message


def test_the_same_holder_re_enters_and_only_the_outermost_release_lets_go(store_factory):
    store = store_factory()
    me = Holder.this_process("flow-run-3")
    with lease(store, me) as outer:
        with lease(store, me):  # a stage retry of the same flow run in this process
            assert record(store)["holder"]["token"] == me.token
        assert record(store)["state"] == "held"
        with pytest.raises(ExperimentBusy):
            lease(store, other_host()).acquire()
        assert outer._depth == 1
    assert record(store)["state"] == "released"


def test_a_record_left_by_this_flow_run_is_taken_back_at_once(store_factory, monkeypatch, caplog):
    """The storage was down when the attempt released its lease: the record stays held, and the same
    flow run's next attempt (a stage or flow retry in this process) takes it back without waiting."""
    store = store_factory()
    me = Holder.this_process("flow-run-4")
    first = lease(store, me).acquire()
    with monkeypatch.context() as m, caplog.at_level(logging.WARNING, logger="infra.lease"):
        m.setattr(store, "replace", lambda body, tag: (_ for _ in ()).throw(StorageError("endpoint down")))
        first.release()  # logs, does not raise over the run's own outcome
    assert "lease not released (endpoint down)" in caplog.text
    assert record(store)["state"] == "held"

    with lease(store, me):
        assert record(store)["holder"]["token"] == me.token
    assert record(store)["state"] == "released"


def test_heartbeat_keeps_a_short_lease_alive(store_factory):
    store = store_factory()
    with lease(store, other_host(), ttl_s=1.0):
        before = record(store)["expires_at"]
        time.sleep(2.0)  # twice the TTL: only the heartbeat keeps it valid
        after = record(store)
        assert after["state"] == "held" and after["expires_at"] > before
        with pytest.raises(ExperimentBusy):
            lease(store, Holder.this_process("flow-run-5"), ttl_s=1.0).acquire()


def test_an_expired_lease_is_taken_over_by_a_waiting_run(store_factory, caplog):
    """The holder on another machine was SIGKILLed: no heartbeat, no release; its record expires."""
    store = store_factory()
    dead = lease(store, other_host(), ttl_s=1.5).acquire()
    dead.stop_heartbeat()
    expires_at = float(record(store)["expires_at"])  # its last renewal's (stopping may take a while on 2 CPUs)
    me = Holder.this_process("flow-run-6")

    started = time.monotonic()
    with caplog.at_level(logging.INFO, logger="infra.lease"), lease(store, me, ttl_s=1.5, wait_s=20):
        waited, took_over_at = time.monotonic() - started, time.time()
        assert record(store)["holder"]["token"] == me.token
    assert took_over_at >= expires_at and waited < 15  # not before the dead record expired
    messages = [r.getMessage() for r in caplog.records]
    assert any("is held by flow run run-elsewhere on host elsewhere" in m and "waiting up to 20 s" in m
               for m in messages), messages
    assert any("taking over its lease" in m for m in messages), messages


def test_waiting_gives_up_after_wait_s_naming_the_wait(store_factory):
    store = store_factory()
    with lease(store, other_host()):
        started = time.monotonic()
        with pytest.raises(ExperimentBusy, match=r"\(waited 1 s\)"):
            lease(store, Holder.this_process("flow-run-7"), wait_s=1.0).acquire()
        assert 0.9 < time.monotonic() - started < 5


def test_a_dead_holder_on_this_machine_is_taken_over_without_waiting_for_expiry(store_factory):
    """A run SIGKILLed on this machine and rerun at once: its pid no longer runs, so no TTL to sit out."""
    store = store_factory()
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                           text=True, check=True)
    me = Holder.this_process("flow-run-8")
    ghost = replace(me, pid=int(child.stdout), token=uuid.uuid4().hex, flow_run_id="killed-run")
    lease(store, ghost, ttl_s=3600).acquire().stop_heartbeat()

    with lease(store, me, ttl_s=3600):
        assert record(store)["holder"]["token"] == me.token


def test_a_live_holder_on_this_machine_is_not_taken_over(store_factory):
    """Another process of this machine (alive) holds it: same host, but its pid runs."""
    store = store_factory()
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        import psutil

        me = Holder.this_process("flow-run-9")
        other = replace(me, pid=child.pid, token=uuid.uuid4().hex, flow_run_id="other-run",
                        started_at=psutil.Process(child.pid).create_time())
        lease(store, other, ttl_s=3600).acquire().stop_heartbeat()
        with pytest.raises(ExperimentBusy, match=f"pid {child.pid}"):
            lease(store, me).acquire()
    finally:
        child.kill()
        child.wait()


def test_racing_acquirers_exactly_one_wins(store_factory):
    store = store_factory("race-experiment")
    holders = [other_host(f"host-{i}") for i in range(6)]
    barrier = threading.Barrier(len(holders))
    won, busy, leases = [], [], []

    def contend(holder: Holder) -> None:
        mine = ExperimentLease(store_factory("race-experiment"), "race-experiment", holder, ttl_s=30)
        barrier.wait()
        try:
            leases.append(mine.acquire())
            won.append(holder.host)
        except ExperimentBusy:
            busy.append(holder.host)

    threads = [threading.Thread(target=contend, args=(h,)) for h in holders]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    try:
        assert len(won) == 1 and len(busy) == len(holders) - 1, (won, busy)
        assert record(store)["holder"]["host"] == won[0]
    finally:
        for held in leases:
            held.release()


def test_a_lease_taken_over_while_held_is_reported_lost_not_overwritten(store_factory):
    store = store_factory()
    mine = lease(store, other_host("a"), ttl_s=30).acquire()
    mine.stop_heartbeat()
    thief = lease(store, other_host("b"), ttl_s=30)
    # Force the take-over as if the TTL had passed without a heartbeat.
    rec, tag = store.read()
    assert store.replace(json.dumps({**rec, "state": "released"}).encode(), tag)
    thief.acquire()
    try:
        assert mine.renew() is False and mine.lost.is_set()
        mine.release()  # does not touch the new holder's record
        assert record(store)["holder"]["host"] == "b" and record(store)["state"] == "held"
    finally:
        thief.release()


def test_lease_names_are_safe_keys_under_the_root(tmp_path):
    from infra.settings import Settings

    settings = Settings(storage=str(tmp_path / "store"))
    store = lease_store(build_storage(settings), settings, "my/run id")
    assert store.where == str(tmp_path / "store" / "leases" / "my_run_id.json")


def test_an_unusable_local_root_is_a_one_line_storage_error(tmp_path):
    from infra.settings import Settings

    root = tmp_path / "store"
    root.mkdir()
    (root / "leases").write_text("a file where the leases folder should be")
    settings = Settings(storage=str(root))
    with pytest.raises(StorageError, match="cannot read the lease record .Not a directory.") as err:
        lease(lease_store(build_storage(settings), settings, EXPERIMENT), other_host()).acquire()
    assert "\n" not in str(err.value) and str(root / "leases") in str(err.value)


def test_an_s3_server_that_ignores_conditional_writes_is_refused(s3_settings):
    """Such a server would let two runs both create the record; the probe finds out before any lease."""
    settings = s3_settings
    store = lease_store(build_storage(settings), settings, EXPERIMENT)
    real_put = store.client.put_object

    def ignoring(**kwargs):
        kwargs.pop("IfNoneMatch", None)
        kwargs.pop("IfMatch", None)
        return real_put(**kwargs)

    store.client.put_object = ignoring
    with pytest.raises(StorageError, match="ignores conditional writes") as err:
        lease(store, other_host()).acquire()
    assert "\n" not in str(err.value)
    assert store.read() == (None, None)  # no lease record written
