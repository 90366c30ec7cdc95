"""Executors: where and how a call's function runs, and its reply written.

Owns the three execution kinds and the one place that tells them apart
(:func:`make_executors`):

- :class:`InlineExecutor`: plain functions, in arrival order, on the serving thread that read
  their frames (its queue is filled by dispatch and drained by ``_reader``'s serving threads;
  replies ready together are staged and go out in one write);
- :class:`AsyncExecutor`: ``async def`` functions, as tasks on one asyncio loop thread;
- :class:`ThreadsExecutor`: a plain function exposed with ``threads=N``, on its own pool.

Each executor takes a :class:`~._state.Call` through ``submit`` (a plain attribute, a C-level
callable where possible: the route table keeps it), answers ``cancel`` for a call that has not
started, and removes a call from the shared state once its reply is written. :class:`Runner`
runs one function and builds its reply frame (the call-mode dispatch, the span timing of a
traced call, ``SystemExit`` in user code); it is shared by all kinds. A stream call (a
generator function's) runs where a call to its function would, driven by ``_streams``'
:class:`~._streams.StreamRunner` instead of :class:`Runner`: inline on the serving thread
(which waits there for credit; the sentinel reads meanwhile), on its pool, or as a task.

Does not parse frames, decide whether a call is admitted, or own the socket's read side.
"""

from __future__ import annotations

import functools
import random
import threading
import time
import traceback
from collections import deque
from typing import TYPE_CHECKING, Any, Callable, Deque, Dict, List, NoReturn, Optional, Tuple

from . import _otel
from ._config import EXIT_INTERNAL
from ._exits import exit_status, guarded, hard_exit, parent_gone, say
from ._framing import HEADER, MSG_REPLY, MSG_STARTED, new_packer
from ._oob import BUFFER_TYPES, NO_TYPES, Outbound
from ._registry import (
    ASYNC,
    CALL_CTX_ONLY,
    CALL_PAYLOAD,
    CALL_PAYLOAD_CTX,
    CALL_PAYLOAD_CTX_POS,
    INLINE,
    THREADS,
    FunctionSpec,
    invoke,
)
from ._replies import (
    FLUSH_BYTES,
    TICK,
    Pack,
    Writer,
    cancelled_frame,
    exception_frame,
    result_frame,
)
from ._state import RUNNING, Call, WorkerState
from ._streams import StreamRunner

if TYPE_CHECKING:
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

__all__ = [
    "TICK",
    "Runner",
    "Executor",
    "InlineExecutor",
    "AsyncExecutor",
    "ThreadsExecutor",
    "make_executors",
    "invoke",
]

_HEADER_PACK = HEADER.pack
_getrandbits = random.getrandbits
_time = time.time
_time_ns = time.time_ns
_monotonic = time.monotonic


def _no_streams(call: Any, pack: Pack) -> bytes:
    raise RuntimeError("no stream runner")


