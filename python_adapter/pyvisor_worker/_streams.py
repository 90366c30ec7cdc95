"""Streams: generator functions called as streams (capability ``stream``, docs/protocol.md).

Owns :class:`StreamCall` (a call made with the ``stream`` option: its credit, and how a
generator waiting for credit is woken), :class:`StreamRunner` (drives one stream's generator,
plain or async, and builds the reply that ends the stream) and :class:`Flusher` (the thread
that writes the items of a generator that has become slow).

How a stream runs (on the thread or task its function's executor gives it):

- **Credit.** The driver keeps the credit it may spend in a local ``budget`` (the initial
  ``W``, then what it took from :attr:`StreamCall._credit`): an item costs no lock. A ``credit``
  message adds to ``_credit`` under the call's lock (:meth:`StreamCall.grant`, on the
  thread that read it); only when ``budget`` is spent does the driver take the lock, take what
  was granted meanwhile, or wait for it. While it waits, the generator is not resumed.
- **Items.** Each item is packed once (``[10, id, attempt, seq, value]``, a frame of its
  own) and appended to the call's ``_pending`` list without a lock. ``_pending`` is written
  (joined, one ``sendall`` through the locked :class:`~._replies.Writer`, after anything staged)
  by the driver before it waits for credit, when ``FLUSH_BYTES`` have gathered, and at the
  end (then staged to go out with the reply: every item of a stream precedes its reply). A
  generator that is slow to produce its next item (``time.sleep`` between ``yield``s) cannot
  write anything itself: the :class:`Flusher` thread is woken by the item that makes a
  ``_pending`` list non-empty, waits ``TICK`` and writes every stream's pending items, and
  keeps doing so every ``TICK`` while any are left. So an item is written when the driver
  next waits for credit, or within about ``TICK``; items produced together go out together.
  Only the writer's lock holders remove from ``_pending`` (always from the front), only the
  driver appends: the items of a stream go out in order.
- **Out of band** (capability ``oob``): a bytes-like item of at least the threshold is
  written at once by the driver (``Writer.send_with_fds``: the stream's pending items first,
  then the ``fds`` message and the item, under one lock), so the items stay in order; a
  buffer-protocol item MessagePack cannot encode (a numpy array) goes as ``bytes``.
- **End.** The reply is ``ok`` with the number of items sent; an ``exception`` error if the
  generator raised; ``unserializable``/``reply_too_large`` (instead of the item) if an item
  cannot be encoded or its frame exceeds the maximum frame size, and then the generator is
  closed; ``cancelled`` after a ``cancel``. A traced stream's span covers the generator's whole
  run (its context is current on the driving thread, or in the driving task, from the first
  resumption to the end: every resumption runs in it).
- **Cancel.** ``ctx.cancelled`` is set by dispatch, which also wakes a driver waiting for
  credit (:meth:`StreamCall.interrupt`). The driver looks at ``ctx.cancelled`` before each
  resumption, and closes the generator where it is suspended (``close()``/``aclose()``:
  ``GeneratorExit`` at its ``yield``). An async stream's task is also cancelled (as an
  ``async def`` call's is): a generator awaiting something inside gets ``CancelledError`` there.

Does not decide where a stream runs (``_executors``), parse frames or check the ``stream``
option (``_dispatch``).
"""

from __future__ import annotations

import functools
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, FrozenSet, List, NoReturn, Optional, Set, Tuple

from ._exits import guarded
from ._framing import (
    HEADER,
    KIND_CANCELLED,
    KIND_REPLY_TOO_LARGE,
    KIND_UNSERIALIZABLE,
    MSG_ITEM,
    qualified_name,
)
from ._oob import BufferTooLarge, Outbound, item_body
from ._registry import invoke
from ._replies import (
    FLUSH_BYTES,
    TICK,
    Pack,
    Writer,
    cancelled_frame,
    error_frame,
    exception_frame,
    result_frame,
)
from ._state import RUNNING, Call

if TYPE_CHECKING:
    import asyncio

    from typing import Protocol

    from ._registry import FunctionSpec

    class Runner(Protocol):
        """What a stream needs of ``_executors.Runner`` (which sits above this module)."""

        def ack_start(self, call: Call, pack: Pack) -> None: ...

        def span_begin(self, call: Call) -> Tuple[int, Any, int]: ...

        def span_end(self, span_id: int, token: Any, start: int) -> List[int]: ...

        def user_exit(self, exc: BaseException) -> NoReturn: ...

        oob: Optional[Outbound]
        oob_types: FrozenSet[type]

