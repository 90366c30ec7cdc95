"""Property tests of the worker's frame reader and message checks (docs/fuzzing.md).

In process: the real :class:`Reader` and :class:`Dispatcher` over a scripted socket that hands
out an arbitrary byte stream in arbitrary chunk sizes. ``protocol_error`` and ``parent_gone``
(which end the process) are replaced by exceptions, so every outcome is observable:

- any byte stream ends in EOF or the documented protocol error, never another exception;
- frames are reassembled exactly, in order, however the stream is split;
- a length over the maximum is refused as soon as its header is complete, before any of the
  body is read, and the read buffer never exceeds ``max(INITIAL_BUFFER, 4 + max_frame)``;
- any MessagePack value as a message is acted on or is a protocol error, as the model below says.

Then a few arbitrary messages sent to a real worker process: it keeps serving, or exits with
status 3 (0 after a valid ``shutdown``) without a traceback.
"""

from __future__ import annotations

import itertools
import struct
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import pytest

pytest.importorskip("hypothesis")

import msgpack  # type: ignore[import-untyped,unused-ignore]  # noqa: E402
from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from pyvisor_worker import _dispatch, _reader  # noqa: E402
from pyvisor_worker._dispatch import Dispatcher  # noqa: E402
from pyvisor_worker._framing import new_packer  # noqa: E402
from pyvisor_worker._registry import FunctionSpec  # noqa: E402
from pyvisor_worker._state import Call, WorkerState  # noqa: E402
from conftest import RespawningWorker  # noqa: E402
from pyvisor_worker.testing import WorkerExited  # noqa: E402

MAX_FRAME = 4096
#: A small initial buffer, so that growing and shrinking are exercised.
SMALL_BUFFER = 64


class ProtocolViolation(Exception):
    """Stands for ``protocol_error`` (exit 3)."""


class ParentGone(Exception):
    """Stands for ``parent_gone`` (EOF: exit 0)."""


def _protocol_error(message: str) -> None:
    raise ProtocolViolation(message)


def _parent_gone() -> None:
    raise ParentGone()


class ScriptedSocket:
    """``recv_into`` from a byte stream, in the chunk sizes given (cycled); then EOF."""

    def __init__(self, data: bytes, chunks: List[int], reader_box: List[Any]) -> None:
        self.data = data
        self.chunks = itertools.cycle(chunks or [len(data) or 1])
        self.pos = 0
        self.reads = 0
        self.biggest_buffer = 0
        self._reader_box = reader_box

    def recv_into(self, view: memoryview) -> int:
        if self._reader_box:
            self.biggest_buffer = max(self.biggest_buffer, len(self._reader_box[0]._buf))
        self.reads += 1
        n = min(len(view), next(self.chunks), len(self.data) - self.pos)
        view[:n] = self.data[self.pos : self.pos + n]
        self.pos += n
        return n


class Collect:
    """An executor that keeps what it is given."""

    def __init__(self) -> None:
        self.calls: List[Call] = []

    def submit(self, call: Call) -> None:
        self.calls.append(call)

    def cancel(self, call: Call) -> bool:
        return False


class StubControl:
    def __init__(self) -> None:
        self.shutdowns: List[Optional[float]] = []

    def beat_frame(self, kind: int, nonce: int, pack: Any) -> bytes:
        return b"pong:%d" % nonce

    def begin_shutdown(self, grace: Optional[float], requested: bool = False) -> None:
        self.shutdowns.append(grace)


class StubInline:
    """No plain calls: the reader never stops to execute."""

    def __init__(self) -> None:
        self.queue: List[Call] = []
        self.executing = False
        self.session_start = 0.0

    def drain(self, pack: Any) -> None:  # pragma: no cover - never reached
        raise AssertionError("no inline calls here")


class StubWriter:
    def __init__(self) -> None:
        self.written: List[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def try_flush(self) -> None:
        pass


class Outcome:
    def __init__(self) -> None:
        self.calls: List[Call] = []
        self.written: List[bytes] = []
        self.shutdowns: List[Optional[float]] = []
        self.error: Optional[str] = None  # the protocol error's message
        self.reads = 0
        self.delivered = 0
        self.biggest_buffer = 0


@pytest.fixture(autouse=True)
def _no_exits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_dispatch, "protocol_error", _protocol_error)
    monkeypatch.setattr(_reader, "parent_gone", _parent_gone)
    monkeypatch.setattr(_reader, "INITIAL_BUFFER", SMALL_BUFFER)


