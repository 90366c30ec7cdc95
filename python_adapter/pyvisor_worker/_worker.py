"""The worker runtime: reads calls from the parent's socket, runs them, writes replies and beats.

Threads (all but the main thread are daemons):

- two **serving threads** share the socket's read side through ``_read_lock`` (lazy
  leader/follower). The holder reads frames and dispatches them. A plain (inline) call is run
  by the thread that read it: it releases ``_read_lock`` and executes the queued plain calls in
  arrival order, then tries to read again. The other thread is a *sentinel* that never blocks
  on ``_read_lock``: it polls every ``TICK`` and takes the socket over only when plain calls
  have been executing for longer than ``TICK``. A fast call therefore costs no thread switch,
  and while a slow one runs, ``cancel``, ``ping`` and async/threaded calls are still seen
  within a few milliseconds. An executor that finds ``_read_lock`` taken becomes the sentinel.
- the **control thread** sends beats and carries out a graceful shutdown (``shutdown`` message
  or SIGTERM, delivered through a wake-up pipe).
- an **asyncio loop thread** (only when an ``async def`` function is exposed).
- one ``ThreadPoolExecutor`` per function exposed with ``threads=N``.
- the **main thread** installs the SIGTERM handler and waits for the end.

Replies are ``[2, id, attempt, ok, span, value_or_error]``. A call without a ``traceparent``
takes the fast path and its ``span`` is ``nil``. For a call with one (``_execute_traced``,
``_run_async``), the executing side draws a random non-zero span id and takes
``time.time_ns()`` just before and just after the function, and ``span`` is
``[span_id, start_ns, end_ns]`` (also in error replies produced after the function ran); the
parent records the function's span from it. Nothing from OpenTelemetry is involved in that.
With tracing active in the worker as well (``_otel``: the ``otel`` extra and an OTLP
endpoint), a span with that id is current on the executing thread (or in the asyncio task)
while the function runs (``Tracing.enter``: its span context is built only if user code asks),
so the spans user code starts are its children;
the worker exports only those, and every exit path flushes them first, bounded.

All writes go through one lock around ``sendall``; replies that are ready together are joined
into one write.
"""

from __future__ import annotations

import os
import platform
import random
import select
import signal
import socket
import sys
import threading
import time
import traceback
from collections import deque
from typing import TYPE_CHECKING, Any, Callable, Deque, Dict, List, NoReturn, Optional, Tuple

from ._config import (
    EXIT_INTERNAL,
    EXIT_OK,
    EXIT_PROTOCOL,
    PROTOCOL_VERSION,
    StartError,
    WorkerConfig,
    current_config,
    exit_bad_start,
)
from . import _otel
from ._context import Context
from ._framing import (
    HEADER,
    KIND_CANCELLED,
    KIND_EXCEPTION,
    KIND_INTERNAL,
    KIND_REPLY_TOO_LARGE,
    KIND_UNKNOWN_FUNCTION,
    KIND_UNSERIALIZABLE,
    MSG_BEAT,
    MSG_CALL,
    MSG_CANCEL,
    MSG_HELLO,
    MSG_PING,
    MSG_PONG,
    MSG_REPLY,
    MSG_SHUTDOWN,
    error_map,
    new_packer,
    qualified_name,
    unpack_body,
)
from ._registry import (
    ASYNC,
    CALL_CTX_ONLY,
    CALL_NOTHING,
    CALL_PAYLOAD,
    CALL_PAYLOAD_CTX,
    CALL_PAYLOAD_CTX_POS,
    INLINE,
    THREADS,
    FunctionSpec,
    registered,
)
from ._version import __version__

if TYPE_CHECKING:
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

__all__ = ["run_worker"]

Pack = Callable[[Any], bytes]

#: Sentinel poll period, and how long plain calls may execute before it takes over reading.
TICK = 0.005
#: Grace for SIGTERM (the parent's ``shutdown`` message carries its own).
DEFAULT_GRACE = 5.0
#: Read buffer; grows for a larger frame and shrinks back once that frame is consumed.
INITIAL_BUFFER = 256 * 1024
#: Staged replies are written out at the latest once they reach this many bytes.
FLUSH_BYTES = 1 << 20

QUEUED = "queued"
RUNNING = "running"

_WAKE_SHUTDOWN = b"\x00"
_SIGTERM_BYTE = int(signal.SIGTERM)
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_HEADER_PACK = HEADER.pack
_getrandbits = random.getrandbits
_time_ns = time.time_ns