__all__ = ["StreamCall", "AckedStreamCall", "StreamRunner", "Flusher", "CANCELLED_TYPE"]

#: The error type of a cancelled stream's reply (as for a cancelled call).
CANCELLED_TYPE = "asyncio.exceptions.CancelledError"

_HEADER_PACK = HEADER.pack
_time = time.time


class _MaybeOutOfBand(Exception):
    """A bytes-like item with ``oob`` on: taken off the common path (``item_body``)."""


class StreamCall(Call):
    """A call made with the ``stream`` option: its generator's items go out under credit.

    ``_window`` is the initial credit ``W``; ``_credit`` what ``credit`` messages granted
    since the driver last took it (under ``_lock``); ``_wake`` wakes the driver while it waits
    for credit (``None`` otherwise); ``_pending`` the item frames not written yet.
    """

    __slots__ = ("_window", "_credit", "_lock", "_wake", "_event", "_pending")

    _stream = True
    #: True for every stream call (``Call._ack_start``: the plain path's one test of "more to
    #: do than run the function"); whether ``started`` is sent is ``_ack_stream``.
    _ack_start = True
    _ack_stream = False

    def __init__(
        self,
        call_id: int,
        attempt: int,
        spec: "FunctionSpec",
        payload: Any,
        deadline_ms: Optional[int],
        traceparent: Optional[str],
        tracestate: Optional[str],
        window: int = 1,
    ) -> None:
        super().__init__(call_id, attempt, spec, payload, deadline_ms, traceparent, tracestate)
        self._window = window
        self._credit = 0
        self._lock = threading.Lock()
        self._wake: Optional[Callable[[], Any]] = None
        self._event: Optional[threading.Event] = None
        self._pending: List[bytes] = []

    # -------------------------------------------------------------- the reading thread

    def grant(self, n: int) -> None:
        """A ``credit`` message: ``n`` more items (wakes the driver if it waits)."""
        with self._lock:
            self._credit += n
            wake = self._wake
            self._wake = None
        if wake is not None:
            wake()

    def interrupt(self) -> None:
        """After ``_cancelled`` was set: wake the driver if it waits for credit."""
        with self._lock:
            wake = self._wake
            self._wake = None
        if wake is not None:
            wake()

    # -------------------------------------------------------------- the driver

    def wait_credit(self) -> int:
        """Block until credit was granted (returns it) or the call is cancelled (0)."""
        lock = self._lock
        while True:
            with lock:
                if self._cancelled:
                    return 0
                n = self._credit
                if n:
                    self._credit = 0
                    return n
                event = self._event
                if event is None:
                    event = self._event = threading.Event()
                else:
                    event.clear()
                self._wake = event.set
            event.wait()

    async def await_credit(self, loop: asyncio.AbstractEventLoop) -> int:
        """:meth:`wait_credit` for an async driver: awaits (other tasks run meanwhile)."""
        lock = self._lock
        while True:
            with lock:
                if self._cancelled:
                    return 0
                n = self._credit
                if n:
                    self._credit = 0
                    return n
                future = loop.create_future()
                self._wake = functools.partial(loop.call_soon_threadsafe, _resolve, future)
            await future


class AckedStreamCall(StreamCall):
    """A stream call whose options also had ``ack_start``."""

    __slots__ = ()

    _ack_stream = True


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class Flusher:
    """The thread that writes stream items a slow generator left pending.

    Started with the first stream. Sleeps until a stream's ``_pending`` becomes non-empty
    (:attr:`wake`, called by the driver for that item only), then every ``TICK`` writes what
    the watched streams have pending, until none has any.
    """

    def __init__(self, writer: Writer) -> None:
        self._writer = writer
        self._streams: Set[StreamCall] = set()
        self._event = threading.Event()
        #: Called by a driver when its ``_pending`` becomes non-empty.
        self.wake: Callable[[], None] = self._event.set
        self._start_lock = threading.Lock()
        self._thread: Optional[threading.Thread] = None

    def watch(self, call: StreamCall) -> None:
        """While ``call``'s generator runs (the driver :meth:`unwatch`\\ es it at the end)."""
        if self._thread is None:
            with self._start_lock:
                if self._thread is None:
                    thread = threading.Thread(
                        target=guarded(self._run), name="pyvisor-stream-flush", daemon=True
                    )
                    thread.start()
                    self._thread = thread
        self._streams.add(call)

    def unwatch(self, call: StreamCall) -> None:
        self._streams.discard(call)

    def _run(self) -> None:
        wait = self._event.wait
        clear = self._event.clear
        sleep = time.sleep
        streams = self._streams
        write_pending = self._writer.write_pending
        while True:
            wait()
            clear()  # an item that makes a list non-empty from now on sets it again
            while True:
                sleep(TICK)
                left = False
                for call in list(streams):
                    pending = call._pending
                    if pending:
                        write_pending(pending)
                        if pending:
                            left = True
                if not left and not any(call._pending for call in list(streams)):
                    break