def run_reader(data: bytes, chunks: List[int]) -> Outcome:
    """Feed ``data`` to a real Reader + Dispatcher; return what happened."""
    collect = Collect()
    spec = FunctionSpec("echo", lambda x: x, False, "inline", 0, 0, None)
    routes: Dict[str, Any] = {"echo": (spec, collect.submit, collect)}
    control = StubControl()
    state = WorkerState()
    dispatcher = Dispatcher(routes, ["echo"], state, control, MAX_FRAME)  # type: ignore[arg-type]
    writer = StubWriter()
    box: List[Any] = []
    sock = ScriptedSocket(data, chunks, box)
    reader = _reader.Reader(sock, dispatcher, StubInline(), writer)  # type: ignore[arg-type]
    box.append(reader)
    out = Outcome()
    try:
        reader._read(new_packer())
    except ProtocolViolation as e:
        out.error = str(e)
    except ParentGone:
        pass
    out.calls = collect.calls
    out.written = writer.written
    out.shutdowns = control.shutdowns
    out.reads = sock.reads
    out.delivered = sock.pos
    out.biggest_buffer = max(sock.biggest_buffer, len(reader._buf))
    return out


_pack = msgpack.Packer(use_bin_type=True).pack


def frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def call_body(call_id: int, payload: Any) -> bytes:
    return bytes(_pack([1, call_id, 1, "echo", None, None, None, payload]))


_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
_scalar = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=False),
    _text,
    st.binary(max_size=64),
)
#: Any MessagePack value.
_any = st.recursive(
    _scalar,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_text, inner, max_size=4),
    max_leaves=10,
)
_chunks = st.lists(st.integers(1, 300), min_size=1, max_size=8)

SETTINGS = settings(max_examples=150, deadline=None, database=None)


@SETTINGS
@given(payloads=st.lists(_any, min_size=1, max_size=6), chunks=_chunks)
def test_frames_are_reassembled_exactly_however_split(payloads: List[Any], chunks: List[int]) -> None:
    data = b"".join(frame(call_body(i, p)) for i, p in enumerate(payloads, start=1))
    out = run_reader(data, chunks)
    assert out.error is None
    assert [c._call_id for c in out.calls] == list(range(1, len(payloads) + 1))
    assert [c._payload for c in out.calls] == payloads
    assert out.delivered == len(data)
    assert out.biggest_buffer <= max(SMALL_BUFFER, 4 + MAX_FRAME)


@SETTINGS
@given(data=st.binary(max_size=2048), chunks=_chunks)
def test_any_byte_stream_is_eof_or_a_protocol_error(data: bytes, chunks: List[int]) -> None:
    out = run_reader(data, chunks)  # any other exception fails the test
    event("protocol error" if out.error is not None else "eof")
    assert out.biggest_buffer <= max(SMALL_BUFFER, 4 + MAX_FRAME)


@SETTINGS
@given(
    before=st.lists(_any, max_size=3),
    length=st.integers(MAX_FRAME + 1, 2**32 - 1),
    body=st.binary(max_size=512),
    chunks=_chunks,
)
def test_an_over_long_length_is_refused_before_its_body_is_read(
    before: List[Any], length: int, body: bytes, chunks: List[int]
) -> None:
    head = b"".join(frame(call_body(i, p)) for i, p in enumerate(before, start=1))
    data = head + struct.pack(">I", length) + body
    out = run_reader(data, chunks)
    assert out.error is not None and f"{length} bytes exceeds" in out.error, out.error
    # The frames before it were served; nothing after its header was asked for: the read that
    # completed the header was the last one.
    assert len(out.calls) == len(before)
    header_end = len(head) + 4
    assert out.delivered >= header_end
    assert out.delivered - header_end < max(chunks), (out.delivered, header_end)
    assert out.biggest_buffer <= max(SMALL_BUFFER, 4 + MAX_FRAME)


def _uint(x: Any, bits: int = 64) -> bool:
    return type(x) is int and 0 <= x < 2**bits


def expected(msg: Any) -> str:
    """What docs/protocol.md says the worker does with one decoded message."""
    if type(msg) is not list or not msg or type(msg[0]) is not int:
        return "protocol error"
    kind = msg[0]
    if kind == 1:
        if len(msg) != 8:
            return "protocol error"
        _, call_id, attempt, name, deadline, tp, ts, _payload = msg
        ok = (
            _uint(call_id)
            and _uint(attempt, 32)
            and attempt >= 1
            and type(name) is str
            and (deadline is None or _uint(deadline))
            and (tp is None or type(tp) is str)
            and (ts is None or type(ts) is str)
        )
        if not ok:
            return "protocol error"
        return "call" if name == "echo" else "unknown function"
    if kind in (3, 5) and len(msg) >= 2:
        return ("cancel" if kind == 3 else "pong") if _uint(msg[1]) else "protocol error"
    if kind == 7 and len(msg) >= 2:
        return "shutdown" if msg[1] is None or _uint(msg[1]) else "protocol error"
    return "protocol error"


