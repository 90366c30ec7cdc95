"""Streams (capability ``stream``): generator functions called with the ``stream`` option.

Items go out in order under credit (the generator is not resumed without it), the reply that
ends a stream carries the item count (or the error), ``cancel`` closes the generator where it
is suspended, a mismatched call does not run, and items of a slow generator are not held
back. Every kind: inline, ``threads=N`` and async generators.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Dict

import pytest

from pyvisor_worker.testing import FakeParent, WorkerExited, encode_frame

from conftest import SpawnFn

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
MSG_ITEM = 10
MSG_CREDIT = 11
MSG_STARTED = 8
MSG_REPLY = 2

STREAMS = '''
import asyncio
import time

from pyvisor_worker import Context, expose, run_worker


def _note(path, text):
    if path:
        with open(path, "a") as f:
            f.write(text + "\\n")


@expose
def echo(x):
    return x


@expose
def touch(path):
    _note(path, "ran")
    return "touched"


@expose
def count(n):
    for i in range(n):
        yield i


@expose(threads=2)
def count_threads(n):
    for i in range(n):
        yield i


@expose
async def count_async(n):
    for i in range(n):
        yield i


def _observed(args, ctx):
    """Notes every resumption ("resumed i") and the end ("closed", "cancelled=...")."""
    path = args["path"]
    try:
        for i in range(args.get("n", 10**9)):
            _note(path, f"resumed {i}")
            yield i
            if args.get("sleep"):
                end = time.monotonic() + args["sleep"]
                while time.monotonic() < end and not ctx.cancelled:
                    time.sleep(0.005)
            if i + 1 == args.get("raise_after"):
                raise ValueError(f"failed after {i + 1} items")
    finally:
        _note(path, f"closed cancelled={ctx.cancelled}")


@expose
def observed(args, ctx: Context):
    yield from _observed(args, ctx)


@expose(threads=1)
def observed_threads(args, ctx: Context):
    yield from _observed(args, ctx)


@expose
async def observed_async(args, ctx: Context):
    path = args["path"]
    try:
        for i in range(args.get("n", 10**9)):
            _note(path, f"resumed {i}")
            yield i
            if args.get("sleep"):
                await asyncio.sleep(args["sleep"])
            if i + 1 == args.get("raise_after"):
                raise ValueError(f"failed after {i + 1} items")
    finally:
        _note(path, f"closed cancelled={ctx.cancelled}")


@expose
def slow(seconds):
    yield "first"
    time.sleep(seconds)
    yield "second"


@expose(threads=1)
def slow_threads(seconds):
    yield "first"
    time.sleep(seconds)
    yield "second"


@expose
async def slow_async(seconds):
    yield "first"
    await asyncio.sleep(seconds)
    yield "second"


@expose
def bad_items(args):
    try:
        yield "fine"
        if args["what"] == "big":
            yield b"x" * args["size"]
        else:
            yield {1, 2, 3}
        yield "never"
    finally:
        _note(args["path"], "closed")


@expose
async def bad_items_async(args):
    try:
        yield "fine"
        yield {1, 2, 3}
        yield "never"
    finally:
        _note(args["path"], "closed")


@expose
def timed(n):
    for i in range(n):
        time.sleep(0.02)
        yield i


@expose
async def async_sleep(seconds):
    await asyncio.sleep(seconds)
    return "slept"


@expose
def sleep(seconds):
    time.sleep(seconds)
    return seconds


@expose
def with_ctx(n, ctx: Context):
    for i in range(n):
        yield [ctx.call_id, ctx.attempt, i]


if __name__ == "__main__":
    run_worker()
'''

KINDS = ["", "_threads", "_async"]


@pytest.fixture
def streams(spawn: SpawnFn) -> FakeParent:
    return spawn(STREAMS, beat_interval_ms=100)


def _lines(path: Path) -> list:
    return path.read_text().splitlines() if path.exists() else []


def _wait_for_line(path: Path, line: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while line not in _lines(path):
        if time.monotonic() > deadline:
            raise AssertionError(f"{line!r} never written to {path}: {_lines(path)}")
        time.sleep(0.01)


def _resumed(path: Path) -> int:
    return sum(1 for line in _lines(path) if line.startswith("resumed "))


# ---------------------------------------------------------------------- hello


def test_hello_announces_streams(streams: FakeParent) -> None:
    assert "stream" in streams.hello["capabilities"]
    functions: Dict[str, Dict[str, Any]] = {f["name"]: f for f in streams.hello["functions"]}
    for name in ["count", "count_threads", "count_async", "observed_async", "with_ctx"]:
        assert functions[name]["stream"] is True, name
    for name in ["echo", "touch", "async_sleep", "sleep", "health"]:
        assert functions[name]["stream"] is False, name
    assert functions["count"]["kind"] == "inline"
    assert functions["count_threads"]["kind"] == "threads"
    assert functions["count_threads"]["threads"] == 2
    assert functions["count_async"]["kind"] == "async"  # an async generator is async


# ---------------------------------------------------------------------- items and the end


@pytest.mark.parametrize("kind", KINDS)
def test_items_in_order_then_the_count(streams: FakeParent, kind: str) -> None:
    call_id = streams.stream("count" + kind, 10, credit=4, attempt=2)
    messages = streams.item_messages_for(call_id, 4)
    assert [(m.id, m.attempt, m.seq, m.value) for m in messages] == [
        (call_id, 2, i, i) for i in range(4)
    ]
    streams.credit(call_id, 4)  # (items_for grants none back)
    result = streams.stream_result(call_id)
    assert result.ok, result.error
    assert result.items == list(range(4, 10))
    assert result.reply.value == 10 and result.reply.attempt == 2
    assert result.reply.span is None


@pytest.mark.parametrize("kind", KINDS)
def test_an_empty_stream(streams: FakeParent, kind: str) -> None:
    result = streams.stream_result(streams.stream("count" + kind, 0, credit=1))
    assert result.ok and result.items == [] and result.reply.value == 0


@pytest.mark.parametrize("kind", KINDS)
def test_a_hundred_thousand_items_in_order(streams: FakeParent, kind: str) -> None:
    result = streams.stream_result(streams.stream("count" + kind, 100_000, credit=256), 60)
    assert result.ok, result.error
    assert result.reply.value == 100_000
    assert result.items == list(range(100_000))


def test_generator_gets_its_ctx(streams: FakeParent) -> None:
    call_id = streams.stream("with_ctx", 3, credit=8, attempt=5)
    result = streams.stream_result(call_id)
    assert result.items == [[call_id, 5, i] for i in range(3)]


def test_streams_and_calls_interleave(streams: FakeParent) -> None:
    ids = [streams.stream(name, 50, credit=7) for name in ["count_threads", "count_async"]]
    calls = [streams.call("echo", i) for i in range(5)]
    for call_id in ids:
        result = streams.stream_result(call_id)
        assert result.items == list(range(50)) and result.reply.value == 50
    assert [streams.reply_for(c).value for c in calls] == list(range(5))


@pytest.mark.parametrize("kind", KINDS)
def test_an_exception_after_k_items(streams: FakeParent, kind: str, tmp_path: Path) -> None:
    path = tmp_path / "log"
    args = {"path": str(path), "raise_after": 3}
    result = streams.stream_result(streams.stream("observed" + kind, args, credit=2))
    assert result.items == [0, 1, 2]
    assert not result.ok
    error = result.error
    assert error["kind"] == "exception"
    assert error["type"] == "ValueError"
    assert error["message"] == "failed after 3 items"
    assert "raise ValueError" in error["traceback"]
    assert "closed cancelled=False" in _lines(path)


# ---------------------------------------------------------------------- credit


@pytest.mark.parametrize("kind", KINDS)
def test_no_credit_no_resumption(streams: FakeParent, kind: str, tmp_path: Path) -> None:
    path = tmp_path / "log"
    call_id = streams.stream("observed" + kind, {"path": str(path), "n": 100}, credit=5)
    assert streams.items_for(call_id, 5) == [0, 1, 2, 3, 4]
    time.sleep(0.3)
    assert streams.items_for(call_id) == []  # (the fake parent also fails on excess items)
    assert _resumed(path) == 5, _lines(path)  # not resumed again without credit
    streams.credit(call_id, 3)
    assert streams.items_for(call_id, 3) == [5, 6, 7]
    time.sleep(0.2)
    assert _resumed(path) == 8, _lines(path)
    streams.credit(call_id, 1000)
    result = streams.stream_result(call_id, grant=False)
    assert result.items == list(range(8, 100)) and result.reply.value == 100


def test_credit_for_an_unknown_or_ended_call_is_ignored(streams: FakeParent) -> None:
    done = streams.stream("count", 2, credit=2)
    assert streams.stream_result(done).ok
    streams.credit(done, 5)
    streams.send([MSG_CREDIT, 12345, 1])
    streams.send([MSG_CREDIT, streams.call("sleep", 0.05), 1, "extra", "elements"])
    assert streams.invoke("echo", "still here") == "still here"


def test_the_stream_waits_for_credit_on_its_thread_not_the_reader(
    streams: FakeParent, tmp_path: Path
) -> None:
    # An inline stream waiting for credit holds the serving thread: the other one reads.
    path = tmp_path / "log"
    call_id = streams.stream("observed", {"path": str(path)}, credit=2)
    assert streams.items_for(call_id, 2) == [0, 1]
    time.sleep(0.05)
    streams.ping(77)
    assert "in_progress" in streams.pong_for(77, timeout=2)
    async_call = streams.call("async_sleep", 0.01)
    assert streams.reply_for(async_call, timeout=2).value == "slept"
    streams.credit(call_id, 1)
    assert streams.items_for(call_id, 1, timeout=2) == [2]
    streams.cancel(call_id)
    reply = streams.reply_for(call_id, timeout=2)
    assert reply.error["kind"] == "cancelled"
    assert "closed cancelled=True" in _lines(path)


def test_an_async_stream_waiting_for_credit_does_not_block_the_loop(
    streams: FakeParent, tmp_path: Path
) -> None:
    path = tmp_path / "log"
    call_id = streams.stream("observed_async", {"path": str(path)}, credit=1)
    assert streams.items_for(call_id, 1) == [0]
    begin = time.monotonic()
    calls = [streams.call("async_sleep", 0.05) for _ in range(3)]
    assert all(streams.reply_for(c, timeout=2).ok for c in calls)
    assert time.monotonic() - begin < 1.0
    streams.cancel(call_id)
    assert streams.reply_for(call_id).error["kind"] == "cancelled"


def test_a_waiting_stream_is_running_in_beats(streams: FakeParent) -> None:
    call_id = streams.stream("count_threads", 10, credit=1)
    assert streams.items_for(call_id, 1) == [0]
    streams.ping(5)
    beat = streams.pong_for(5)
    assert [c[:3] for c in beat["in_progress"]] == [[call_id, 1, "running"]]
    streams.cancel(call_id)
    assert streams.reply_for(call_id).error["kind"] == "cancelled"
    # The executor forgets the call right after writing its reply: a pong in between may
    # still list it.
    deadline = time.monotonic() + 5
    nonce = 6
    while True:
        streams.ping(nonce)
        if streams.pong_for(nonce)["in_progress"] == []:
            break
        assert time.monotonic() < deadline, "the cancelled stream stays in progress"
        nonce += 1
        time.sleep(0.01)


# ---------------------------------------------------------------------- cancel


@pytest.mark.parametrize("kind", KINDS)
def test_cancel_while_waiting_for_credit_closes_the_generator(
    streams: FakeParent, kind: str, tmp_path: Path
) -> None:
    path = tmp_path / "log"
    call_id = streams.stream("observed" + kind, {"path": str(path)}, credit=3)
    assert streams.items_for(call_id, 3) == [0, 1, 2]
    time.sleep(0.05)
    streams.cancel(call_id)
    reply = streams.reply_for(call_id)
    assert not reply.ok and reply.error["kind"] == "cancelled", reply.error
    assert _lines(path)[-1] == "closed cancelled=True"
    assert _resumed(path) == 3
    assert streams.invoke("echo", 1) == 1  # the worker goes on


@pytest.mark.parametrize("kind", KINDS)
def test_cancel_between_yields_closes_the_generator(
    streams: FakeParent, kind: str, tmp_path: Path
) -> None:
    path = tmp_path / "log"
    call_id = streams.stream("observed" + kind, {"path": str(path), "sleep": 5}, credit=100)
    assert streams.items_for(call_id, 1) == [0]  # then it sleeps (sync: polling ctx.cancelled)
    begin = time.monotonic()
    streams.cancel(call_id)
    reply = streams.reply_for(call_id)
    assert reply.error["kind"] == "cancelled", reply.error
    assert time.monotonic() - begin < 2.0
    assert "closed cancelled=True" in _lines(path)
    assert _resumed(path) <= 2  # closed at its next yield


def test_cancel_of_a_queued_stream_never_runs_it(streams: FakeParent, tmp_path: Path) -> None:
    path = tmp_path / "log"
    busy = streams.call("sleep", 0.4)
    call_id = streams.stream("observed", {"path": str(path)}, credit=5)
    time.sleep(0.05)
    streams.cancel(call_id)
    reply = streams.reply_for(call_id)
    assert reply.error["kind"] == "cancelled" and reply.span is None
    assert streams.reply_for(busy).ok
    assert streams.items_for(call_id) == []
    assert not path.exists()


# ---------------------------------------------------------------------- mismatch


@pytest.mark.parametrize("function", ["observed", "observed_threads", "observed_async"])
def test_a_plain_call_to_a_stream_function_does_not_run(
    streams: FakeParent, function: str, tmp_path: Path
) -> None:
    path = tmp_path / "log"
    for options in [None, {"ack_start": True}, {"stream": None}]:
        call_id = streams.call(function, {"path": str(path)}, options=options)
        reply = streams.reply_for(call_id)
        assert not reply.ok
        assert reply.error["kind"] == "stream_mismatch"
        assert reply.error["type"] == "TypeError"
        assert "is a generator function" in reply.error["message"]
        assert "pool.stream" in reply.error["message"]
        assert reply.span is None
    time.sleep(0.1)
    assert not path.exists()


@pytest.mark.parametrize("function", ["touch", "async_sleep"])
def test_a_stream_call_to_a_plain_function_does_not_run(
    streams: FakeParent, function: str, tmp_path: Path
) -> None:
    path = tmp_path / "log"
    call_id = streams.stream(function, str(path), credit=4, options={"ack_start": True})
    msg = streams.recv()
    assert msg[:4] == [MSG_REPLY, call_id, 1, False]  # no `started`, no item
    error = msg[5]
    assert error["kind"] == "stream_mismatch"
    assert error["type"] == "TypeError"
    assert "is not a generator function" in error["message"]
    assert "pool.call" in error["message"]
    time.sleep(0.1)
    assert not path.exists()


# ---------------------------------------------------------------------- protocol errors


def _expect_protocol_error(parent: FakeParent, message: Any) -> None:
    parent.send_raw(encode_frame(message))
    with pytest.raises(WorkerExited):
        parent.recv(timeout=10)
    assert parent.wait() == 3
    assert "protocol error" in parent.stderr_text()


@pytest.mark.parametrize("window", [0, -1, True, False, 1.5, "4", [4], {"credit": 4}, 2**32])
def test_a_mistyped_stream_option_is_a_protocol_error(spawn: SpawnFn, window: Any) -> None:
    parent = spawn(STREAMS)
    _expect_protocol_error(parent, [9, 1, 1, "count", None, None, None, {"stream": window}, 3])


def test_a_stream_call_with_an_id_the_worker_holds_is_a_protocol_error(
    streams: FakeParent,
) -> None:
    call_id = streams.stream("count", 10, credit=1)
    assert streams.items_for(call_id, 1) == [0]
    _expect_protocol_error(
        streams, [9, call_id, 1, "count_threads", None, None, None, {"stream": 4}, 3]
    )


def test_a_stream_call_to_an_unknown_function(streams: FakeParent) -> None:
    call_id = streams.stream("no_such_generator", None, credit=4)
    reply = streams.reply_for(call_id)
    assert reply.error["kind"] == "unknown_function"
    assert "count" in reply.error["functions"]


def test_the_end_needs_credit_too(streams: FakeParent) -> None:
    # Without credit the generator is not resumed, not even to find that it is exhausted.
    call_id = streams.stream("count", 3, credit=3)
    assert streams.items_for(call_id, 3) == [0, 1, 2]
    with pytest.raises(TimeoutError):
        streams.reply_for(call_id, timeout=0.3)
    streams.credit(call_id, 1)
    assert streams.reply_for(call_id).value == 3


def test_the_largest_window_is_accepted(streams: FakeParent) -> None:
    result = streams.stream_result(streams.stream("count", 3, credit=2**32 - 1), grant=False)
    assert result.items == [0, 1, 2]


@pytest.mark.parametrize(
    "message",
    [
        [MSG_CREDIT, 1, 0],
        [MSG_CREDIT, 1, -3],
        [MSG_CREDIT, 1, True],
        [MSG_CREDIT, 1, "1"],
        [MSG_CREDIT, 1, 1.0],
        [MSG_CREDIT, 1, None],
        [MSG_CREDIT, "1", 1],
        [MSG_CREDIT, -1, 1],
        [MSG_CREDIT, 1],
        [MSG_ITEM, 1, 1, 0, "the parent sends no items"],
    ],
)
def test_a_mistyped_credit_is_a_protocol_error(spawn: SpawnFn, message: Any) -> None:
    parent = spawn(STREAMS)
    call_id = parent.stream("count", 10, credit=1)
    assert parent.items_for(call_id, 1) == [0]
    _expect_protocol_error(parent, message)


# ---------------------------------------------------------------------- bad items


def test_an_item_over_the_maximum_frame_size(spawn: SpawnFn, tmp_path: Path) -> None:
    # In band (with out-of-band buffers this item would travel in a memfd: test_oob.py).
    parent = spawn(STREAMS, max_frame=65536, env={"PYVISOR_OOB": "0"})
    path = tmp_path / "log"
    args = {"what": "big", "size": 70_000, "path": str(path)}
    result = parent.stream_result(parent.stream("bad_items", args, credit=10))
    assert result.items == ["fine"]
    assert result.error["kind"] == "reply_too_large"
    assert result.error["type"] == "ValueError"
    assert "item 1" in result.error["message"]
    assert _lines(path) == ["closed"]  # the generator was closed
    assert parent.invoke("echo", 2) == 2


@pytest.mark.parametrize("function", ["bad_items", "bad_items_async"])
def test_an_unencodable_item(streams: FakeParent, function: str, tmp_path: Path) -> None:
    path = tmp_path / "log"
    args = {"what": "set", "path": str(path)}
    result = streams.stream_result(streams.stream(function, args, credit=10))
    assert result.items == ["fine"]
    assert result.error["kind"] == "unserializable"
    assert "item 1" in result.error["message"]
    assert _lines(path) == ["closed"]


# ---------------------------------------------------------------------- timely writes


@pytest.mark.parametrize("kind", KINDS)
def test_a_slow_generators_item_is_not_held_back(streams: FakeParent, kind: str) -> None:
    begin = time.monotonic()
    call_id = streams.stream("slow" + kind, 2.0, credit=10)
    messages = streams.item_messages_for(call_id, 1)
    assert messages[0].value == "first"
    assert messages[0].received - begin < 0.5, "the first item waited for the next one"
    result = streams.stream_result(call_id)
    assert result.items == ["second"] and result.reply.value == 2


def test_items_of_a_slowish_generator_arrive_as_they_come(streams: FakeParent) -> None:
    call_id = streams.stream("timed", 10, credit=100)
    messages = streams.item_messages_for(call_id, 10)
    # Item i is yielded at about 20 ms * (i + 1): none waits for the end of the stream.
    assert messages[-1].received - messages[0].received > 0.1
    assert streams.stream_result(call_id).reply.value == 10


# ---------------------------------------------------------------------- options, tracing, end


@pytest.mark.parametrize("kind", KINDS)
def test_ack_start_precedes_the_items(streams: FakeParent, kind: str) -> None:
    call_id = streams.stream("count" + kind, 3, credit=5, options={"ack_start": True})
    assert streams.recv() == [MSG_STARTED, call_id, 1]
    result = streams.stream_result(call_id)
    assert result.items == [0, 1, 2] and result.reply.value == 3


@pytest.mark.parametrize("kind", KINDS)
def test_a_traced_stream_has_a_span_over_its_run(
    streams: FakeParent, kind: str, tmp_path: Path
) -> None:
    path = tmp_path / "log"
    before = time.time_ns()
    args = {"path": str(path), "n": 3, "sleep": 0.05}
    result = streams.stream_result(
        streams.stream("observed" + kind, args, credit=5, traceparent=TRACEPARENT)
    )
    after = time.time_ns()
    assert result.ok and result.items == [0, 1, 2]
    assert result.reply.span is not None
    span_id, start, end = result.reply.span
    assert span_id != 0
    assert before <= start <= end <= after
    assert end - start >= 0.14e9  # three sleeps of 50 ms: the whole run


def test_a_stream_in_flight_finishes_within_the_shutdown_grace(streams: FakeParent) -> None:
    call_id = streams.stream("count_threads", 10, credit=2)
    assert streams.items_for(call_id, 2) == [0, 1]
    streams.shutdown(5000)
    time.sleep(0.1)
    refused = streams.stream("count", 1, credit=1)
    assert streams.reply_for(refused).error["kind"] == "refused"
    streams.credit(call_id, 9)  # 8 items, and one to resume the generator to its end
    result = streams.stream_result(call_id, grant=False)
    assert result.items == list(range(2, 10)) and result.reply.value == 10
    assert streams.wait() == 0


def test_a_stream_outlasting_the_grace_ends_the_worker(streams: FakeParent) -> None:
    call_id = streams.stream("count", 10, credit=2)
    assert streams.items_for(call_id, 2) == [0, 1]
    begin = time.monotonic()
    streams.shutdown(300)
    assert streams.wait() == 0
    assert 0.25 < time.monotonic() - begin < 5