class StreamRunner:
    """Drives a stream's generator and returns the frame of the reply that ends it (its
    items are written, or staged ahead of that reply, by then)."""

    def __init__(self, runner: Runner, writer: Writer, max_frame: int) -> None:
        self._runner = runner
        self._writer = writer
        self._max_frame = max_frame
        self._flusher = Flusher(writer)

    # ------------------------------------------------------------------ plain generators

    def run(self, call: StreamCall, pack: Pack) -> bytes:
        """Run a plain generator's stream on this thread (inline or on its pool)."""
        max_frame = self._max_frame
        if call._cancelled:
            return cancelled_frame(call, pack, max_frame)
        runner = self._runner
        if call._ack_stream:
            runner.ack_start(call, pack)
        call._phase = RUNNING
        call._started = _time()
        timing = None if call._traceparent is None else runner.span_begin(call)
        flusher = self._flusher
        flusher.watch(call)
        wake_flusher = flusher.wake
        pending = call._pending
        append = pending.append
        write_pending = self._writer.write_pending
        oob = runner.oob
        oob_types = runner.oob_types
        header = _HEADER_PACK
        call_id = call._call_id
        attempt = call._attempt
        budget = call._window
        seq = 0
        size = 0
        failure: Optional[Callable[[Optional[List[int]]], bytes]] = None
        error: Optional[BaseException] = None
        gen: Any = None
        try:
            gen = invoke(call._spec, call)
            resume = gen.__next__
            while True:
                if not budget:
                    write_pending(pending)  # everything, before the wait
                    size = 0
                    budget = call.wait_credit()
                    if not budget:
                        break  # cancelled
                if call._cancelled:
                    break
                try:
                    value = resume()
                except StopIteration:
                    break
                try:
                    if type(value) in oob_types:
                        raise _MaybeOutOfBand
                    body = pack([MSG_ITEM, call_id, attempt, seq, value])
                except Exception as e:
                    # bytes-like: out of band (None) or in band as bytes; else unencodable.
                    try:
                        maybe = item_body(oob, call, seq, value, pack, pending, e)
                    except BufferTooLarge as e2:
                        failure = self._buffer_too_large(call, seq, e2, pack)
                        break
                    except Exception as e2:
                        failure = self._unserializable(call, seq, e2, pack)
                        break
                    if maybe is None:  # sent, after the pending items
                        seq += 1
                        budget -= 1
                        size = 0
                        continue
                    body = maybe
                n = len(body)
                if n > max_frame:
                    failure = self._too_large(call, seq, n, pack)
                    break
                append(header(n) + body)
                if len(pending) == 1:
                    wake_flusher()
                seq += 1
                budget -= 1
                size += n
                if size >= FLUSH_BYTES:
                    write_pending(pending)
                    size = 0
        except BaseException as e:  # raised by the generator (or by calling the function)
            error = e
        if gen is not None:
            try:
                gen.close()  # no-op unless suspended at a yield: cancelled, or a bad item
            except BaseException as e:
                if error is None and failure is None:
                    error = e
        span = None if timing is None else runner.span_end(*timing)
        flusher.unwatch(call)
        self._writer.stage_pending(pending)  # to go out with (just before) the reply
        return self._reply(call, seq, error, failure, pack, span)

    # ------------------------------------------------------------------ async generators

    async def run_async(self, call: StreamCall, pack: Pack) -> bytes:
        """Run an async generator's stream in the current task (on the loop thread)."""
        import asyncio

        max_frame = self._max_frame
        if call._cancelled:
            return cancelled_frame(call, pack, max_frame)
        loop = asyncio.get_running_loop()
        runner = self._runner
        if call._ack_stream:
            runner.ack_start(call, pack)
        call._phase = RUNNING
        call._started = _time()
        timing = None if call._traceparent is None else runner.span_begin(call)
        flusher = self._flusher
        flusher.watch(call)
        wake_flusher = flusher.wake
        pending = call._pending
        append = pending.append
        write_pending = self._writer.write_pending
        oob = runner.oob
        oob_types = runner.oob_types
        header = _HEADER_PACK
        call_id = call._call_id
        attempt = call._attempt
        budget = call._window
        seq = 0
        size = 0
        failure: Optional[Callable[[Optional[List[int]]], bytes]] = None
        error: Optional[BaseException] = None
        agen: Any = None
        try:
            agen = invoke(call._spec, call)
            resume = agen.__anext__
            while True:
                if not budget:
                    write_pending(pending)
                    size = 0
                    budget = await call.await_credit(loop)
                    if not budget:
                        break
                if call._cancelled:
                    break
                try:
                    value = await resume()
                except StopAsyncIteration:
                    break
                try:
                    if type(value) in oob_types:
                        raise _MaybeOutOfBand
                    body = pack([MSG_ITEM, call_id, attempt, seq, value])
                except Exception as e:
                    # bytes-like: out of band (None) or in band as bytes; else unencodable.
                    try:
                        maybe = item_body(oob, call, seq, value, pack, pending, e)
                    except BufferTooLarge as e2:
                        failure = self._buffer_too_large(call, seq, e2, pack)
                        break
                    except Exception as e2:
                        failure = self._unserializable(call, seq, e2, pack)
                        break
                    if maybe is None:  # sent, after the pending items
                        seq += 1
                        budget -= 1
                        size = 0
                        continue
                    body = maybe
                n = len(body)
                if n > max_frame:
                    failure = self._too_large(call, seq, n, pack)
                    break
                append(header(n) + body)
                if len(pending) == 1:
                    wake_flusher()
                seq += 1
                budget -= 1
                size += n
                if size >= FLUSH_BYTES:
                    write_pending(pending)
                    size = 0
        except BaseException as e:  # the generator raised, or the task was cancelled
            error = e
            if isinstance(e, asyncio.CancelledError) and call._cancelled:
                error = None  # the reply says `cancelled`
        if agen is not None:
            try:
                await agen.aclose()
            except BaseException as e:
                if error is None and failure is None and not (
                    call._cancelled and isinstance(e, asyncio.CancelledError)
                ):
                    error = e
        span = None if timing is None else runner.span_end(*timing)
        flusher.unwatch(call)
        self._writer.stage_pending(pending)
        return self._reply(call, seq, error, failure, pack, span)

    # ------------------------------------------------------------------ the end

    def _reply(
        self,
        call: StreamCall,
        count: int,
        error: Optional[BaseException],
        failure: Optional[Callable[[Optional[List[int]]], bytes]],
        pack: Pack,
        span: Optional[List[int]],
    ) -> bytes:
        max_frame = self._max_frame
        if error is not None:
            if isinstance(error, (SystemExit, KeyboardInterrupt)):
                self._runner.user_exit(error)
            return exception_frame(call, error, pack, max_frame, span)
        if failure is not None:
            return failure(span)
        if call._cancelled:
            return error_frame(
                call._call_id,
                call._attempt,
                KIND_CANCELLED,
                CANCELLED_TYPE,
                "the stream was cancelled",
                pack,
                max_frame,
                span=span,
            )
        return result_frame(call, count, pack, max_frame, span)

    def _unserializable(
        self, call: StreamCall, seq: int, exc: Exception, pack: Pack
    ) -> Callable[[Optional[List[int]]], bytes]:
        message = f"item {seq} of the stream {call._spec.name!r} cannot be encoded: {exc}"
        return functools.partial(
            self._error, call, KIND_UNSERIALIZABLE, qualified_name(type(exc)), message, pack
        )

    def _buffer_too_large(
        self, call: StreamCall, seq: int, exc: Exception, pack: Pack
    ) -> Callable[[Optional[List[int]]], bytes]:
        message = f"item {seq} of the stream {call._spec.name!r} is {exc}"
        return functools.partial(
            self._error, call, KIND_REPLY_TOO_LARGE, "ValueError", message, pack
        )

    def _too_large(
        self, call: StreamCall, seq: int, n: int, pack: Pack
    ) -> Callable[[Optional[List[int]]], bytes]:
        message = (
            f"item {seq} of the stream {call._spec.name!r} is {n} bytes, over the maximum "
            f"frame size of {self._max_frame} bytes"
        )
        return functools.partial(
            self._error, call, KIND_REPLY_TOO_LARGE, "ValueError", message, pack
        )

    def _error(
        self,
        call: StreamCall,
        kind: str,
        type_name: str,
        message: str,
        pack: Pack,
        span: Optional[List[int]],
    ) -> bytes:
        return error_frame(
            call._call_id, call._attempt, kind, type_name, message, pack, self._max_frame,
            span=span,
        )