def _rss() -> int:
    """Resident set size in bytes, from ``/proc/self/statm``."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE_SIZE
    except (OSError, ValueError, IndexError):
        return 0


class _Call(Context):
    """A call the worker holds; it is also the ``ctx`` its function receives."""

    __slots__ = ("_spec", "_payload", "_phase", "_started", "_handle")

    def __init__(
        self,
        call_id: int,
        attempt: int,
        spec: FunctionSpec,
        payload: Any,
        deadline_ms: Optional[int],
        traceparent: Optional[str],
        tracestate: Optional[str],
    ) -> None:
        self._call_id = call_id
        self._attempt = attempt
        self._deadline_ms = deadline_ms
        self._traceparent = traceparent
        self._tracestate = tracestate
        self._cancelled = False
        self._spec = spec
        self._payload = payload
        self._phase = QUEUED
        self._started = time.time()
        self._handle: Any = None


def _invoke(spec: FunctionSpec, call: _Call) -> Any:
    mode = spec.call_mode
    if mode == CALL_PAYLOAD:
        return spec.fn(call._payload)
    if mode == CALL_PAYLOAD_CTX:
        return spec.fn(call._payload, ctx=call)
    if mode == CALL_PAYLOAD_CTX_POS:
        return spec.fn(call._payload, call)
    if mode == CALL_CTX_ONLY:
        return spec.fn(ctx=call)
    return spec.fn()


def _is_cancelled_error(exc: BaseException) -> bool:
    asyncio = sys.modules.get("asyncio")
    return asyncio is not None and isinstance(exc, asyncio.CancelledError)


def _flush_stdio() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except Exception:
            pass


def _hard_exit(status: int) -> NoReturn:
    tracing = _otel.active()
    if tracing is not None:
        tracing.shutdown()  # export the last spans first (bounded)
    _flush_stdio()
    os._exit(status)


def _say(message: str) -> None:
    try:
        sys.stderr.write(f"pyvisor_worker: {message}\n")
        sys.stderr.flush()
    except Exception:
        pass


class _Worker:
    def __init__(
        self,
        config: WorkerConfig,
        functions: Dict[str, FunctionSpec],
        tracing: Optional[_otel.Tracing] = None,
    ) -> None:
        sock = socket.socket(fileno=config.fd)
        sock.setblocking(True)
        os.set_inheritable(sock.fileno(), False)  # user subprocesses must not hold it open
        self._sock = sock
        self._sendall = sock.sendall
        self._max_frame = config.max_frame
        self._beat_interval = config.beat_interval_ms / 1000.0
        self._tracing = tracing

        health = FunctionSpec("health", self._health, True, INLINE, 0, CALL_NOTHING, None)
        self._functions: Dict[str, FunctionSpec] = dict(functions)
        self._functions["health"] = health
        from .chaos import _arm_from_parent

        self._functions["__pyvisor_chaos_arm"] = FunctionSpec(
            "__pyvisor_chaos_arm", _arm_from_parent, False, INLINE, 0, CALL_PAYLOAD, None
        )
        # What hello and the unknown-function hint show: the internal ``__pyvisor_*`` hooks stay
        # callable (the parent's chaos API uses them) but are not the user's functions.
        self._names: List[str] = sorted(n for n in self._functions if not n.startswith("__pyvisor"))

        # Writer: one lock around sendall; staged replies go out with the next write.
        self._wlock = threading.Lock()
        self._staged: List[bytes] = []
        self._staged_bytes = 0
        self._served = 0
        self._beat_seq = 0

        # Reading side (owned by the holder of _read_lock).
        self._read_lock = threading.Lock()
        self._buf = bytearray(INITIAL_BUFFER)
        self._view = memoryview(self._buf)
        self._start = 0
        self._end = 0

        # Plain calls: FIFO, executed by at most one serving thread at a time.
        self._plain_lock = threading.Lock()
        self._plain: Deque[_Call] = deque()
        self._executing = False
        self._session_start = 0.0

        # Every call the worker holds, by id (for cancel and the beat's in_progress).
        self._calls: Dict[int, _Call] = {}

        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._loop_pack: Optional[Pack] = None
        self._async_out: List[Tuple[_Call, bytes]] = []
        self._executors: Dict[str, ThreadPoolExecutor] = {}
        self._tls = threading.local()

        # Lifecycle.
        self._accepting = True
        self._stop_lock = threading.Lock()
        self._stop_deadline: Optional[float] = None
        self._finished = threading.Event()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)

    # ------------------------------------------------------------------ start and end

    def serve(self) -> None:
        specs = list(self._functions.values())
        if any(s.kind == ASYNC for s in specs):
            self._start_loop()
        if any(s.kind == THREADS for s in specs):
            from concurrent.futures import ThreadPoolExecutor

            for s in specs:
                if s.kind == THREADS:
                    self._executors[s.name] = ThreadPoolExecutor(
                        max_workers=s.threads,
                        thread_name_prefix=f"pyvisor-{s.name}",
                    )

        in_main = threading.current_thread() is threading.main_thread()
        old_wakeup_fd = -1
        old_term: Any = None
        if in_main:
            # The C-level handler writes the signal number to the wake-up pipe, so SIGTERM is
            # seen by the control thread even while the main thread is busy.
            old_wakeup_fd = signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
            if signal.getsignal(signal.SIGTERM) is not signal.SIG_IGN:
                # (A script that chose to ignore SIGTERM keeps ignoring it.)
                old_term = signal.signal(signal.SIGTERM, _on_sigterm)
        else:
            _say("run_worker() is not running in the main thread: SIGTERM is not handled")

        pack = new_packer()
        hello = {
            "protocol": PROTOCOL_VERSION,
            "pid": os.getpid(),
            "adapter": __version__,
            "python": platform.python_version(),
            "functions": [self._functions[name].describe() for name in self._names],
        }
        body = pack([MSG_HELLO, hello])
        if len(body) > self._max_frame:
            self._protocol_error(
                f"the hello message ({len(body)} bytes) does not fit the maximum frame size "
                f"of {self._max_frame} bytes"
            )
        self._write(self._frame(body))

        for target, name in (
            (self._control, "pyvisor-control"),
            (self._serve, "pyvisor-serve-1"),
            (self._serve, "pyvisor-serve-2"),
        ):
            threading.Thread(target=self._guarded(target), name=name, daemon=True).start()

        while not self._finished.wait(1.0):
            pass

        if in_main:
            if old_term is not None:
                signal.signal(signal.SIGTERM, old_term)
            signal.set_wakeup_fd(old_wakeup_fd)
        for executor in self._executors.values():
            executor.shutdown(wait=False)
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
        _flush_stdio()

    def _guarded(self, target: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                target()
            except BaseException:
                # A bug in the adapter: say so and die rather than hang without a reader.
                try:
                    sys.stderr.write("pyvisor_worker: internal error\n")
                    traceback.print_exc()
                except Exception:
                    pass
                _hard_exit(EXIT_INTERNAL)

        return run

    def _begin_shutdown(self, grace: float) -> None:
        with self._stop_lock:
            self._accepting = False
            deadline = time.monotonic() + max(0.0, grace)
            if self._stop_deadline is None or deadline < self._stop_deadline:
                self._stop_deadline = deadline
        self._wake()

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, _WAKE_SHUTDOWN)
        except OSError:  # pipe full: the control thread is awake anyway
            pass

    def _parent_gone(self) -> NoReturn:
        _hard_exit(EXIT_OK)

    def _protocol_error(self, message: str) -> NoReturn:
        _say(f"protocol error: {message}")
        _hard_exit(EXIT_PROTOCOL)

    def _user_exit(self, exc: BaseException) -> NoReturn:
        """User code raised SystemExit or KeyboardInterrupt: the process ends, as asked."""
        if isinstance(exc, SystemExit):
            code = exc.code
            if code is None:
                status = 0
            elif isinstance(code, int):
                status = code
            else:
                _say(str(code))
                status = 1
        else:
            try:
                traceback.print_exception(type(exc), exc, exc.__traceback__)
            except Exception:
                pass
            status = 130
        self._flush()
        _hard_exit(status)

    # ------------------------------------------------------------------ writing

    def _frame(self, body: bytes) -> bytes:
        return _HEADER_PACK(len(body)) + body

    def _write(self, data: bytes, replies: int = 0) -> None:
        """Write ``data`` (one or more frames), after anything staged."""
        with self._wlock:
            self._served += replies
            staged = self._staged
            if staged:
                staged.append(data)
                data = b"".join(staged)
                staged.clear()
                self._staged_bytes = 0
            try:
                self._sendall(data)
            except OSError:
                self._parent_gone()

    def _send_reply(self, data: bytes) -> None:
        self._write(data, 1)

    def _flush(self) -> None:
        with self._wlock:
            staged = self._staged
            if not staged:
                return
            data = staged[0] if len(staged) == 1 else b"".join(staged)
            staged.clear()
            self._staged_bytes = 0
            try:
                self._sendall(data)
            except OSError:
                self._parent_gone()

    def _try_flush(self) -> None:
        """Flush staged replies unless a write is in progress.

        Every holder of the write lock sends what is staged, so if the lock is busy the
        staged replies go out with that write (and the sentinel never waits on a blocked
        ``sendall`` instead of taking over the socket).
        """
        if self._staged and self._wlock.acquire(False):
            try:
                staged = self._staged
                if staged:
                    data = b"".join(staged)
                    staged.clear()
                    self._staged_bytes = 0
                    try:
                        self._sendall(data)
                    except OSError:
                        self._parent_gone()
            finally:
                self._wlock.release()

    # ------------------------------------------------------------------ replies

    def _error_frame(
        self,
        call_id: int,
        attempt: int,
        kind: str,
        type_name: str,
        message: str,
        pack: Pack,
        tb: Optional[str] = None,
        functions: Optional[List[str]] = None,
        span: Optional[List[int]] = None,
    ) -> bytes:
        err = error_map(kind, type_name, message, tb, functions)
        reply = [MSG_REPLY, call_id, attempt, False, span, err]
        try:
            body = pack(reply)
        except Exception:  # e.g. a message with lone surrogates
            err["message"] = message.encode("utf-8", "replace").decode("utf-8")
            err["traceback"] = None if tb is None else tb.encode("utf-8", "replace").decode("utf-8")
            body = pack(reply)
        if len(body) > self._max_frame:
            # Only a huge message or traceback gets here: keep their ends, which matter most.
            room = max(64, self._max_frame // 4)
            err["message"] = message[-room:]
            err["traceback"] = None if tb is None else tb[-room:]
            body = pack(reply)
            if len(body) > self._max_frame:
                err["message"] = message[:64]
                err["traceback"] = None
                body = pack(reply)
        return _HEADER_PACK(len(body)) + body

    def _result_frame(
        self, call: _Call, result: Any, pack: Pack, span: Optional[List[int]] = None
    ) -> bytes:
        try:
            body = pack([MSG_REPLY, call._call_id, call._attempt, True, span, result])
        except Exception as e:
            return self._error_frame(
                call._call_id,
                call._attempt,
                KIND_UNSERIALIZABLE,
                qualified_name(type(e)),
                f"the return value of {call._spec.name!r} cannot be encoded: {e}",
                pack,
                span=span,
            )
        n = len(body)
        if n > self._max_frame:
            return self._error_frame(
                call._call_id,
                call._attempt,
                KIND_REPLY_TOO_LARGE,
                "ValueError",
                f"the reply of {call._spec.name!r} is {n} bytes, over the maximum frame size "
                f"of {self._max_frame} bytes",
                pack,
                span=span,
            )
        return _HEADER_PACK(n) + body

    def _exception_frame(
        self, call: _Call, exc: BaseException, pack: Pack, span: Optional[List[int]] = None
    ) -> bytes:
        tb = exc.__traceback__
        if tb is not None:
            tb = tb.tb_next  # the adapter's own frame
        try:
            text: Optional[str] = "".join(traceback.format_exception(type(exc), exc, tb))
        except Exception:
            text = None
        try:
            message = str(exc)
        except Exception:
            message = f"<unprintable {type(exc).__name__}>"
        kind = KIND_CANCELLED if call._cancelled and _is_cancelled_error(exc) else KIND_EXCEPTION
        return self._error_frame(
            call._call_id,
            call._attempt,
            kind,
            qualified_name(type(exc)),
            message,
            pack,
            text,
            span=span,
        )

    def _cancelled_frame(self, call: _Call, pack: Pack) -> bytes:
        """The reply to a call cancelled before its function ran (no span: it never ran)."""
        return self._error_frame(
            call._call_id,
            call._attempt,
            KIND_CANCELLED,
            "asyncio.exceptions.CancelledError",
            "the call was cancelled",
            pack,
        )

    def _execute(self, call: _Call, pack: Pack) -> bytes:
        """Run a plain function (inline or on its thread pool); returns the reply frame."""
        if call._cancelled:
            return self._cancelled_frame(call, pack)
        if call._traceparent is not None:
            return self._execute_traced(call, pack)
        spec = call._spec
        call._phase = RUNNING
        call._started = time.time()
        try:
            mode = spec.call_mode
            if mode == CALL_PAYLOAD:
                result = spec.fn(call._payload)
            elif mode == CALL_PAYLOAD_CTX:
                result = spec.fn(call._payload, ctx=call)
            else:
                result = _invoke(spec, call)
        except (SystemExit, KeyboardInterrupt) as e:
            self._user_exit(e)
        except BaseException as e:
            return self._exception_frame(call, e, pack)
        # (_result_frame, inlined for the common case)
        try:
            body = pack([MSG_REPLY, call._call_id, call._attempt, True, None, result])
        except Exception:
            return self._result_frame(call, result, pack)
        n = len(body)
        if n > self._max_frame:
            return self._result_frame(call, result, pack)
        return _HEADER_PACK(n) + body

    def _execute_traced(self, call: _Call, pack: Pack) -> bytes:
        """``_execute`` for a call with a ``traceparent``: the function is timed and the reply
        carries ``[span_id, start_ns, end_ns]``; with tracing active, a span with that id is
        current on this thread while it runs. (``_span_begin``/``_span_end``, inlined: this is
        the per-call path of every traced call.)"""
        call._phase = RUNNING
        call._started = time.time()
        spec = call._spec
        span_id = _getrandbits(64) or 1
        tracing = self._tracing
        token = None if tracing is None else tracing.enter(call, span_id)
        start = _time_ns()
        try:
            # The dispatch is inlined (as in ``_execute``): a traceback then shows the user's
            # frames only, past the one adapter frame that ``_exception_frame`` drops.
            mode = spec.call_mode
            if mode == CALL_PAYLOAD:
                result = spec.fn(call._payload)
            elif mode == CALL_PAYLOAD_CTX:
                result = spec.fn(call._payload, ctx=call)
            else:
                result = _invoke(spec, call)
        except BaseException as e:
            span = self._span_end((span_id, token, start))
            if isinstance(e, (SystemExit, KeyboardInterrupt)):
                self._user_exit(e)
            return self._exception_frame(call, e, pack, span)
        span = [span_id, start, _time_ns()]
        if token is not None:
            tracing.exit(token)  # type: ignore[union-attr]
        # (_result_frame, inlined for the common case)
        try:
            body = pack([MSG_REPLY, call._call_id, call._attempt, True, span, result])
        except Exception:
            return self._result_frame(call, result, pack, span)
        n = len(body)
        if n > self._max_frame:
            return self._result_frame(call, result, pack, span)
        return _HEADER_PACK(n) + body

    def _span_begin(self, call: _Call) -> Tuple[int, Any, int]:
        """Just before a traced call's function runs: its span id, the context token (tracing
        active only) and the start time."""
        span_id = _getrandbits(64) or 1
        tracing = self._tracing
        token = None if tracing is None else tracing.enter(call, span_id)
        return span_id, token, _time_ns()

    def _span_end(self, timing: Tuple[int, Any, int]) -> List[int]:
        """Just after it returned or raised: the reply's ``[span_id, start_ns, end_ns]``."""
        end = _time_ns()
        span_id, token, start = timing
        if token is not None:
            self._tracing.exit(token)  # type: ignore[union-attr]
        return [span_id, start, end]

    # ------------------------------------------------------------------ serving threads

    def _serve(self) -> None:
        pack = new_packer()
        acquire = self._read_lock.acquire
        release = self._read_lock.release
        while True:
            if not acquire(False):
                self._watch()  # returns holding _read_lock
            self._read(pack)  # returns holding _read_lock, with plain calls to execute
            release()
            self._drain(pack)

    def _watch(self) -> None:
        """Sentinel: take the socket over once plain calls have run longer than TICK."""
        sleep = time.sleep
        monotonic = time.monotonic
        acquire = self._read_lock.acquire
        while True:
            sleep(TICK)
            if self._executing and monotonic() - self._session_start >= TICK:
                self._try_flush()  # replies of calls that finished before the slow one
                if acquire(False):
                    return

    def _read(self, pack: Pack) -> None:
        """Read and dispatch until there are plain calls for this thread to execute."""
        recv_into = self._sock.recv_into
        plain = self._plain
        while True:
            try:
                n = recv_into(self._view[self._end :])
            except OSError:
                n = 0
            if n == 0:  # EOF: the parent closed the socket or is gone
                self._parent_gone()
            self._end += n
            out: List[bytes] = []
            self._parse(out, pack)
            if out:
                self._write(out[0] if len(out) == 1 else b"".join(out))
            if plain:
                with self._plain_lock:
                    if not self._executing:
                        self._executing = True
                        self._session_start = time.monotonic()
                        return

    def _parse(self, out: List[bytes], pack: Pack) -> None:
        """Dispatch every complete frame in the buffer; immediate replies go to ``out``."""
        buf = self._buf
        view = self._view
        start = self._start
        end = self._end
        unpack_from = HEADER.unpack_from
        max_frame = self._max_frame
        functions = self._functions
        calls = self._calls
        plain = self._plain
        need = 4
        while end - start >= 4:
            (n,) = unpack_from(buf, start)
            if n > max_frame:
                self._protocol_error(
                    f"incoming frame of {n} bytes exceeds the maximum frame size of "
                    f"{max_frame} bytes"
                )
            stop = start + 4 + n
            if stop > end:
                need = 4 + n
                break
            try:
                msg = unpack_body(view[start + 4 : stop])
            except Exception as e:
                self._protocol_error(f"a frame body is not one valid MessagePack value ({e})")
            start = stop
            if type(msg) is not list or not msg:
                self._protocol_error(f"a message is not a non-empty array: {msg!r:.200}")
            if msg[0] == MSG_CALL and len(msg) == 8:
                _, call_id, attempt, name, deadline_ms, traceparent, tracestate, payload = msg
                if (
                    type(call_id) is not int
                    or type(attempt) is not int
                    or type(name) is not str
                    or (deadline_ms is not None and type(deadline_ms) is not int)
                ):
                    self._protocol_error(f"malformed call: {msg[:7]!r:.300}")
                spec = functions.get(name)
                if spec is None:
                    out.append(self._unknown_function(call_id, attempt, name, pack))
                    continue
                call = _Call(call_id, attempt, spec, payload, deadline_ms, traceparent, tracestate)
                calls[call_id] = call
                # Checked after the call is registered: the control thread clears _accepting
                # before it looks for an empty _calls, so one of the two sees the other.
                if not self._accepting:
                    del calls[call_id]
                    out.append(
                        self._error_frame(
                            call_id,
                            attempt,
                            KIND_INTERNAL,
                            "RuntimeError",
                            "worker is shutting down",
                            pack,
                        )
                    )
                    continue
                kind = spec.kind
                if kind == INLINE:
                    plain.append(call)
                elif kind == ASYNC:
                    self._loop.call_soon_threadsafe(self._async_start, call)  # type: ignore[union-attr]
                else:
                    call._handle = self._executors[name].submit(self._run_threaded, call)
            else:
                self._control_message(msg, out, pack)

        # Buffer upkeep: keep room for the frame being received.
        if start == end:
            self._start = self._end = 0
            if len(buf) > INITIAL_BUFFER:
                self._buf = bytearray(INITIAL_BUFFER)
                self._view = memoryview(self._buf)
            return
        size = len(buf)
        if need > size:
            grown = bytearray(need)
            grown[: end - start] = view[start:end]
            self._buf = grown
            self._view = memoryview(grown)
            self._start, self._end = 0, end - start
        elif size - start < need or size - end < 4096:
            buf[: end - start] = view[start:end]
            self._start, self._end = 0, end - start
        else:
            self._start = start

    def _unknown_function(self, call_id: int, attempt: int, name: str, pack: Pack) -> bytes:
        return self._error_frame(
            call_id,
            attempt,
            KIND_UNKNOWN_FUNCTION,
            "LookupError",
            f"no function named {name!r} is exposed by this worker "
            f"(exposed: {', '.join(self._names)})",
            pack,
            functions=self._names,
        )

    def _control_message(self, msg: List[Any], out: List[bytes], pack: Pack) -> None:
        kind = msg[0]
        if kind == MSG_CANCEL and len(msg) >= 2:
            try:
                call = self._calls.get(msg[1])
            except TypeError:
                self._protocol_error(f"malformed cancel: {msg!r:.200}")
            if call is not None:
                self._cancel(call, out, pack)
        elif kind == MSG_PING and len(msg) >= 2:
            out.append(self._beat_frame(MSG_PONG, msg[1], pack))
        elif kind == MSG_SHUTDOWN and len(msg) >= 2:
            grace_ms = msg[1]
            if grace_ms is None:
                grace = DEFAULT_GRACE
            elif type(grace_ms) is int and grace_ms >= 0:
                grace = grace_ms / 1000.0
            else:
                self._protocol_error(f"malformed shutdown: {msg!r:.200}")
            self._begin_shutdown(grace)
        elif kind == MSG_CALL:
            self._protocol_error(f"a call has {len(msg)} elements instead of 8")
        else:
            self._protocol_error(f"unexpected message: {msg!r:.200}")

    def _cancel(self, call: _Call, out: List[bytes], pack: Pack) -> None:
        call._cancelled = True
        kind = call._spec.kind
        if kind == INLINE:
            with self._plain_lock:
                try:
                    self._plain.remove(call)
                except ValueError:
                    return  # running (it sees ctx.cancelled) or just finished
            out.append(self._cancelled_frame(call, pack))
            self._calls.pop(call._call_id, None)
        elif kind == ASYNC:
            self._loop.call_soon_threadsafe(self._async_cancel, call)  # type: ignore[union-attr]
        else:
            handle = call._handle
            if handle is not None and handle.cancel():  # not started on its pool yet
                out.append(self._cancelled_frame(call, pack))
                self._calls.pop(call._call_id, None)

    def _drain(self, pack: Pack) -> None:
        """Execute queued plain calls in order until the queue is empty."""
        plain = self._plain
        lock = self._plain_lock
        calls = self._calls
        execute = self._execute
        monotonic = time.monotonic
        wlock = self._wlock
        sendall = self._sendall
        while True:
            with lock:
                if not plain:
                    self._executing = False
                    break
                call = plain.popleft()
            data = execute(call, pack)
            # More calls already queued: their replies go out together, unless this run of
            # calls has become slow (then every reply goes out as soon as it is ready).
            with wlock:
                self._served += 1
                staged = self._staged
                if (
                    plain
                    and monotonic() - self._session_start < TICK
                    and self._staged_bytes < FLUSH_BYTES
                ):
                    staged.append(data)
                    self._staged_bytes += len(data)
                else:
                    if staged:
                        staged.append(data)
                        data = b"".join(staged)
                        staged.clear()
                        self._staged_bytes = 0
                    try:
                        sendall(data)
                    except OSError:
                        self._parent_gone()
            calls.pop(call._call_id, None)
        if self._staged:
            self._flush()

    # ------------------------------------------------------------------ threads kind

    def _run_threaded(self, call: _Call) -> None:
        tls = self._tls
        try:
            pack = tls.pack
        except AttributeError:
            pack = tls.pack = new_packer()
        try:
            data = self._execute(call, pack)
            self._send_reply(data)
            self._calls.pop(call._call_id, None)
        except BaseException:
            _say("internal error in a threaded call")
            traceback.print_exc()
            _hard_exit(EXIT_INTERNAL)

    # ------------------------------------------------------------------ async kind

    def _start_loop(self) -> None:
        import asyncio

        loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(ready.set)
            loop.run_forever()

        threading.Thread(target=self._guarded(run), name="pyvisor-asyncio", daemon=True).start()
        ready.wait()
        self._loop = loop
        self._loop_pack = new_packer()

    def _async_start(self, call: _Call) -> None:  # on the loop thread
        call._handle = self._loop.create_task(self._run_async(call))  # type: ignore[union-attr]

    def _async_cancel(self, call: _Call) -> None:  # on the loop thread
        # A task that has not started yet replies `cancelled` itself when it starts.
        if call._phase is RUNNING and call._handle is not None:
            call._handle.cancel()

    async def _run_async(self, call: _Call) -> None:  # on the loop thread
        """Run an ``async def`` function as this task. A traced call is timed as in
        ``_execute_traced``; with tracing active, its span is attached in this task's own
        context, so the function's coroutine (and the tasks it creates) see it as current."""
        pack: Pack = self._loop_pack  # type: ignore[assignment]
        if call._cancelled:
            data = self._cancelled_frame(call, pack)
        else:
            call._phase = RUNNING
            call._started = time.time()
            timing = None if call._traceparent is None else self._span_begin(call)
            try:
                result = await _invoke(call._spec, call)
            except BaseException as e:
                span = None if timing is None else self._span_end(timing)
                if isinstance(e, (SystemExit, KeyboardInterrupt)):
                    self._user_exit(e)
                if _is_cancelled_error(e):
                    call._cancelled = True
                data = self._exception_frame(call, e, pack, span)
            else:
                span = None if timing is None else self._span_end(timing)
                data = self._result_frame(call, result, pack, span)
        self._async_done(call, data)

    def _async_done(self, call: _Call, data: bytes) -> None:  # on the loop thread
        out = self._async_out
        out.append((call, data))
        if len(out) == 1:  # replies finished in this loop iteration go out in one write
            self._loop.call_soon(self._flush_async)  # type: ignore[union-attr]

    def _flush_async(self) -> None:  # on the loop thread
        out = self._async_out
        self._async_out = []
        if not out:
            return
        self._write(b"".join(data for _, data in out), len(out))
        for call, _ in out:
            self._calls.pop(call._call_id, None)

    # ------------------------------------------------------------------ control thread

    def _beat_map(self) -> Dict[str, Any]:
        now_calls = list(self._calls.values())
        return {
            "seq": self._beat_seq,
            "rss": _rss(),
            "in_progress": [
                [c._call_id, c._attempt, c._phase, int(c._started * 1000.0)] for c in now_calls
            ],
            "served": self._served,
        }

    def _beat_frame(self, kind: int, nonce: Any, pack: Pack) -> bytes:
        beat = self._beat_map()
        message = [MSG_BEAT, beat] if kind == MSG_BEAT else [MSG_PONG, nonce, beat]
        body = pack(message)
        while len(body) > self._max_frame and beat["in_progress"]:
            # Thousands of calls in flight and a tiny frame limit: report fewer of them.
            del beat["in_progress"][len(beat["in_progress"]) // 2 :]
            body = pack(message)
        return _HEADER_PACK(len(body)) + body

    def _health(self) -> Dict[str, Any]:
        return {"ok": True, "pid": os.getpid(), "rss": _rss(), "served": self._served}

    def _control(self) -> None:
        pack = new_packer()
        interval = self._beat_interval
        monotonic = time.monotonic
        wake = self._wake_r
        next_beat = monotonic() + interval
        while True:
            timeout = next_beat - monotonic()
            if self._stop_deadline is not None:
                timeout = min(timeout, 0.01)  # watch the calls in flight drain
            if timeout > 0:
                ready, _, _ = select.select([wake], [], [], timeout)
                if ready:
                    try:
                        woken = os.read(wake, 4096)
                    except BlockingIOError:
                        woken = b""
                    if _SIGTERM_BYTE in woken:
                        self._begin_shutdown(DEFAULT_GRACE)
            now = monotonic()
            if now >= next_beat:
                self._beat_seq += 1
                self._write(self._beat_frame(MSG_BEAT, None, pack))
                next_beat += interval
                if next_beat <= now:
                    next_beat = now + interval
            deadline = self._stop_deadline
            if deadline is not None:
                if not self._calls:
                    self._flush()
                    self._finished.set()
                    return
                if now >= deadline:
                    _say(
                        f"shutdown grace expired with {len(self._calls)} call(s) still in "
                        "flight; exiting"
                    )
                    self._flush()
                    _hard_exit(EXIT_OK)


def _on_sigterm(signum: int, frame: Any) -> None:
    # The real work happens in the control thread, woken through signal.set_wakeup_fd.
    pass


_started = False


def started() -> bool:
    """Whether ``run_worker()`` has been called in this process."""
    return _started


def run_worker() -> None:
    """Serve the exposed functions to the pyvisor parent until shutdown.

    Sends ``hello`` (after the module-level code that defined the functions has run), then
    serves calls until a ``shutdown`` message or SIGTERM (returns once calls in flight have
    finished) or until the parent closes the socket (the process exits at once).

    Outside a pyvisor start (no ``PYVISOR_FD``) it explains so on stderr and exits with
    status 2.
    """
    global _started
    try:
        config = current_config()
    except StartError as e:
        exit_bad_start(e)
    if _started:
        raise RuntimeError("run_worker() was already called in this process")
    _started = True
    if config.protocol is not None and config.protocol != PROTOCOL_VERSION:
        _say(
            f"the parent speaks protocol {config.protocol}, this adapter speaks "
            f"{PROTOCOL_VERSION}"
        )
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            try:
                reconfigure(line_buffering=True)  # the parent forwards output line by line
            except (ValueError, OSError):
                pass
    try:
        import faulthandler

        if not faulthandler.is_enabled():
            faulthandler.enable()
        if hasattr(signal, "SIGUSR1"):
            # The parent can ask a hung worker for its Python stacks (written to stderr).
            faulthandler.register(signal.SIGUSR1, all_threads=True, chain=False)
    except (ImportError, RuntimeError, ValueError, OSError, AttributeError):
        pass
    # Tracing (the `otel` extra) is set up before hello, only if asked for and installed.
    tracing = _otel.activate(config.worker_id, config.run_id)
    try:
        _Worker(config, registered(), tracing).serve()
    finally:
        if tracing is not None:
            tracing.shutdown()  # the last spans, bounded: a dead collector can't hold the exit
