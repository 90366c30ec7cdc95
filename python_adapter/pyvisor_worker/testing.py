"""A fake pyvisor parent, to test worker scripts without the Rust side.

::

    from pyvisor_worker.testing import FakeParent

    def test_predict(tmp_path):
        with FakeParent.spawn("worker.py", beat_interval_ms=200) as parent:
            call_id = parent.call("predict", {"x": 1.0})
            reply = parent.reply_for(call_id)
            assert reply.ok, reply.error
            assert reply.value == {"y": 2.0}

Streams (generator functions) are called with :meth:`FakeParent.stream` and collected with
:meth:`FakeParent.stream_result` (which grants credit back as items arrive, like the parent)
or, to control the credit yourself, :meth:`FakeParent.items_for` and :meth:`FakeParent.credit`::

    def test_count(tmp_path):
        with FakeParent.spawn("worker.py") as parent:
            result = parent.stream_result(parent.stream("count", 3, credit=16))
            assert result.ok and result.items == [0, 1, 2] and result.reply.value == 3

            call_id = parent.stream("count", 100, credit=2)
            assert parent.items_for(call_id, 2) == [0, 1]   # then the generator waits
            parent.credit(call_id, 1)
            assert parent.items_for(call_id, 1) == [2]

Out-of-band buffers (capability ``oob``): wrap a bytes-like value of a payload in
:class:`OutOfBand` (anywhere: nested in lists and maps too) and the fake parent sends it as the
parent does, in a sealed memfd sent on the side channel (``PYVISOR_FDS_FD``, one datagram
per ``fds`` message) and announced by an ``fds`` message on the main socket; the payload
carries a reference (ext type 80) in its place. Values the worker sends out of band
come back resolved to ``bytes``; :attr:`Reply.buffers` / :attr:`Item.buffers` say how many
buffers the message came with, and :attr:`FakeParent.fds_messages` lists every ``fds`` message
received (its lengths)::

    def test_big(tmp_path):
        with FakeParent.spawn("worker.py") as parent:
            assert "oob" in parent.hello["capabilities"]
            call_id = parent.call("echo", {"image": OutOfBand(b"x" * (1 << 20))})
            reply = parent.reply_for(call_id)
            assert reply.ok and reply.buffers == 0   # (echo returned a dict, in band)

For hostile tests, :meth:`FakeParent.memfd` makes a memfd (sealed or not, of any length) and
:meth:`FakeParent.send_with_fds` sends any fds as one side datagram and then any messages on the
main socket (e.g. ``[12, [len]]`` and a call referencing :func:`ref` ``(0)`` twice, or an
``fds`` message whose count differs from the datagram's; with no fds, no datagram at all), and
:meth:`FakeParent.send_fds` a datagram alone.

The fake parent checks the worker's items as the parent does: an item beyond the credit
granted, with a ``seq`` out of order, for a call that is not a stream or after the stream's
reply raises ``AssertionError``.

It starts the worker exactly as the parent does (``python -m pyvisor_worker SCRIPT`` with the
worker's end of a socketpair in ``PYVISOR_FD`` and of a datagram socketpair in
``PYVISOR_FDS_FD``, its own process group, stdin from
``/dev/null``, stdout/stderr as pipes) and speaks the protocol of docs/protocol.md.
"""

from __future__ import annotations

import array
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Deque, Dict, List, Mapping, Optional, Tuple, Union

from ._buffers import (
    EXT_BUFFER,
    MAX_FDS_PER_FRAME,
    check_sealed,
    decode_ref,
    encode_ref,
    recv_with_fds,
    seal_bytes,
)
from ._config import DEFAULT_MAX_FRAME, PROTOCOL_VERSION
from ._framing import (
    HEADER,
    MSG_BEAT,
    MSG_CALL,
    MSG_CALL_OPTIONS,
    MSG_CANCEL,
    MSG_CREDIT,
    MSG_FDS,
    MSG_HELLO,
    MSG_ITEM,
    MSG_PING,
    MSG_PONG,
    MSG_REPLY,
    MSG_SHUTDOWN,
    frame,
    new_packer,
    unpack_body,
)
from ._watchdog import _load_libc, set_parent_death_signal