class Runner:
    """Runs one function and returns its reply frame.

    A call without a ``traceparent`` takes the fast path and its reply's ``span`` is ``nil``.
    For a call with one, a random non-zero span id is drawn and ``time.time_ns()`` taken just
    before and just after the function, and ``span`` is ``[span_id, start_ns, end_ns]`` (also
    in error replies produced after the function ran). With tracing active (``_otel``), a
    span with that id is current while the function runs (``Tracing.enter``), so the spans
    user code starts are its children.
    """

    def __init__(
        self,
        max_frame: int,
        tracing: Optional[_otel.Tracing],
        writer: Writer,
        oob: Optional[Outbound] = None,
    ) -> None:
        self._max_frame = max_frame
        self._tracing = tracing
        self._writer = writer
        #: Out-of-band results (capability ``oob``), or None; ``oob_types`` the result types
        #: that go to it before any encoding (none without it).
        self.oob = oob
        self.oob_types = NO_TYPES if oob is None else BUFFER_TYPES
        #: Runs a stream call (``StreamRunner.run``; set by :func:`make_executors`).
        self.run_stream: Callable[[Any, Pack], bytes] = _no_streams

    def ack_start(self, call: Call, pack: Pack) -> None:
        """Right before a call whose options asked for it runs its function: write ``started``
        (after anything staged, through the locked writer), so that once the parent has read
        a dead worker's socket to its end it knows whether the function had started."""
        body = pack([MSG_STARTED, call._call_id, call._attempt])
        self._writer.write(_HEADER_PACK(len(body)) + body)

    def execute(self, call: Call, pack: Pack) -> bytes:
        """Run a plain function (inline or on its pool); returns the reply frame (``b""`` when
        a bytes-like result was sent out of band already: capability ``oob``)."""
        if call._cancelled:
            return cancelled_frame(call, pack, self._max_frame)
        if call._ack_start:  # (true for a stream call too: a plain call pays nothing for it)
            if call._stream:
                return self.run_stream(call, pack)  # type: ignore[arg-type]
            self.ack_start(call, pack)
        spec = call._spec
        call._phase = RUNNING
        call._started = _time()
        traceparent = call._traceparent
        if traceparent is not None:  # (span_begin, inlined: the per-call path of traced calls)
            span_id = _getrandbits(64) or 1
            tracing = self._tracing
            token = None if tracing is None else tracing.enter(call, span_id)
            start = _time_ns()
        try:
            # The call-mode dispatch of ``invoke``, inlined for the common modes: a call saved,
            # and a traceback shows the user's frames only, past the one adapter frame that
            # ``exception_frame`` drops.
            mode = spec.call_mode
            if mode == CALL_PAYLOAD:
                result = spec.fn(call._payload)
            elif mode == CALL_PAYLOAD_CTX:
                result = spec.fn(call._payload, ctx=call)
            else:
                result = invoke(spec, call)
        except BaseException as e:
            span = None if traceparent is None else self.span_end(span_id, token, start)
            if isinstance(e, (SystemExit, KeyboardInterrupt)):
                self.user_exit(e)
            return exception_frame(call, e, pack, self._max_frame, span)
        if traceparent is None:
            span = None
        else:
            span = [span_id, start, _time_ns()]
            if token is not None:
                tracing.exit(token)  # type: ignore[union-attr]
        if type(result) in self.oob_types:  # maybe out of band (sent there, b"" returned)
            return result_frame(call, result, pack, self._max_frame, span, self.oob)
        # (result_frame, inlined for the common case)
        try:
            body = pack([MSG_REPLY, call._call_id, call._attempt, True, span, result])
        except Exception:
            return result_frame(call, result, pack, self._max_frame, span, self.oob)
        n = len(body)
        if n > self._max_frame:
            return result_frame(call, result, pack, self._max_frame, span, self.oob)
        return _HEADER_PACK(n) + body

    def span_begin(self, call: Call) -> Tuple[int, Any, int]:
        """Just before a traced call's function runs: its span id, the context token (tracing
        active only) and the start time."""
        span_id = _getrandbits(64) or 1
        tracing = self._tracing
        token = None if tracing is None else tracing.enter(call, span_id)
        return span_id, token, _time_ns()

    def span_end(self, span_id: int, token: Any, start: int) -> List[int]:
        """Just after it returned or raised: the reply's ``[span_id, start_ns, end_ns]``."""
        end = _time_ns()
        if token is not None:
            self._tracing.exit(token)  # type: ignore[union-attr]
        return [span_id, start, end]

    def user_exit(self, exc: BaseException) -> NoReturn:
        """User code raised SystemExit or KeyboardInterrupt: the process ends, as asked (the
        replies staged so far go out first)."""
        status = exit_status(exc)
        self._writer.flush()
        hard_exit(status)


class Executor:
    """Runs the calls of the functions routed to it (see :func:`make_executors`)."""

    #: Take a call (from the thread that dispatched it); never blocks.
    submit: Callable[[Call], object]

    def start(self) -> None:
        """Before the first ``submit`` (its ``submit`` may change)."""

    def cancel(self, call: Call) -> bool:
        """``call._cancelled`` is set. True if the call had not started and now never will:
        the caller replies ``cancelled`` and forgets it. False if it runs or ran (it sees
        ``ctx.cancelled``, or its task is cancelled) and replies itself."""
        return False

    def stop(self) -> None:
        """At the end of ``run_worker()``; calls still running are abandoned."""


