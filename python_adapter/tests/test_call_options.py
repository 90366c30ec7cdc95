"""Capabilities in ``hello``, ``call_options`` (message 9) and ``started`` (message 8).

A ``started`` is written right before the function of a call that asked for it
(``ack_start``) runs — for every kind of function — and never for a call whose function does
not run (cancelled while queued, refused while shutting down, unknown function).
"""

from __future__ import annotations

import time
from typing import Any, List

import pytest

from pyvisor_worker.testing import FakeParent, encode_frame

from conftest import SpawnFn

MSG_REPLY = 2
MSG_STARTED = 8
MSG_CALL_OPTIONS = 9
ACK = {"ack_start": True}


def _messages_until_reply(worker: FakeParent, call_id: int) -> List[List[Any]]:
    """Every message (beats aside) up to and including the reply to ``call_id``."""
    got = []
    while True:
        msg = worker.recv()
        got.append(msg)
        if msg[0] == MSG_REPLY and msg[1] == call_id:
            return got


def test_hello_announces_the_capabilities(worker: FakeParent) -> None:
    from pyvisor_worker._oob import oob_supported

    expected = ["call_options", "started", "stream"] + (["oob"] if oob_supported() else [])
    assert worker.hello["capabilities"] == expected


@pytest.mark.parametrize(
    "function, payload",
    [("echo", 1), ("fail", "boom"), ("async_sleep", 0), ("thread_sleep", 0), ("predict", [1])],
)
def test_started_precedes_the_reply_for_every_kind(
    worker: FakeParent, function: str, payload: object
) -> None:
    call_id = worker.call(function, payload, attempt=3, options=ACK)
    got = _messages_until_reply(worker, call_id)
    assert got[0] == [MSG_STARTED, call_id, 3]
    assert len(got) == 2, got


@pytest.mark.parametrize("function", ["sleep", "async_sleep", "thread_sleep"])
def test_started_is_sent_before_the_function_returns(worker: FakeParent, function: str) -> None:
    sent = time.monotonic()
    call_id = worker.call(function, 0.5, options=ACK)
    assert worker.recv() == [MSG_STARTED, call_id, 1]
    assert time.monotonic() - sent < 0.45, "started came only after the function"
    assert worker.reply_for(call_id).ok


def test_without_ack_start_no_started_is_sent(worker: FakeParent) -> None:
    for options in [None, {}, {"ack_start": False}, {"a_future_key": [1, 2]}]:
        call_id = worker.call("echo", 7, options=options)
        got = _messages_until_reply(worker, call_id)
        assert [m[0] for m in got] == [MSG_REPLY], (options, got)
        assert got[0][5] == 7


def test_unknown_option_keys_are_ignored(worker: FakeParent) -> None:
    call_id = worker.call("echo", 1, options={"ack_start": True, "a_future_key": {"credit": 4}})
    assert [m[0] for m in _messages_until_reply(worker, call_id)] == [MSG_STARTED, MSG_REPLY]


def test_a_queued_call_acknowledges_only_when_it_starts(worker: FakeParent) -> None:
    # Inline calls run in arrival order: the second one's start comes after the first's reply.
    busy = worker.call("sleep", 0.3, options=ACK)
    queued = worker.call("echo", 2, options=ACK)
    got = _messages_until_reply(worker, queued)
    assert [(m[0], m[1]) for m in got] == [
        (MSG_STARTED, busy),
        (MSG_REPLY, busy),
        (MSG_STARTED, queued),
        (MSG_REPLY, queued),
    ]


@pytest.mark.parametrize("blocker, function", [("sleep", "echo"), ("thread_sleep", "thread_sleep")])
def test_a_call_cancelled_before_it_started_never_acknowledges(
    worker: FakeParent, blocker: str, function: str
) -> None:
    busy = worker.call(blocker, 0.3)
    waiting = worker.call(function, 0, options=ACK)
    worker.cancel(waiting)
    reply = worker.reply_for(waiting)
    assert reply.error["kind"] == "cancelled"
    assert worker.reply_for(busy).ok
    # Nothing else arrives: no started for the cancelled call.
    worker.ping(9)
    worker.pong_for(9)
    assert not [m for m in worker._inbox if m[0] == MSG_STARTED]


def test_refused_and_unknown_calls_never_acknowledge(worker: FakeParent) -> None:
    unknown = worker.call("nope", 1, options=ACK)
    assert [m[0] for m in _messages_until_reply(worker, unknown)] == [MSG_REPLY]
    slow = worker.call("sleep", 0.3)
    time.sleep(0.05)
    worker.shutdown(grace_ms=5000)
    time.sleep(0.05)
    late = worker.call("echo", 1, options=ACK)
    got = _messages_until_reply(worker, late)
    assert [m[0] for m in got] == [MSG_REPLY] and got[0][5]["kind"] == "refused"
    assert worker.reply_for(slow).ok
    assert worker.wait() == 0


@pytest.mark.parametrize(
    "message",
    [
        [MSG_CALL_OPTIONS, 1, 1, "echo", None, None, None, ["ack_start"], 0],  # options not a map
        [MSG_CALL_OPTIONS, 1, 1, "echo", None, None, None, {"ack_start": 1}, 0],  # not a bool
        [MSG_CALL_OPTIONS, 1, 1, "echo", None, None, None, None, 0],
        [MSG_CALL_OPTIONS, 1, 1, "echo", None, None, None, 0],  # 8 elements
        [MSG_CALL_OPTIONS, 1, 1, "echo", None, None, None, {}, 0, 0],  # 10 elements
        [MSG_CALL_OPTIONS, -1, 1, "echo", None, None, None, {}, 0],
        [MSG_CALL_OPTIONS, 1, True, "echo", None, None, None, {}, 0],
        [MSG_CALL_OPTIONS, 1, 1, b"echo", None, None, None, {}, 0],
        [MSG_STARTED, 1, 1],  # only the worker sends it
    ],
)
def test_mistyped_call_options_are_protocol_errors(worker: FakeParent, message: object) -> None:
    worker.send_raw(encode_frame(message))
    assert worker.wait() == 3