__all__ = [
    "FakeParent",
    "Reply",
    "Beat",
    "Item",
    "StreamResult",
    "WorkerExited",
    "encode_frame",
    "OutOfBand",
    "ref",
]

StrPath = Union[str, "os.PathLike[str]"]

DEFAULT_TIMEOUT = 10.0


class OutOfBand:
    """A bytes-like value of a call's payload to send out of band (in a sealed memfd).

    Put it anywhere in the payload given to :meth:`FakeParent.call` or
    :meth:`FakeParent.stream`; the worker's function receives ``bytes`` (or a read-only
    ``memoryview`` with ``@expose(buffers="memoryview")``).
    """

    __slots__ = ("data",)

    def __init__(self, data: Any) -> None:
        self.data = data

    def __repr__(self) -> str:
        return f"OutOfBand(<{memoryview(self.data).nbytes} bytes>)"


def ref(index: int) -> Any:
    """The MessagePack value (ext type 80) that references buffer ``index`` of its frame."""
    return encode_ref(index)


def _extract_buffers(value: Any, buffers: List[Any]) -> Any:
    """``value`` with every :class:`OutOfBand` replaced by a reference (its data appended to
    ``buffers``, in the order MessagePack encodes them); containers without one are returned
    as they are."""
    if isinstance(value, OutOfBand):
        buffers.append(value.data)
        return encode_ref(len(buffers) - 1)
    if isinstance(value, (list, tuple)):
        before = len(buffers)
        items = [_extract_buffers(v, buffers) for v in value]
        return items if len(buffers) > before else value
    if isinstance(value, dict):
        before = len(buffers)
        pairs = [
            (_extract_buffers(k, buffers), _extract_buffers(v, buffers)) for k, v in value.items()
        ]
        return dict(pairs) if len(buffers) > before else value
    return value


class WorkerExited(EOFError):
    """The worker closed its socket (it exited, or is exiting)."""


@dataclass
class Reply:
    """A ``reply`` message: ``[2, id, attempt, ok, span, value_or_error]``.

    ``span`` is ``None``, or ``(span_id, start_ns, end_ns)`` for a call sent with a
    ``traceparent`` whose function ran: the function span's id (also the parent of the spans
    the function made) and ``time.time_ns()`` just before and after the function.
    """

    id: int
    attempt: int
    ok: bool
    value: Any
    span: Optional[Tuple[int, int, int]] = None
    #: How many buffers the reply came with out of band (its value references them).
    buffers: int = 0

    @property
    def error(self) -> Dict[str, Any]:
        """The error map of a failed reply (``kind``, ``type``, ``message``, ...); ``{}`` if ok."""
        if self.ok:
            return {}
        err: Dict[str, Any] = self.value
        return err


@dataclass
class Beat:
    """A ``beat`` message and when it arrived (``time.monotonic()``)."""

    received: float
    seq: int
    rss: int
    in_progress: List[List[Any]]
    served: int
    raw: Dict[str, Any] = field(repr=False)


@dataclass
class Item:
    """An ``item`` message: ``[10, id, attempt, seq, value]``, and when it arrived
    (``time.monotonic()``)."""

    id: int
    attempt: int
    seq: int
    value: Any
    received: float = 0.0
    #: How many buffers the item came with out of band.
    buffers: int = 0


@dataclass
class StreamResult:
    """A stream's items (the values, in order) and the reply that ended it."""

    items: List[Any]
    reply: Reply

    @property
    def ok(self) -> bool:
        return self.reply.ok

    @property
    def error(self) -> Dict[str, Any]:
        return self.reply.error


class _Stream:
    """The fake parent's book-keeping of one stream call."""

    __slots__ = ("window", "credit", "received", "items", "ended")

    def __init__(self, window: int) -> None:
        self.window = window
        self.credit = window  # items the worker may still send
        self.received = 0  # items received (the next seq)
        self.items: Deque[Item] = deque()  # received, not taken yet
        self.ended = False  # its reply came


