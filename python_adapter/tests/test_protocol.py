"""Messages, values, errors and framing, against a real worker process."""

from __future__ import annotations

import os
import time

import pytest

from pyvisor_worker import PROTOCOL_VERSION, __version__
from pyvisor_worker.testing import FakeParent, Reply, WorkerExited, encode_frame

from conftest import SpawnFn

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def _assert_timed(reply: Reply, sent_ns: int, received_ns: int) -> None:
    """The reply carries ``(span_id, start_ns, end_ns)`` inside the call's wall-clock window."""
    assert reply.span is not None, reply
    span_id, start_ns, end_ns = reply.span
    assert 0 < span_id < 2**64
    assert sent_ns <= start_ns <= end_ns <= received_ns


def test_hello_describes_the_worker(worker: FakeParent) -> None:
    hello = worker.hello
    assert hello["protocol"] == PROTOCOL_VERSION == 2
    assert hello["pid"] == worker.pid
    assert hello["adapter"] == __version__
    assert isinstance(hello["python"], str) and hello["python"].count(".") == 2
    functions = {f["name"]: f for f in hello["functions"]}
    assert functions["echo"] == {
        "name": "echo", "idempotent": False, "kind": "inline", "threads": 0, "stream": False
    }
    assert functions["predict"]["idempotent"] is True
    assert "_predict" not in functions
    assert functions["async_sleep"]["kind"] == "async"
    assert functions["thread_barrier"] == {
        "name": "thread_barrier",
        "idempotent": False,
        "kind": "threads",
        "threads": 4,
        "stream": False,
    }
    assert functions["health"] == {
        "name": "health", "idempotent": True, "kind": "inline", "threads": 0, "stream": False
    }
    assert not [name for name in functions if name.startswith("__pyvisor")], "internal hooks are not listed"


VALUES = [
    None,
    True,
    False,
    0,
    -1,
    2**63 - 1,
    2**64 - 1,
    -(2**63),
    1.5,
    -0.0,
    1e300,
    "",
    "héllo wörld ✓ 日本語 🐍",
    b"",
    b"\x00\xff binary",
    [],
    [1, [2, [3, [4]]]],
    {},
    {"nested": {"list": [1, 2.5, "x", b"y", None], "map": {"k": [True, {}]}}},
    {1: "int keys", 2: "are fine"},
]


def test_values_round_trip(worker: FakeParent) -> None:
    ids = [worker.call("echo", v) for v in VALUES]
    for call_id, value in zip(ids, VALUES):
        reply = worker.reply_for(call_id)
        assert reply.ok, reply.error
        assert reply.value == value
        assert type(reply.value) is type(value)
        assert reply.attempt == 1


def test_large_payload_round_trips_and_the_worker_goes_on(worker: FakeParent) -> None:
    blob = os.urandom(5 * 1024 * 1024)
    assert worker.invoke("echo", blob, timeout=30) == blob
    assert worker.invoke("echo", "small") == "small"


def test_reply_echoes_attempt_and_context_fields(worker: FakeParent) -> None:
    deadline_ms = int(time.time() * 1000) + 10_000
    call_id = worker.call(
        "predict",
        {"a": 1, "b": 2},
        attempt=3,
        deadline_ms=deadline_ms,
        traceparent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        tracestate="vendor=x",
    )
    reply = worker.reply_for(call_id)
    assert reply.ok, reply.error
    assert reply.attempt == 3
    v = reply.value
    assert v["call_id"] == call_id
    assert v["attempt"] == 3
    assert v["deadline"] == pytest.approx(deadline_ms / 1000.0)
    assert 0 < v["remaining"] <= 10
    assert v["traceparent"] == "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    assert v["tracestate"] == "vendor=x"
    assert v["cancelled"] is False
    assert v["n"] == 2

    reply = worker.reply_for(worker.call("predict", [], deadline_ms=None))
    assert reply.value["deadline"] is None and reply.value["remaining"] is None


def test_functions_without_payload_parameter(worker: FakeParent) -> None:
    call_id = worker.call("ctx_only", 123)
    assert worker.reply_for(call_id).value == call_id
    assert worker.invoke("no_args", {"ignored": True}) == "no args"


def test_exception_becomes_an_error_reply(worker: FakeParent) -> None:
    reply = worker.reply_for(worker.call("fail", "it broke"))
    assert not reply.ok
    err = reply.error
    assert err["kind"] == "exception"
    assert err["type"] == "__main__.MyError"
    assert err["message"] == "it broke"
    assert "Traceback (most recent call last)" in err["traceback"]
    assert "raise MyError(message)" in err["traceback"]
    assert "pyvisor_worker" not in err["traceback"]  # the adapter's own frame is left out
    # a builtin exception type is not module-qualified
    reply = worker.reply_for(worker.call("echo"))  # fine: payload None
    assert reply.ok
    reply = worker.reply_for(worker.call("big", "not a number"))
    assert reply.error["kind"] == "exception" and reply.error["type"] == "TypeError"