class InlineExecutor(Executor):
    """Plain functions, one at a time in arrival order, on a serving thread.

    Shared with ``_reader`` (under :attr:`lock`): :attr:`queue` of calls not started;
    :attr:`executing` is True while a serving thread drains it (set by that thread when it
    stops reading, cleared by :meth:`drain` when the queue is empty) and
    :attr:`session_start` when that run of calls began (the sentinel takes over reading once
    it is older than ``TICK``).
    """

    def __init__(
        self, runner: Runner, streams: StreamRunner, writer: Writer, state: WorkerState
    ) -> None:
        self.queue: Deque[Call] = deque()
        self.lock = threading.Lock()
        self.executing = False
        self.session_start = 0.0
        self.submit = self.queue.append
        self._execute = runner.execute
        self._writer = writer
        self._calls = state.calls

    def cancel(self, call: Call) -> bool:
        with self.lock:
            try:
                self.queue.remove(call)
            except ValueError:
                return False  # running (it sees ctx.cancelled) or just finished
        return True

    def drain(self, pack: Pack) -> None:
        """Execute queued calls in order until the queue is empty.

        Replies go out through the writer (its fields used directly, under its lock): while
        more calls are queued and this run of calls is fast, a reply is staged to go out with
        the next one; once the run has become slow, every reply goes out as soon as it is
        ready.
        """
        queue = self.queue
        lock = self.lock
        calls = self._calls
        execute = self._execute
        writer = self._writer
        wlock = writer.lock
        sendall = writer.sendall
        while True:
            with lock:
                if not queue:
                    self.executing = False
                    break
                call = queue.popleft()
            data = execute(call, pack)  # (a stream call too: see Runner.execute)
            with wlock:
                writer.served += 1
                staged = writer.staged
                if (
                    queue
                    and _monotonic() - self.session_start < TICK
                    and writer.staged_bytes < FLUSH_BYTES
                ):
                    staged.append(data)
                    writer.staged_bytes += len(data)
                else:
                    if staged:
                        staged.append(data)
                        data = b"".join(staged)
                        staged.clear()
                        writer.staged_bytes = 0
                    try:
                        sendall(data)
                    except OSError:
                        parent_gone()
            calls.pop(call._call_id, None)
        if writer.staged:
            writer.flush()