def encode_frame(message: Any) -> bytes:
    """One protocol frame (length header + MessagePack body) for ``message``."""
    return frame(new_packer()(message))


class FakeParent:
    """The parent's side of one worker: a process and the socket to it."""

    def __init__(
        self,
        proc: "subprocess.Popen[bytes]",
        sock: socket.socket,
        max_frame: int = DEFAULT_MAX_FRAME,
        side: Optional[socket.socket] = None,
    ) -> None:
        self.proc = proc
        self.sock = sock
        #: The parent's end of the side channel (``SOCK_DGRAM``): fds for the worker.
        self.side = side
        self.max_frame = max_frame
        #: The worker's hello map (empty until it arrived; see ``spawn(wait_hello=...)``).
        self.hello: Dict[str, Any] = {}
        #: Every beat received so far, in order.
        self.beats: List[Beat] = []
        self._pack = new_packer()
        self._buf = bytearray()
        self._inbox: Deque[List[Any]] = deque()
        self._replies: Dict[int, Reply] = {}
        self._streams: Dict[int, _Stream] = {}
        self._next_id = 1
        self._eof = False
        #: The lengths of every ``fds`` message received, in order.
        self.fds_messages: List[List[int]] = []
        self._fds: Deque[int] = deque()  # received, not claimed yet
        self._claimed: Optional[List[bytes]] = None  # the buffers of the next frame
        self._frame_buffers = 0  # how many the frame just taken came with
        self._stdout: List[bytes] = []
        self._stderr: List[bytes] = []
        self._pumps = [
            threading.Thread(target=_pump, args=(proc.stdout, self._stdout), daemon=True),
            threading.Thread(target=_pump, args=(proc.stderr, self._stderr), daemon=True),
        ]
        for t in self._pumps:
            t.start()

    # ------------------------------------------------------------------ start

    @classmethod
    def spawn(
        cls,
        script: Optional[StrPath] = None,
        *args: str,
        module: Optional[str] = None,
        beat_interval_ms: int = 1000,
        max_frame: int = DEFAULT_MAX_FRAME,
        env: Optional[Mapping[str, str]] = None,
        cwd: Optional[StrPath] = None,
        python: str = sys.executable,
        worker_id: str = "test-worker",
        run_id: str = "test-run",
        wait_hello: bool = True,
        timeout: float = 30.0,
        parent_death_signal: bool = True,
    ) -> "FakeParent":
        """Start ``python -m pyvisor_worker SCRIPT args...`` (or ``--module MODULE``).

        With ``wait_hello`` (the default) it returns once the worker sent ``hello`` (available
        as ``.hello``), and raises :class:`WorkerExited` with the worker's stderr if it died
        first. ``env`` adds to (and overrides) this process's environment.

        With ``parent_death_signal`` the worker gets ``PR_SET_PDEATHSIG=SIGKILL`` like under
        the real parent: it dies when the *thread* that spawned it ends, so spawn from a
        thread that outlives the worker (normally the main thread).
        """
        if (script is None) == (module is None):
            raise ValueError("give exactly one of script or module")
        target = ["--module", module] if module is not None else [os.fspath(script)]  # type: ignore[arg-type]
        parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        parent_side, child_side = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        child_fd = child_sock.fileno()
        child_side_fd = child_side.fileno()
        full_env = dict(os.environ)
        full_env.update(
            {
                "PYVISOR_FD": str(child_fd),
                "PYVISOR_FDS_FD": str(child_side_fd),
                "PYVISOR_WORKER_ID": worker_id,
                "PYVISOR_PROTOCOL": str(PROTOCOL_VERSION),
                "PYVISOR_MAX_FRAME": str(max_frame),
                "PYVISOR_BEAT_INTERVAL_MS": str(beat_interval_ms),
                "PYVISOR_RUN_ID": run_id,
            }
        )
        if env:
            full_env.update(env)
        try:
            proc = subprocess.Popen(
                [python, "-m", "pyvisor_worker", *target, *args],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                pass_fds=(child_fd, child_side_fd),
                env=full_env,
                cwd=cwd,
                start_new_session=True,
                preexec_fn=_kill_with_parent if parent_death_signal else None,
            )
        except BaseException:
            parent_sock.close()
            parent_side.close()
            raise
        finally:
            child_sock.close()
            child_side.close()
        parent = cls(proc, parent_sock, max_frame, parent_side)
        if wait_hello:
            msg = parent._next_message(timeout)
            if msg[0] != MSG_HELLO:
                parent.kill()
                raise AssertionError(f"the first message is not hello: {msg!r}")
            parent.hello = msg[1]
        return parent

    # ------------------------------------------------------------------ sending

    def send(self, message: Any) -> None:
        """Encode and send one message."""
        self.sock.sendall(frame(self._pack(message)))

    def send_raw(self, data: bytes) -> None:
        """Send bytes as they are (for malformed-frame tests)."""
        self.sock.sendall(data)

    def call(
        self,
        function: str,
        payload: Any = None,
        *,
        call_id: Optional[int] = None,
        attempt: int = 1,
        deadline_ms: Optional[int] = None,
        traceparent: Optional[str] = None,
        tracestate: Optional[str] = None,
        options: Optional[Dict[str, Any]] = None,
    ) -> int:
        """Send a ``call`` (a ``call_options`` when ``options`` is given, e.g.
        ``{"ack_start": True}``); returns its id (fresh unless ``call_id`` is given)."""
        if call_id is None:
            call_id = self._next_id
        self._next_id = max(self._next_id, call_id + 1)
        head = [call_id, attempt, function, deadline_ms, traceparent, tracestate]
        buffers: List[Any] = []
        payload = _extract_buffers(payload, buffers)
        if options is None:
            message = [MSG_CALL, *head, payload]
        else:
            message = [MSG_CALL_OPTIONS, *head, options, payload]
        if not buffers:
            self.send(message)
            return call_id
        if len(buffers) > MAX_FDS_PER_FRAME:
            raise ValueError(f"{len(buffers)} buffers in one call, at most {MAX_FDS_PER_FRAME}")
        fds = [seal_bytes(b) for b in buffers]
        try:
            lengths = [memoryview(b).nbytes for b in buffers]
            self.send_with_fds([[MSG_FDS, lengths], message], fds)
        finally:
            for fd in fds:
                os.close(fd)
        return call_id

    def send_with_fds(self, messages: List[Any], fds: List[int]) -> None:
        """Send ``fds`` (kept open: close them yourself) as one datagram on the side channel
        (unless there are none: then no datagram), then ``messages``' frames on the main
        socket, as the parent sends an ``fds`` message and its call. Anything goes, for
        hostile tests: an ``fds`` message with wrong lengths, a datagram whose count differs
        from the message's, an ``fds`` message with no datagram, more than 16 fds..."""
        if fds:
            self.send_fds(fds)
        data = b"".join(frame(self._pack(m)) for m in messages)
        if data:
            self.sock.sendall(data)

    def send_fds(self, fds: List[int]) -> None:
        """Send one datagram on the side channel: 1 byte (``0``) with ``fds`` (any number,
        none included) as ``SCM_RIGHTS``; the fds stay open here."""
        if self.side is None:
            raise RuntimeError("this FakeParent has no side channel")
        ancdata = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        self.side.sendmsg([b"\0"], ancdata)

    @staticmethod
    def memfd(data: bytes, *, sealed: bool = True, size: Optional[int] = None) -> int:
        """A memfd holding ``data`` (then grown or cut to ``size`` if given), sealed against
        every change unless ``sealed=False``; the caller closes it."""
        if sealed and size is None:
            return seal_bytes(data)
        fd = os.memfd_create("fake-parent", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.write(fd, data)
        if size is not None:
            os.ftruncate(fd, size)
        if sealed:
            import fcntl

            fcntl.fcntl(
                fd,
                fcntl.F_ADD_SEALS,
                fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL,
            )
        return fd

    def stream(
        self,
        function: str,
        payload: Any = None,
        *,
        credit: int,
        call_id: Optional[int] = None,
        attempt: int = 1,
        deadline_ms: Optional[int] = None,
        traceparent: Optional[str] = None,
        tracestate: Optional[str] = None,
        options: Optional[Dict[str, Any]] = None,
    ) -> int:
        """Call a generator function as a stream with initial credit ``credit`` (a
        ``call_options`` whose options have ``stream: credit``, plus ``options``); returns its
        id. Its items are collected for :meth:`items_for` and :meth:`stream_result`."""
        opts = dict(options or {})
        opts["stream"] = credit
        call_id = self.call(
            function,
            payload,
            call_id=call_id,
            attempt=attempt,
            deadline_ms=deadline_ms,
            traceparent=traceparent,
            tracestate=tracestate,
            options=opts,
        )
        self._streams[call_id] = _Stream(credit)
        return call_id

    def credit(self, call_id: int, n: int) -> None:
        """Send ``credit``: stream ``call_id`` may send ``n`` more items."""
        self.send([MSG_CREDIT, call_id, n])
        stream = self._streams.get(call_id)
        if stream is not None and type(n) is int:
            stream.credit += n

    def cancel(self, call_id: int) -> None:
        self.send([MSG_CANCEL, call_id])

    def ping(self, nonce: Any = 0) -> None:
        self.send([MSG_PING, nonce])

    def shutdown(self, grace_ms: int = 5000) -> None:
        self.send([MSG_SHUTDOWN, grace_ms])

    def invoke(self, function: str, payload: Any = None, timeout: float = DEFAULT_TIMEOUT) -> Any:
        """Call and wait; returns the value, raises AssertionError with the error otherwise."""
        reply = self.reply_for(self.call(function, payload), timeout)
        if not reply.ok:
            raise AssertionError(f"{function} failed: {reply.error}")
        return reply.value

    # ------------------------------------------------------------------ receiving

    def recv(self, timeout: float = DEFAULT_TIMEOUT) -> List[Any]:
        """The next message other than a beat or an item (beats are collected in ``.beats``,
        a stream's items for :meth:`items_for`)."""
        while True:
            msg = self._inbox.popleft() if self._inbox else self._next_message(timeout)
            if msg[0] != MSG_BEAT:
                if msg[0] == MSG_REPLY:
                    self._replies.pop(msg[1], None)
                return msg

    def reply_for(self, call_id: int, timeout: float = DEFAULT_TIMEOUT) -> Reply:
        """Wait for the reply to ``call_id``; other messages stay queued for :meth:`recv`."""
        deadline = time.monotonic() + timeout
        while call_id not in self._replies:
            msg = self._next_message(max(0.0, deadline - time.monotonic()))
            if msg[0] != MSG_BEAT:
                self._inbox.append(msg)
        reply = self._replies.pop(call_id)
        for i, queued in enumerate(self._inbox):
            if queued[0] == MSG_REPLY and queued[1] == call_id:
                del self._inbox[i]
                break
        return reply

    def items_for(
        self, call_id: int, count: Optional[int] = None, timeout: float = DEFAULT_TIMEOUT
    ) -> List[Any]:
        """The values of the next ``count`` items of stream ``call_id`` (waits for them; they
        are taken: the next call returns the following ones). With ``count=None``: the items
        received so far (including those the socket already holds), without waiting."""
        return [item.value for item in self.item_messages_for(call_id, count, timeout)]

    def item_messages_for(
        self, call_id: int, count: Optional[int] = None, timeout: float = DEFAULT_TIMEOUT
    ) -> List[Item]:
        """:meth:`items_for`, as :class:`Item` messages (``seq``, arrival time)."""
        stream = self._stream(call_id)
        if count is None:
            self._receive_available()
            count = len(stream.items)
        deadline = time.monotonic() + timeout
        while len(stream.items) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    f"{len(stream.items)} of {count} items of stream {call_id} arrived in "
                    f"{timeout:.1f} s{self._stderr_tail()}"
                )
            self._receive_one(remaining)
        return [stream.items.popleft() for _ in range(count)]

    def stream_result(
        self, call_id: int, timeout: float = DEFAULT_TIMEOUT, *, grant: bool = True
    ) -> StreamResult:
        """Wait for the reply that ends stream ``call_id``; returns it with the values of the
        items not taken yet. With ``grant`` (the default) credit is granted back for the
        items as they arrive (after each read from the socket), as the parent does for a
        caller that consumes them promptly; without, the credit granted must exceed the
        number of items (without credit the generator is not resumed, not even to find that it
        is exhausted)."""
        stream = self._stream(call_id)
        deadline = time.monotonic() + timeout
        values: List[Any] = []
        ungranted = 0  # items taken, credit not granted back yet
        while call_id not in self._replies:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    f"no reply to stream {call_id} in {timeout:.1f} s "
                    f"({stream.received} items){self._stderr_tail()}"
                )
            self._receive_one(remaining)
            if stream.items:
                ungranted += len(stream.items)
                values.extend(item.value for item in stream.items)
                stream.items.clear()
            if grant and ungranted and not stream.ended and not self._frame_buffered():
                self.credit(call_id, ungranted)
                ungranted = 0
        values.extend(item.value for item in stream.items)
        stream.items.clear()
        return StreamResult(values, self.reply_for(call_id, 0.0))

    def _stream(self, call_id: int) -> _Stream:
        stream = self._streams.get(call_id)
        if stream is None:
            raise ValueError(f"call {call_id} was not sent as a stream (FakeParent.stream)")
        return stream

    def _receive_one(self, timeout: float) -> None:
        """Receive one message (items included); other messages are queued for recv()."""
        msg = self._next_message(timeout, items=True)
        if msg[0] != MSG_BEAT and msg[0] != MSG_ITEM:
            self._inbox.append(msg)

    def _receive_available(self) -> None:
        """Receive what the socket holds now, without waiting for more."""
        while not self._eof:
            ready, _, _ = select.select([self.sock], [], [], 0)
            if not ready:
                break
            data = self._recv_chunk()
            if not data:
                self._eof = True
            self._buf += data
        while self._frame_buffered():
            self._receive_one(0.0)

    def _frame_buffered(self) -> bool:
        buf = self._buf
        return len(buf) >= 4 and len(buf) >= 4 + HEADER.unpack_from(buf, 0)[0]

    def _item(self, msg: List[Any]) -> None:
        """Check and keep an item, as the parent would."""
        if len(msg) != 5:
            raise AssertionError(f"an item has {len(msg)} elements instead of 5: {msg!r:.300}")
        _, call_id, attempt, seq, value = msg
        stream = self._streams.get(call_id)
        if stream is None:
            raise AssertionError(f"an item for call {call_id}, which is not a stream: {msg!r:.300}")
        if stream.ended:
            raise AssertionError(f"an item of stream {call_id} after its reply: {msg!r:.300}")
        if seq != stream.received:
            raise AssertionError(
                f"item seq {seq!r} of stream {call_id} out of order (expected {stream.received})"
            )
        if stream.credit <= 0:
            raise AssertionError(f"item {seq} of stream {call_id} exceeds the credit granted")
        stream.credit -= 1
        stream.received += 1
        stream.items.append(
            Item(call_id, attempt, seq, value, time.monotonic(), self._frame_buffers)
        )

    def pong_for(self, nonce: Any, timeout: float = DEFAULT_TIMEOUT) -> Dict[str, Any]:
        """Wait for the pong answering ``nonce``; returns its beat map."""
        deadline = time.monotonic() + timeout
        while True:
            for i, queued in enumerate(self._inbox):
                if queued[0] == MSG_PONG and queued[1] == nonce:
                    del self._inbox[i]
                    beat: Dict[str, Any] = queued[2]
                    return beat
            msg = self._next_message(max(0.0, deadline - time.monotonic()))
            if msg[0] != MSG_BEAT:
                self._inbox.append(msg)

    def wait_beats(self, count: int, timeout: float = DEFAULT_TIMEOUT) -> List[Beat]:
        """Wait until at least ``count`` beats have arrived in total; returns them all."""
        deadline = time.monotonic() + timeout
        while len(self.beats) < count:
            msg = self._next_message(max(0.0, deadline - time.monotonic()))
            if msg[0] != MSG_BEAT:
                self._inbox.append(msg)
        return list(self.beats)

    def _next_message(self, timeout: float, items: bool = False) -> List[Any]:
        """The next message; an item is kept for its stream (and returned only if ``items``)."""
        deadline = time.monotonic() + timeout
        while True:
            msg = self._take_frame()
            if msg is not None:
                if msg[0] == MSG_ITEM:
                    self._item(msg)
                    if not items:
                        continue
                elif msg[0] == MSG_BEAT:
                    b = msg[1]
                    self.beats.append(
                        Beat(time.monotonic(), b["seq"], b["rss"], b["in_progress"], b["served"], b)
                    )
                elif msg[0] == MSG_REPLY:
                    self._replies[msg[1]] = _reply(msg, self._frame_buffers)
                    stream = self._streams.get(msg[1])
                    if stream is not None:
                        stream.ended = True
                return msg
            if self._eof:
                raise WorkerExited(self._describe_exit())
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no message from the worker in {timeout:.1f} s{self._stderr_tail()}")
            ready, _, _ = select.select([self.sock], [], [], remaining)
            if ready:
                data = self._recv_chunk()
                if not data:
                    self._eof = True
                self._buf += data

    def _recv_chunk(self) -> memoryview:
        """One ``recvmsg``: the bytes, with the fds that came with them kept in order."""
        buf = bytearray(1 << 20)
        try:
            n, fds = recv_with_fds(self.sock, buf, MAX_FDS_PER_FRAME)
        except ConnectionResetError:
            return memoryview(b"")
        self._fds.extend(fds)
        return memoryview(buf)[:n]

    def _take_frame(self) -> Optional[List[Any]]:
        while True:
            if len(self._buf) < 4:
                return None
            (n,) = HEADER.unpack_from(self._buf, 0)
            if n > self.max_frame:
                raise AssertionError(
                    f"the worker sent a frame of {n} bytes (max {self.max_frame})"
                )
            if len(self._buf) < 4 + n:
                return None
            body = bytes(self._buf[4 : 4 + n])
            del self._buf[: 4 + n]
            claimed = self._claimed
            self._claimed = None
            self._frame_buffers = 0
            if claimed is None:
                msg = unpack_body(body, ext_hook=_no_reference)  # type: ignore[call-arg]
            else:
                msg = self._resolve(body, claimed)
            if not isinstance(msg, list) or not msg:
                raise AssertionError(f"the worker sent a malformed message: {msg!r}")
            if msg[0] == MSG_FDS:
                if "oob" not in self.hello.get("capabilities", ()):
                    raise AssertionError("an fds message from a worker that did not announce oob")
                self._claimed = self._claim(msg)
                continue
            return msg

    def _claim(self, msg: List[Any]) -> List[bytes]:
        """An ``fds`` message: take, check and read the oldest fds, as the parent does."""
        if len(msg) != 2 or type(msg[1]) is not list or not 1 <= len(msg[1]) <= MAX_FDS_PER_FRAME:
            raise AssertionError(f"malformed fds message: {msg!r:.200}")
        lengths = msg[1]
        if len(self._fds) < len(lengths):
            raise AssertionError(
                f"an fds message claims {len(lengths)} fds, {len(self._fds)} received"
            )
        self.fds_messages.append(list(lengths))
        fds = [self._fds.popleft() for _ in lengths]
        try:
            out = []
            for i, (fd, n) in enumerate(zip(fds, lengths)):
                check_sealed(fd, n, i)
                data = os.pread(fd, n, 0) if n else b""
                while len(data) < n:  # (a large pread may come back short)
                    data += os.pread(fd, n - len(data), len(data))
                out.append(data)
            return out
        finally:
            for fd in fds:
                os.close(fd)

    def _resolve(self, body: bytes, buffers: List[bytes]) -> Any:
        """Decode the frame after an ``fds`` message: each reference becomes its bytes; every
        buffer must be referenced exactly once."""
        used = [False] * len(buffers)

        def hook(code: int, data: bytes) -> Any:
            if code != EXT_BUFFER:
                return _ext(code, data)
            index = decode_ref(code, data)
            if index >= len(buffers):
                raise AssertionError(f"buffer reference {index} out of range ({len(buffers)})")
            if used[index]:
                raise AssertionError(f"buffer {index} referenced more than once")
            used[index] = True
            return buffers[index]

        msg = unpack_body(body, ext_hook=hook)  # type: ignore[call-arg]
        if not all(used):
            raise AssertionError(f"buffers not referenced by the frame after fds: {used}")
        if not isinstance(msg, list) or not msg or msg[0] not in (MSG_REPLY, MSG_ITEM):
            raise AssertionError(f"an fds message followed by {msg!r:.200}")
        self._frame_buffers = len(buffers)
        return msg

    @property
    def unclaimed_fds(self) -> int:
        """Fds received from the worker that no ``fds`` message claimed (yet)."""
        return len(self._fds)

    # ------------------------------------------------------------------ process

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stdout_text(self) -> str:
        return b"".join(self._stdout).decode("utf-8", "replace")

    def stderr_text(self) -> str:
        return b"".join(self._stderr).decode("utf-8", "replace")

    def wait(self, timeout: float = DEFAULT_TIMEOUT) -> int:
        """Wait for the worker to exit; returns its status (negative: killed by that signal)."""
        status = self.proc.wait(timeout)
        for t in self._pumps:
            t.join(timeout)
        return status

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to the worker process (not its group)."""
        if self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, sig)
            except ProcessLookupError:
                pass

    def close(self, timeout: float = DEFAULT_TIMEOUT) -> int:
        """Close the socket (the worker sees EOF and exits); SIGKILL its group if it lingers."""
        try:
            self.sock.close()
            if self.side is not None:
                self.side.close()
        finally:
            try:
                return self.wait(timeout)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                return self.wait(timeout)

    def __enter__(self) -> "FakeParent":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def _stderr_tail(self, lines: int = 20) -> str:
        tail = self.stderr_text().splitlines()[-lines:]
        return ("\n--- worker stderr ---\n" + "\n".join(tail)) if tail else ""

    def _describe_exit(self) -> str:
        try:
            status: Optional[int] = self.proc.wait(2.0)
        except subprocess.TimeoutExpired:
            status = None
        else:
            for t in self._pumps:
                t.join(2.0)
        return f"the worker closed its socket (exit status {status}){self._stderr_tail()}"


def _ext(code: int, data: bytes) -> Any:
    import msgpack  # type: ignore[import-untyped,unused-ignore]

    return msgpack.ExtType(code, data)


def _no_reference(code: int, data: bytes) -> Any:
    if code == EXT_BUFFER:
        raise AssertionError("a buffer reference in a frame not announced by an fds message")
    return _ext(code, data)


def _reply(msg: List[Any], buffers: int = 0) -> Reply:
    if len(msg) != 6:
        raise AssertionError(f"a reply has {len(msg)} elements instead of 6: {msg!r:.300}")
    span = msg[4]
    if span is not None:
        if type(span) is not list or len(span) != 3:
            raise AssertionError(f"malformed span in a reply: {span!r:.300}")
        span_id, start_ns, end_ns = span
        if type(span_id) is not int or type(start_ns) is not int or type(end_ns) is not int:
            raise AssertionError(f"malformed span in a reply: {span!r:.300}")
        span = (span_id, start_ns, end_ns)
    return Reply(msg[1], msg[2], msg[3], msg[5], span, buffers)


def _pump(stream: Any, sink: List[bytes]) -> None:
    for chunk in iter(lambda: stream.read1(65536), b""):
        sink.append(chunk)
    stream.close()


def _kill_with_parent() -> None:  # runs in the child between fork and exec
    set_parent_death_signal(signal.SIGKILL)


_load_libc()  # now, not in the forked child