def test_base_exception_subclass_keeps_the_worker_serving(worker: FakeParent) -> None:
    reply = worker.reply_for(worker.call("weird"))
    assert reply.error["kind"] == "exception"
    assert reply.error["type"] == "__main__.Weird"
    assert worker.invoke("echo", 1) == 1


def test_unknown_function_lists_the_exposed_names(worker: FakeParent) -> None:
    reply = worker.reply_for(worker.call("nope", 1))
    err = reply.error
    assert err["kind"] == "unknown_function"
    assert "nope" in err["message"]
    assert "echo" in err["functions"] and "health" in err["functions"]
    assert "__pyvisor_chaos_arm" not in err["functions"] and "__pyvisor" not in err["message"]
    assert err["functions"] == sorted(f["name"] for f in worker.hello["functions"])


@pytest.mark.parametrize("kind", ["set", "bigint", "object"])
def test_unserializable_return_value(worker: FakeParent, kind: str) -> None:
    reply = worker.reply_for(worker.call("unserializable", kind))
    assert reply.error["kind"] == "unserializable", reply.error
    assert "unserializable" in reply.error["message"] or "cannot be encoded" in reply.error["message"]
    assert worker.invoke("echo", "still serving") == "still serving"


def test_reply_too_large(spawn: SpawnFn) -> None:
    # In band (with out-of-band buffers, large bytes go in a memfd: test_oob.py).
    parent = spawn(max_frame=64 * 1024, env={"PYVISOR_OOB": "0"})
    reply = parent.reply_for(parent.call("big", 100_000))
    assert reply.error["kind"] == "reply_too_large"
    assert reply.span is None
    assert parent.invoke("big", 1000) == b"x" * 1000
    # Traced: the error reply still carries the function's span.
    sent = time.time_ns()
    reply = parent.reply_for(parent.call("big", 100_000, traceparent=TRACEPARENT))
    assert reply.error["kind"] == "reply_too_large"
    _assert_timed(reply, sent, time.time_ns())


def test_pipelined_calls_all_get_replies_in_order(worker: FakeParent) -> None:
    frames = b"".join(
        encode_frame([1, i, 1, "record", None, None, None, i]) for i in range(100, 108)
    )
    worker.send_raw(frames)  # 8 calls in one write, before reading anything
    replies = [worker.recv() for _ in range(8)]
    assert [r[1] for r in replies] == list(range(100, 108))  # inline: arrival order
    assert all(r[3] is True for r in replies)
    assert all(len(r) == 6 and r[4] is None for r in replies)  # no traceparent: no span
    assert replies[-1][5] == list(range(100, 108))


def test_frames_split_at_every_byte(worker: FakeParent) -> None:
    data = encode_frame([1, 77, 1, "echo", None, None, None, {"split": "me"}]) + encode_frame(
        [1, 78, 1, "echo", None, None, None, "second"]
    )
    for i in range(len(data)):
        worker.send_raw(data[i : i + 1])
        time.sleep(0.0005)
    assert worker.reply_for(77).value == {"split": "me"}
    assert worker.reply_for(78).value == "second"


def test_ping_pong(worker: FakeParent) -> None:
    worker.ping(2**64 - 1)
    beat = worker.pong_for(2**64 - 1)
    assert set(beat) >= {"seq", "rss", "in_progress", "served"}
    assert beat["rss"] > 1024 * 1024
    assert beat["in_progress"] == []


def test_health(worker: FakeParent) -> None:
    for _ in range(3):
        worker.invoke("echo", 0)
    health = worker.invoke("health")
    assert health["ok"] is True
    assert health["pid"] == worker.pid
    assert health["rss"] > 1024 * 1024
    assert health["served"] >= 3


def test_print_in_user_code_does_not_touch_the_protocol(worker: FakeParent) -> None:
    assert worker.invoke("chatty", "x") == "x"
    assert worker.invoke("echo", 2) == 2
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (
        "line 99" not in worker.stdout_text() or "to stderr" not in worker.stderr_text()
    ):
        # Line buffering: the lines arrive without an exit or flush (each pipe is read by
        # its own thread here, so wait for both).
        time.sleep(0.01)
    assert "hello from user code x" in worker.stdout_text()
    assert "line 99" in worker.stdout_text()
    assert "to stderr" in worker.stderr_text()


def _expect_protocol_error(parent: FakeParent, data: bytes) -> None:
    parent.send_raw(data)
    with pytest.raises(WorkerExited):
        parent.recv(timeout=10)
    assert parent.wait() == 3
    assert "protocol error" in parent.stderr_text()


def test_oversized_incoming_frame_exits_3(spawn: SpawnFn) -> None:
    parent = spawn(max_frame=4096)
    assert parent.invoke("echo", b"y" * 4000) == b"y" * 4000
    _expect_protocol_error(parent, (4097).to_bytes(4, "big") + b"\x00" * 16)
    assert "exceeds the maximum frame size" in parent.stderr_text()


def test_garbage_body_exits_3(worker: FakeParent) -> None:
    _expect_protocol_error(worker, (3).to_bytes(4, "big") + b"\xc1\xc1\xc1")