_message = st.one_of(
    _any,
    st.tuples(st.integers(0, 9), st.lists(_any, max_size=8)).map(lambda t: [t[0], *t[1]]),
    st.tuples(
        st.just(1),
        st.one_of(st.integers(0, 2**64 - 1), _any),
        st.one_of(st.integers(1, 2**32 - 1), _any),
        st.one_of(st.sampled_from(["echo", "nope"]), _any),
        st.one_of(st.none(), st.integers(0, 2**64 - 1), _any),
        st.one_of(st.none(), _text, _any),
        st.one_of(st.none(), _text, _any),
        _any,
    ).map(list),
    st.tuples(st.sampled_from([3, 5, 7]), st.one_of(st.none(), st.integers(-5, 2**64 - 1), _any)).map(list),
)


@SETTINGS
@given(msg=_message, chunks=_chunks)
def test_any_message_is_acted_on_or_is_a_protocol_error(msg: Any, chunks: List[int]) -> None:
    out = run_reader(frame(bytes(_pack(msg))), chunks)
    want = expected(msg)
    event(want)
    if want == "protocol error":
        assert out.error is not None
        return
    assert out.error is None, out.error
    if want == "call":
        assert [c._payload for c in out.calls] == [msg[7]]
    elif want == "unknown function":
        assert len(out.written) == 1 and not out.calls
    elif want == "pong":
        assert out.written == [b"pong:%d" % msg[1]]
    elif want == "shutdown":
        assert out.shutdowns == [None if msg[1] is None else msg[1] / 1000.0]
    else:  # cancel of an id the worker does not hold
        assert not out.written and not out.calls


WORKER = """
from pyvisor_worker import expose, run_worker


@expose
def echo(x):
    return x


if __name__ == "__main__":
    run_worker()
"""


@pytest.fixture
def worker(tmp_path: Path) -> Iterator[RespawningWorker]:
    script = tmp_path / "echo_worker.py"
    script.write_text(WORKER)
    w = RespawningWorker(script)
    yield w
    w.close()


@settings(
    max_examples=12,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(msg=_message)
def test_a_real_worker_survives_or_exits_cleanly(worker: RespawningWorker, msg: Any) -> None:
    parent = worker.get()
    if type(msg) is list and len(msg) == 8 and msg[0] == 1 and _uint(msg[1]):
        # FakeParent numbers its own calls from 1: keep the random call's id apart from them.
        msg = [1, 2**40 + msg[1] % 2**20, *msg[2:]]
    parent.send(msg)
    want = expected(msg)
    if want in ("protocol error", "shutdown"):
        with pytest.raises(WorkerExited):
            for _ in range(100):
                parent.recv(timeout=10)
        status = parent.wait()
        stderr = parent.stderr_text()
        worker.parent = None
        parent.close(timeout=10)
        assert status == (3 if want == "protocol error" else 0), stderr
        assert "Traceback" not in stderr, stderr
        return
    # Still serving: a call after it is answered.
    assert parent.invoke("echo", [1, "x"], timeout=10) == [1, "x"]


def test_model_examples() -> None:
    """The model above, on hand-picked messages (so it cannot drift unnoticed)."""
    cases: List[Tuple[Any, str]] = [
        ([1, 1, 1, "echo", None, None, None, 0], "call"),
        ([1, 1, 0, "echo", None, None, None, 0], "protocol error"),
        ([1, 1, True, "echo", None, None, None, 0], "protocol error"),
        ([1, 1, 1, "x", None, None, None, 0], "unknown function"),
        ([1, 1, 1, "echo", None, None, None], "protocol error"),
        ([3, 5], "cancel"),
        ([5, 2**64 - 1], "pong"),
        ([7, None], "shutdown"),
        ([7, -1], "protocol error"),
        ([9], "protocol error"),
        ([], "protocol error"),
        ({"a": 1}, "protocol error"),
    ]
    for msg, want in cases:
        assert expected(msg) == want, msg
        out = run_reader(frame(bytes(_pack(msg))), [3])
        assert (out.error is not None) == (want == "protocol error"), (msg, out.error)
