"""The tune stage's progress updates leave Ray Tune's driver loop alone (tasks.stages.LatestValue)."""

from __future__ import annotations

import threading
import time

from tasks.stages import LatestValue


def test_puts_never_wait_on_a_slow_sender_and_the_last_value_is_sent():
    sent: list[int] = []
    release = threading.Event()

    def slow(value: int) -> None:
        release.wait(5)
        sent.append(value)

    sender = LatestValue(slow)
    started = time.monotonic()
    for value in range(1, 33):  # 32 trials finishing while the API hangs
        sender.put(value)
    assert time.monotonic() - started < 0.5
    release.set()
    sender.close()
    assert sent[-1] == 32 and len(sent) <= 3 and sent == sorted(sent)  # superseded values skipped


def test_a_failing_sender_does_not_stop_later_updates():
    sent: list[int] = []

    def flaky(value: int) -> None:
        if value == 1:
            raise ConnectionError("Prefect API down")
        sent.append(value)

    sender = LatestValue(flaky)
    sender.put(1)
    time.sleep(0.2)
    sender.put(2)
    sender.close()
    assert sent == [2]


def test_sends_are_spaced_by_the_interval_and_close_sends_the_last_at_once():
    sent: list[tuple[int, float]] = []
    sender = LatestValue(lambda value: sent.append((value, time.monotonic())), min_interval_s=0.4)
    for value in range(1, 21):  # a trial finishing every 50 ms for a second
        sender.put(value)
        time.sleep(0.05)
    closing = time.monotonic()
    sender.close()
    assert time.monotonic() - closing < 0.2  # the pending value did not wait out the interval
    values, times = [v for v, _ in sent], [t for _, t in sent]
    assert values[-1] == 20 and values == sorted(values) and 2 <= len(values) <= 5, values
    assert all(b - a >= 0.39 for a, b in zip(times[:-2], times[1:-1], strict=True)), times