@pytest.mark.parametrize(
    "message",
    [
        {"not": "an array"},
        [],
        [99, 1],
        [1, 5, 1, "echo"],  # a call with too few elements
        [1, "id", 1, "echo", None, None, None, 0],
        [2, 1, 1, True, None, None],  # a reply, which only the worker sends
    ],
)
def test_uninterpretable_message_exits_3(worker: FakeParent, message: object) -> None:
    _expect_protocol_error(worker, encode_frame(message))


def test_two_values_in_one_frame_exit_3(worker: FakeParent) -> None:
    body = b"\x91\x05" + b"\x01"  # [5] followed by a stray 1
    _expect_protocol_error(worker, len(body).to_bytes(4, "big") + body)


# ---------------------------------------------------------------------- the function's span
# (Tracing is off in these workers: the timing needs nothing from OpenTelemetry.)


@pytest.mark.parametrize(
    "function, payload, ok",
    [
        ("echo", 1, True),  # inline
        ("predict", [1], True),  # inline, with ctx
        ("no_args", None, True),
        ("fail", "boom", False),  # an exception
        ("unserializable", "set", False),
        ("async_sleep", 0, True),
        ("async_fail", None, False),
        ("thread_sleep", 0, True),
    ],
)
def test_traced_call_reports_its_function_span(
    worker: FakeParent, function: str, payload: object, ok: bool
) -> None:
    sent = time.time_ns()
    reply = worker.reply_for(worker.call(function, payload, traceparent=TRACEPARENT))
    received = time.time_ns()
    assert reply.ok is ok, reply.error
    _assert_timed(reply, sent, received)
    # The same call without a traceparent: no span.
    reply = worker.reply_for(worker.call(function, payload))
    assert reply.ok is ok and reply.span is None


def test_function_span_brackets_the_function(worker: FakeParent) -> None:
    sent = time.time_ns()
    reply = worker.reply_for(worker.call("sleep", 0.05, traceparent=TRACEPARENT))
    _assert_timed(reply, sent, time.time_ns())
    _, start_ns, end_ns = reply.span  # type: ignore[misc]
    assert end_ns - start_ns >= 45_000_000  # it slept 50 ms in between


def test_span_ids_are_random_and_distinct(worker: FakeParent) -> None:
    ids = [worker.call("echo", i, traceparent=TRACEPARENT) for i in range(50)]
    span_ids = [worker.reply_for(i).span[0] for i in ids]  # type: ignore[index]
    assert len(set(span_ids)) == 50
    assert any(s >= 2**63 for s in span_ids)  # the full 64 bits (fails with odds 2**-50)


def test_any_traceparent_gets_a_span_and_is_not_parsed(worker: FakeParent) -> None:
    """The worker does not validate the traceparent to time the call (the parent sent it)."""
    for tp in ("", "garbage", "00-" + "0" * 32 + "-" + "0" * 16 + "-00"):
        reply = worker.reply_for(worker.call("echo", 1, traceparent=tp))
        assert reply.ok and reply.span is not None, tp


def test_calls_whose_function_never_ran_have_no_span(worker: FakeParent) -> None:
    reply = worker.reply_for(worker.call("nope", 1, traceparent=TRACEPARENT))
    assert reply.error["kind"] == "unknown_function" and reply.span is None

    # A plain call cancelled while queued behind a slow one, and a threads call cancelled
    # before its pool thread picked it up.
    for blocker, function, payload in [("sleep", "echo", 1), ("thread_sleep", "thread_sleep", 0)]:
        busy = worker.call(blocker, 0.3)
        waiting = worker.call(function, payload, traceparent=TRACEPARENT)
        worker.cancel(waiting)
        reply = worker.reply_for(waiting)
        assert reply.error["kind"] == "cancelled" and reply.span is None, function
        assert worker.reply_for(busy).ok


def test_call_cancelled_while_running_reports_its_span(worker: FakeParent) -> None:
    sent = time.time_ns()
    call_id = worker.call("async_sleep", 30, traceparent=TRACEPARENT)
    time.sleep(0.1)
    worker.cancel(call_id)
    reply = worker.reply_for(call_id)
    assert reply.error["kind"] == "cancelled"
    _assert_timed(reply, sent, time.time_ns())

    # A plain function sees ctx.cancelled and returns: its reply is an ordinary one.
    sent = time.time_ns()
    call_id = worker.call("until_cancelled", 10, traceparent=TRACEPARENT)
    time.sleep(0.1)
    worker.cancel(call_id)
    reply = worker.reply_for(call_id)
    assert reply.value == "saw cancel"
    _assert_timed(reply, sent, time.time_ns())


def test_shutting_down_worker_replies_without_span(worker: FakeParent) -> None:
    slow = worker.call("sleep", 0.3)
    time.sleep(0.05)
    worker.shutdown(grace_ms=5000)
    time.sleep(0.05)
    late = worker.call("echo", 1, traceparent=TRACEPARENT)
    reply = worker.reply_for(late)
    assert reply.error["kind"] == "refused" and reply.span is None
    assert worker.reply_for(slow).ok
    assert worker.wait() == 0