class ThreadsExecutor(Executor):
    """One plain function exposed with ``threads=N``, on its own pool of N threads."""

    def __init__(
        self,
        spec: FunctionSpec,
        runner: Runner,
        streams: StreamRunner,
        writer: Writer,
        state: WorkerState,
    ):
        self._spec = spec
        self._execute: Callable[[Any, Pack], bytes] = streams.run if spec.stream else runner.execute
        self._writer = writer
        self._calls = state.calls
        self._pool: Optional[ThreadPoolExecutor] = None
        self._tls = threading.local()

    def start(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self._pool = ThreadPoolExecutor(
            max_workers=self._spec.threads, thread_name_prefix=f"pyvisor-{self._spec.name}"
        )

    def submit(self, call: Call) -> None:
        call._handle = self._pool.submit(self._run, call)  # type: ignore[union-attr]

    def cancel(self, call: Call) -> bool:
        handle = call._handle
        return handle is not None and bool(handle.cancel())  # not started on its pool yet

    def stop(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)

    def _run(self, call: Call) -> None:  # on a pool thread
        tls = self._tls
        try:
            pack = tls.pack
        except AttributeError:
            pack = tls.pack = new_packer()
        try:
            self._writer.write(self._execute(call, pack), 1)
            self._calls.pop(call._call_id, None)
        except BaseException:
            say("internal error in a threaded call")
            traceback.print_exc()
            hard_exit(EXIT_INTERNAL)


class AsyncExecutor(Executor):
    """``async def`` functions, each call a task on the worker's one asyncio loop thread.

    A traced call is timed as in :meth:`Runner.execute`; with tracing active, its span is
    attached in the task's own context, so the function's coroutine (and the tasks it
    creates) see it as current. Replies finished in one loop iteration go out in one write.
    """

    def __init__(
        self,
        runner: Runner,
        streams: StreamRunner,
        writer: Writer,
        state: WorkerState,
        max_frame: int,
    ):
        self._runner = runner
        self._streams = streams
        self._writer = writer
        self._calls = state.calls
        self._max_frame = max_frame
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._pack: Pack = new_packer()  # used on the loop thread only
        self._out: List[Tuple[Call, bytes]] = []

    def start(self) -> None:
        import asyncio

        loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(ready.set)
            loop.run_forever()

        threading.Thread(target=guarded(run), name="pyvisor-asyncio", daemon=True).start()
        ready.wait()
        self._loop = loop
        # A C-level callable: an async call costs the dispatching thread no Python frame.
        self.submit = functools.partial(
            loop.call_soon_threadsafe, self._start_task  # type: ignore[arg-type]
        )

    def cancel(self, call: Call) -> bool:
        self._loop.call_soon_threadsafe(self._cancel_task, call)  # type: ignore[union-attr]
        return False  # a task that has not started replies `cancelled` itself when it starts

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)

    def _start_task(self, call: Call) -> None:  # on the loop thread
        coro = self._run_stream(call) if call._stream else self._run(call)
        call._handle = self._loop.create_task(coro)  # type: ignore[union-attr]

    def _cancel_task(self, call: Call) -> None:  # on the loop thread
        if call._phase is RUNNING and call._handle is not None:
            call._handle.cancel()

    async def _run(self, call: Call) -> None:  # the call's task, on the loop thread
        pack = self._pack
        if call._cancelled:
            data = cancelled_frame(call, pack, self._max_frame)
        else:
            runner = self._runner
            if call._ack_start:
                runner.ack_start(call, pack)
            call._phase = RUNNING
            call._started = _time()
            timing = None if call._traceparent is None else runner.span_begin(call)
            try:
                result = await invoke(call._spec, call)
            except BaseException as e:
                span = None if timing is None else runner.span_end(*timing)
                if isinstance(e, (SystemExit, KeyboardInterrupt)):
                    runner.user_exit(e)
                if _is_cancelled(e):
                    call._cancelled = True
                data = exception_frame(call, e, pack, self._max_frame, span)
            else:
                span = None if timing is None else runner.span_end(*timing)
                data = result_frame(call, result, pack, self._max_frame, span, runner.oob)
        self._done(call, data)

    async def _run_stream(self, call: Call) -> None:  # a stream's task, on the loop thread
        self._done(call, await self._streams.run_async(call, self._pack))  # type: ignore[arg-type]

    def _done(self, call: Call, data: bytes) -> None:  # on the loop thread
        out = self._out
        out.append((call, data))
        if len(out) == 1:  # replies finished in this loop iteration go out in one write
            self._loop.call_soon(self._flush)  # type: ignore[union-attr]

    def _flush(self) -> None:  # on the loop thread
        out = self._out
        self._out = []
        if not out:
            return
        self._writer.write(b"".join(data for _, data in out), len(out))
        calls = self._calls
        for call, _ in out:
            calls.pop(call._call_id, None)


def _is_cancelled(exc: BaseException) -> bool:
    import asyncio

    return isinstance(exc, asyncio.CancelledError)


def make_executors(
    functions: Dict[str, FunctionSpec],
    runner: Runner,
    writer: Writer,
    state: WorkerState,
    max_frame: int,
) -> Tuple[InlineExecutor, Dict[str, Executor]]:
    """The executor of every function: the one place where execution kinds are told apart.

    Returns the inline executor (which the serving threads drain) and the executor by
    function name (one asyncio executor for all ``async def`` functions, one pool per
    ``threads=N`` function). None is started yet.
    """
    streams = StreamRunner(runner, writer, max_frame)
    runner.run_stream = streams.run  # the inline drain hands stream calls to Runner.execute
    inline = InlineExecutor(runner, streams, writer, state)
    shared_async: Optional[AsyncExecutor] = None
    by_name: Dict[str, Executor] = {}
    for name, spec in functions.items():
        kind = spec.kind
        executor: Executor
        if kind == INLINE:
            executor = inline
        elif kind == ASYNC:
            if shared_async is None:
                shared_async = AsyncExecutor(runner, streams, writer, state, max_frame)
            executor = shared_async
        elif kind == THREADS:
            executor = ThreadsExecutor(spec, runner, streams, writer, state)
        else:
            raise ValueError(f"{name!r}: unknown execution kind {kind!r}")
        by_name[name] = executor
    return inline, by_name
