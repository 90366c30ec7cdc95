"""Async and threaded calls, cancellation, and the socket staying read while user code runs."""

from __future__ import annotations

import statistics
import sys
import time
from typing import List

import pytest

from pyvisor_worker.testing import Beat, FakeParent


def _wait_running(parent: FakeParent, call_id: int, timeout: float = 10.0) -> None:
    """Poll with pings until the worker reports call_id as running."""
    deadline = time.monotonic() + timeout
    nonce = 0
    while time.monotonic() < deadline:
        nonce += 1
        parent.ping(nonce)
        beat = parent.pong_for(nonce)
        if any(c[0] == call_id and c[2] == "running" for c in beat["in_progress"]):
            return
        time.sleep(0.01)
    raise AssertionError(f"call {call_id} never reported running")


@pytest.mark.skipif(sys.version_info < (3, 11), reason="asyncio.Barrier is Python 3.11+")
def test_async_calls_overlap(worker: FakeParent) -> None:
    ids = [worker.call("async_barrier") for _ in range(4)]
    for call_id in ids:
        reply = worker.reply_for(call_id, timeout=20)
        assert reply.ok and reply.value == "through", reply.error


def test_threaded_calls_overlap(worker: FakeParent) -> None:
    ids = [worker.call("thread_barrier") for _ in range(4)]
    names = set()
    for call_id in ids:
        reply = worker.reply_for(call_id, timeout=20)
        assert reply.ok, reply.error
        names.add(reply.value)
    assert len(names) == 4
    assert all(n.startswith("pyvisor-thread_barrier") for n in names)


def test_async_exception(worker: FakeParent) -> None:
    reply = worker.reply_for(worker.call("async_fail"))
    assert reply.error["kind"] == "exception"
    assert reply.error["type"] == "__main__.MyError"
    assert "async failure" in reply.error["traceback"]


def test_cancel_running_async_call(worker: FakeParent) -> None:
    call_id = worker.call("async_sleep", 30)
    _wait_running(worker, call_id)
    worker.cancel(call_id)
    reply = worker.reply_for(call_id, timeout=10)
    assert not reply.ok
    assert reply.error["kind"] == "cancelled"
    assert worker.invoke("async_sleep", 0) == "slept"


def test_running_inline_call_sees_cancel(worker: FakeParent) -> None:
    call_id = worker.call("until_cancelled", 30)
    _wait_running(worker, call_id)
    worker.cancel(call_id)
    reply = worker.reply_for(call_id, timeout=10)
    assert reply.ok and reply.value == "saw cancel"


def test_queued_inline_call_is_dropped_on_cancel(worker: FakeParent) -> None:
    slow = worker.call("sleep", 1.0)
    queued = worker.call("echo", "never runs")
    worker.cancel(queued)
    reply = worker.reply_for(queued, timeout=10)
    assert reply.error["kind"] == "cancelled"
    assert worker.reply_for(slow, timeout=10).value == 1.0
    worker.cancel(12345)  # unknown id: not an error
    assert worker.invoke("echo", "after") == "after"


def test_queued_threaded_call_is_dropped_on_cancel(worker: FakeParent) -> None:
    slow = worker.call("thread_sleep", 0.5)
    queued = worker.call("thread_sleep", 0)
    worker.cancel(queued)
    assert worker.reply_for(queued).error["kind"] == "cancelled"
    assert worker.reply_for(slow).value == 0.5


def test_socket_is_served_while_an_inline_call_runs(worker: FakeParent) -> None:
    slow = worker.call("sleep", 1.5)
    _wait_running(worker, slow)  # pongs while the call runs
    fast_async = worker.call("async_sleep", 0)
    fast_thread = worker.call("thread_sleep", 0)
    assert worker.reply_for(fast_async).value == "slept"
    assert worker.reply_for(fast_thread).value == 0
    inline_behind = worker.call("echo", "behind")
    assert worker.reply_for(slow).value == 1.5
    assert worker.reply_for(inline_behind).value == "behind"


def _beats_during(worker: FakeParent, function: str, seconds: float) -> List[Beat]:
    worker.wait_beats(2)
    sent = time.monotonic()
    call_id = worker.call(function, seconds)
    reply = worker.reply_for(call_id, timeout=seconds + 10)
    done = time.monotonic()
    assert reply.ok, reply.error
    during = [b for b in worker.beats if sent < b.received < done]
    assert len(during) >= seconds / 0.1 / 3, f"only {len(during)} beats in {seconds} s"
    running = [b for b in during if any(c[0] == call_id and c[2] == "running" for c in b.in_progress)]
    assert len(running) >= len(during) - 2
    return during


def test_beats_arrive_at_the_configured_interval(worker: FakeParent) -> None:
    beats = worker.wait_beats(8)
    gaps = [b.received - a.received for a, b in zip(beats, beats[1:])]
    assert 0.05 < statistics.median(gaps) < 0.3
    assert [b.seq for b in beats] == list(range(beats[0].seq, beats[0].seq + len(beats)))
    assert all(b.rss > 0 for b in beats)


def test_beats_continue_during_inline_sleep(worker: FakeParent) -> None:
    _beats_during(worker, "sleep", 2.0)


def test_beats_continue_during_pure_python_loop(worker: FakeParent) -> None:
    _beats_during(worker, "spin", 2.0)


def test_served_counter_in_beats(worker: FakeParent) -> None:
    for i in range(5):
        worker.invoke("echo", i)
    n = len(worker.beats)
    beats = worker.wait_beats(n + 2)
    assert beats[-1].served >= 5
