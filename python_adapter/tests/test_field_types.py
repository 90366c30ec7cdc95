"""Every field of every message the parent sends is type-checked (docs/protocol.md): a
mistyped field, or a call whose id the worker already holds, is a protocol error (exit 3)
and the call's function never runs."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, List

import pytest

from pyvisor_worker.testing import FakeParent, WorkerExited, encode_frame

from conftest import SpawnFn

#: ``touch`` leaves a trace of every run in MARK_FILE; ``hold`` keeps its call id held.
WORKER = """
import asyncio
import os

from pyvisor_worker import Context, expose, run_worker


@expose
def touch(x, ctx: Context):
    with open(os.environ["MARK_FILE"], "a") as f:
        f.write(f"{ctx.call_id} {x!r}\\n")
    return x


@expose
async def hold(seconds):
    await asyncio.sleep(seconds)
    return "held"


if __name__ == "__main__":
    run_worker()
"""

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
GOOD = [1, 7, 1, "touch", None, None, None, "payload"]


def _call(**fields: Any) -> List[Any]:
    msg = list(GOOD)
    positions = {"type": 0, "id": 1, "attempt": 2, "function": 3, "deadline_ms": 4,
                 "traceparent": 5, "tracestate": 6}
    for name, value in fields.items():
        msg[positions[name]] = value
    return msg


@pytest.fixture
def mark(tmp_path: Path) -> Path:
    return tmp_path / "ran.txt"


@pytest.fixture
def parent(spawn: SpawnFn, mark: Path) -> FakeParent:
    return spawn(WORKER, name="typed_worker.py", env={"MARK_FILE": str(mark)})


def _expect_protocol_error(parent: FakeParent, mark: Path, *messages: List[Any]) -> None:
    parent.send_raw(b"".join(encode_frame(m) for m in messages))
    with pytest.raises(WorkerExited):
        while True:  # anything but the end of the worker fails below
            msg = parent.recv(timeout=10)
            pytest.fail(f"the worker answered {msg!r:.300} instead of exiting")
    assert parent.wait() == 3
    stderr = parent.stderr_text()
    assert "protocol error" in stderr
    assert "Traceback" not in stderr, stderr
    assert not mark.exists(), f"the function ran: {mark.read_text()!r}"


def test_well_typed_call_runs(parent: FakeParent, mark: Path) -> None:
    deadline_ms = int(time.time() * 1000) + 60_000
    parent.send(_call(deadline_ms=deadline_ms, traceparent=TRACEPARENT, tracestate="k=v",
                      attempt=2**32 - 1, id=2**64 - 1))
    reply = parent.reply_for(2**64 - 1)
    assert reply.ok and reply.value == "payload"
    assert mark.read_text() == f"{2**64 - 1} 'payload'\n"


@pytest.mark.parametrize(
    "fields",
    [
        {"traceparent": 5},
        {"traceparent": b"00-abc"},
        {"tracestate": ["k=v"]},
        {"tracestate": {"k": "v"}},
        {"attempt": 0},
        {"attempt": -1},
        {"attempt": 2**32},
        {"attempt": True},
        {"attempt": 1.0},
        {"id": -1},
        {"id": True},
        {"id": "7"},
        {"function": 42},
        {"function": b"touch"},
        {"function": None},
        {"deadline_ms": time.time() * 1000 + 60_000},
        {"deadline_ms": -1},
        {"deadline_ms": "soon"},
        {"type": True},  # a bool is not the integer message type 1
        {"type": 1.0},
    ],
    ids=repr,
)
def test_mistyped_call_field_is_a_protocol_error(
    parent: FakeParent, mark: Path, fields: Any
) -> None:
    _expect_protocol_error(parent, mark, _call(**fields))


@pytest.mark.parametrize(
    "message",
    [
        [3, "7"],  # cancel: id uint
        [3, -1],
        [3, None],
        [3, [7]],
        [5, "nonce"],  # ping: nonce uint
        [5, -1],
        [5, None],
        [5, 1.5],
        [7, "100"],  # shutdown: grace_ms uint | nil
        [7, -1],
        [7, 1.5],
        [7, True],
        [3.0, 7],  # a float message type
    ],
    ids=repr,
)
def test_mistyped_control_field_is_a_protocol_error(
    parent: FakeParent, mark: Path, message: List[Any]
) -> None:
    # A well-typed call follows in the same write: it must not run either.
    _expect_protocol_error(parent, mark, message, GOOD)


def test_control_messages_with_well_typed_fields_work(parent: FakeParent, mark: Path) -> None:
    parent.ping(2**64 - 1)
    assert "in_progress" in parent.pong_for(2**64 - 1)
    parent.cancel(12345)  # an id the worker does not hold: not an error
    parent.send([7, None])  # shutdown with the default grace
    assert parent.wait() == 0


def test_duplicate_id_of_a_held_call_is_a_protocol_error(parent: FakeParent, mark: Path) -> None:
    parent.call("hold", 30, call_id=7)
    parent.ping(1)
    held = parent.pong_for(1)["in_progress"]
    assert [entry[0] for entry in held] == [7]
    _expect_protocol_error(parent, mark, GOOD)  # id 7 again


def test_duplicate_id_in_one_write_is_a_protocol_error(parent: FakeParent, mark: Path) -> None:
    _expect_protocol_error(parent, mark, GOOD, GOOD)


def test_duplicate_id_with_an_unknown_function_is_a_protocol_error(
    parent: FakeParent, mark: Path
) -> None:
    parent.call("hold", 30, call_id=7)
    _expect_protocol_error(parent, mark, _call(function="no_such_function"), GOOD)
