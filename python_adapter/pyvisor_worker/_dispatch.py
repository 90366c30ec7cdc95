"""Dispatch: what each received frame means, and where it goes.

Owns :meth:`Dispatcher.dispatch_frames`: it splits the bytes the reader received into frames
(enforcing the maximum frame size), decodes each message and acts on it. A ``call`` becomes a
:class:`~._state.Call`, registered in the shared state and handed to its function's executor
through the route table (built once, at start, from ``_executors.make_executors``: the only
place where execution kinds are told apart), or answered at once (unknown function, shutting
down). A ``call_options`` is a ``call`` with an options map (``ack_start``: send ``started``
right before the function runs; ``stream: W``: a stream call with initial credit ``W``, a
:class:`~._streams.StreamCall`; unknown keys are ignored). A stream call to a function that is
not a generator function, or a plain call to one that is, is answered ``stream_mismatch`` at
once and never runs. ``cancel`` goes to the call's executor (and wakes a stream waiting for
credit), ``credit`` to its stream (ignored for a call the worker does not hold), ``ping`` is
answered with a ``pong``, ``shutdown`` goes to the control thread. Every field of these
messages is type-checked as docs/protocol.md says; a mistyped field, a ``call`` whose id the
worker already holds, or anything else is a protocol error (the call never runs). Stream calls
are handled off the main loop (``_stream_call``), so plain calls pay nothing for them.

With capability ``oob`` (``_oob``) the reader passes ``_oob.unpack_unannounced`` as the
decoder (a buffer reference in a frame no ``fds`` message announced is a protocol error; it
costs nothing for a frame without ext values); an ``fds`` message, once the frame after it is
complete too, receives its fds: the next datagram of the side channel (``PYVISOR_FDS_FD``),
one blocking ``recvmsg`` bounded by ``PYVISOR_FDS_TIMEOUT_MS``, its fds checked, mapped and
closed by ``_oob.Inbound``; that frame, which must be a ``call`` or ``call_options``, is
decoded by ``_oob.Owned`` (each buffer referenced exactly once). The per-call path is
otherwise the same code: the main socket carries no fds from the parent.

Immediate replies are appended to the caller's ``out`` list, which the reader writes. Does not
read the socket, manage the read buffer, run functions or decide when the worker ends.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple

from ._exits import protocol_error
from ._framing import (
    HEADER,
    MSG_CALL,
    MSG_CALL_OPTIONS,
    MSG_CANCEL,
    MSG_CREDIT,
    MSG_FDS,
    MSG_PING,
    MSG_PONG,
    MSG_SHUTDOWN,
    unpack_body,
)
from ._oob import Inbound
from ._registry import FunctionSpec
from ._replies import (
    Pack,
    cancelled_frame,
    refused_frame,
    stream_mismatch_frame,
    unknown_function_frame,
)
from ._state import AckedCall, Call, WorkerState
from ._streams import AckedStreamCall, StreamCall

if TYPE_CHECKING:
    from ._control import Control
    from ._executors import Executor

__all__ = ["Dispatcher", "Route"]

#: A function's route: its spec, its executor's ``submit`` and the executor (for ``cancel``).
Route = Tuple[FunctionSpec, Callable[[Call], object], "Executor"]

_unpack_from = HEADER.unpack_from

#: The largest initial credit (``stream`` option) a stream call may ask for.
MAX_WINDOW = 0xFFFFFFFF


class Dispatcher:
    def __init__(
        self,
        routes: Dict[str, Route],
        names: Sequence[str],
        state: WorkerState,
        control: Control,
        max_frame: int,
        inbound: Optional[Inbound] = None,
    ) -> None:
        #: Plain functions' routes (the main loop's table) and stream functions' routes.
        self._routes = {name: r for name, r in routes.items() if not r[0].stream}
        self._stream_routes = {name: r for name, r in routes.items() if r[0].stream}
        #: Every route (cancel).
        self._all_routes = dict(routes)
        self._names = list(names)
        self._state = state
        self._calls = state.calls
        self._control = control
        self._max_frame = max_frame
        #: Capability ``oob``: the side channel's fds (None without it).
        self._inbound = inbound
        if inbound is not None:
            inbound.set_routes(self._all_routes)

    def dispatch_frames(
        self,
        buf: bytearray,
        view: memoryview,
        start: int,
        end: int,
        out: List[bytes],
        pack: Pack,
        unpack_body: Callable[[Any], Any] = unpack_body,
    ) -> Tuple[int, int]:
        """Dispatch every complete frame in ``buf[start:end]``; immediate replies go to
        ``out``. Returns where the unconsumed bytes start and how many bytes the frame that
        begins there needs in all (header included; 4 while even its header is incomplete).

        ``unpack_body`` decodes a frame body (with ``oob``: ``_oob.unpack_unannounced``, which
        refuses buffer references; for the frame an ``fds`` message announced,
        ``_oob.Owned.unpack``). Without ``oob`` an ``fds`` message is a protocol error like any
        unknown message."""
        max_frame = self._max_frame
        routes = self._routes
        calls = self._calls
        state = self._state
        unpack_from = _unpack_from
        need = 4
        while end - start >= 4:
            (n,) = unpack_from(buf, start)
            if n > max_frame:
                protocol_error(
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
                protocol_error(f"a frame body is not one valid MessagePack value ({e})")
            start = stop
            if type(msg) is not list or not msg:
                protocol_error(f"a message is not a non-empty array: {msg!r:.200}")
            if msg[0] == MSG_CALL and len(msg) == 8:
                kind, call_id, attempt, name, deadline_ms, traceparent, tracestate, payload = msg
                make = Call
            elif msg[0] == MSG_CALL_OPTIONS and len(msg) == 9:
                (kind, call_id, attempt, name, deadline_ms, traceparent, tracestate, options,
                 payload) = msg
                if type(options) is not dict:
                    protocol_error(f"malformed call_options: options {options!r:.200}")
                ack_start = options.get("ack_start", False)
                if type(ack_start) is not bool:
                    protocol_error(f"malformed call_options: ack_start {ack_start!r:.100}")
                window = options.get("stream")
                if window is not None:
                    self._stream_call(msg, window, ack_start, out, pack)
                    continue
                make = AckedCall if ack_start else Call
            else:
                if self._control_message(msg, out, pack):  # an fds message (oob)
                    start, need = self._fds_message(
                        msg, buf, view, start - 4 - n, start, end, out, pack
                    )
                    if need:
                        return start, need
                continue
            # Every field as docs/protocol.md types it. A decoded integer always fits in
            # 64 bits (MessagePack has none larger), so uint64 means ``>= 0``; ``type(x) is
            # int`` also rules out bool (True == 1) and floats (a ``kind`` of 1.0).
            if (
                type(call_id) is not int
                or call_id < 0
                or type(attempt) is not int
                or attempt < 1
                or attempt > 0xFFFFFFFF
                or type(name) is not str
                or (
                    deadline_ms is not None
                    and (type(deadline_ms) is not int or deadline_ms < 0)
                )
                or (traceparent is not None and type(traceparent) is not str)
                or (tracestate is not None and type(tracestate) is not str)
                or type(kind) is not int
            ):
                protocol_error(f"malformed call: {msg[:7]!r:.300}")
            if call_id in calls:
                protocol_error(f"duplicate call id {call_id}: the worker already holds it")
            route = routes.get(name)  # (stream functions are not in this table)
            if route is None:
                out.append(self._no_route(call_id, attempt, name, pack))
                continue
            spec, submit, _ = route
            call = make(call_id, attempt, spec, payload, deadline_ms, traceparent, tracestate)
            calls[call_id] = call
            # Checked after the call is registered (see WorkerState).
            if not state.accepting:
                del calls[call_id]
                out.append(refused_frame(call_id, attempt, pack, max_frame))
                continue
            submit(call)
        return start, need

    def _fds_message(
        self,
        msg: List[Any],
        buf: bytearray,
        view: memoryview,
        begin: int,
        start: int,
        end: int,
        out: List[bytes],
        pack: Pack,
    ) -> Tuple[int, int]:
        """An ``fds`` message (capability ``oob``) in ``buf[begin:start]``: once the frame after
        it is complete too, claim its fds (its side-channel datagram, received, checked,
        mapped and closed by ``_oob.Inbound``) and dispatch that frame, decoded by
        ``_oob.Owned`` (it must be a call referencing each buffer exactly once). Returns where
        dispatch goes on and 0; or, while that frame is incomplete, ``begin`` and how many
        bytes both frames need (the ``fds`` message is read again with them: no state outlives
        a read; its datagram is received only once the frame is complete)."""
        if end - start < 4:
            return begin, start - begin + 4
        (n,) = _unpack_from(buf, start)
        if n > self._max_frame:
            protocol_error(
                f"incoming frame of {n} bytes exceeds the maximum frame size of "
                f"{self._max_frame} bytes"
            )
        stop = start + 4 + n
        if stop > end:
            return begin, stop - begin
        owned = self._inbound.claim(msg)  # type: ignore[union-attr]
        self.dispatch_frames(buf, view, start, stop, out, pack, owned.unpack)
        return stop, 0

    def _no_route(self, call_id: int, attempt: int, name: str, pack: Pack) -> bytes:
        """The reply to a plain call (or ``call_options`` without ``stream``) to a function
        that has no plain route: a stream function (``stream_mismatch``), or none at all."""
        if name in self._stream_routes:
            return stream_mismatch_frame(call_id, attempt, name, True, pack, self._max_frame)
        return unknown_function_frame(call_id, attempt, name, self._names, pack, self._max_frame)

    def _stream_call(
        self, msg: List[Any], window: Any, ack_start: bool, out: List[bytes], pack: Pack
    ) -> None:
        """A ``call_options`` whose options have ``stream``: the main loop's checks and
        registration, for a :class:`~._streams.StreamCall` (kept out of the loop, so that
        plain calls pay nothing for streams)."""
        (kind, call_id, attempt, name, deadline_ms, traceparent, tracestate, _, payload) = msg
        if type(window) is not int or window < 1 or window > MAX_WINDOW:
            protocol_error(f"malformed call_options: stream {window!r:.100}")
        if (
            type(call_id) is not int
            or call_id < 0
            or type(attempt) is not int
            or attempt < 1
            or attempt > 0xFFFFFFFF
            or type(name) is not str
            or (deadline_ms is not None and (type(deadline_ms) is not int or deadline_ms < 0))
            or (traceparent is not None and type(traceparent) is not str)
            or (tracestate is not None and type(tracestate) is not str)
            or type(kind) is not int
        ):
            protocol_error(f"malformed call: {msg[:7]!r:.300}")
        calls = self._calls
        if call_id in calls:
            protocol_error(f"duplicate call id {call_id}: the worker already holds it")
        route = self._stream_routes.get(name)
        if route is None:
            if name in self._routes:
                out.append(
                    stream_mismatch_frame(call_id, attempt, name, False, pack, self._max_frame)
                )
            else:
                out.append(
                    unknown_function_frame(
                        call_id, attempt, name, self._names, pack, self._max_frame
                    )
                )
            return
        spec, submit, _ = route
        make = AckedStreamCall if ack_start else StreamCall
        call = make(
            call_id, attempt, spec, payload, deadline_ms, traceparent, tracestate, window
        )
        calls[call_id] = call
        if not self._state.accepting:  # (after registering: see WorkerState)
            del calls[call_id]
            out.append(refused_frame(call_id, attempt, pack, self._max_frame))
            return
        submit(call)

    def _control_message(self, msg: List[Any], out: List[bytes], pack: Pack) -> bool:
        """Act on a message other than a call; True for an ``fds`` message (capability
        ``oob``): the buffers it claimed belong to the next frame."""
        kind = msg[0]
        if type(kind) is not int:
            protocol_error(f"unexpected message: {msg!r:.200}")
        if kind == MSG_FDS and self._inbound is not None:
            self._inbound.check(msg)
            return True  # (dispatch_frames hands it to _fds_message)
        if kind == MSG_CREDIT and len(msg) >= 3:
            call_id = msg[1]
            n = msg[2]
            if type(call_id) is not int or call_id < 0 or type(n) is not int or n < 1:
                protocol_error(f"malformed credit: {msg!r:.200}")
            call = self._calls.get(call_id)
            if call is not None and call._stream:
                call.grant(n)  # type: ignore[attr-defined]
        elif kind == MSG_CANCEL and len(msg) >= 2:
            call_id = msg[1]
            if type(call_id) is not int or call_id < 0:
                protocol_error(f"malformed cancel: {msg!r:.200}")
            call = self._calls.get(call_id)
            if call is not None:
                call._cancelled = True
                if self._all_routes[call._spec.name][2].cancel(call):
                    out.append(cancelled_frame(call, pack, self._max_frame))
                    self._calls.pop(call._call_id, None)
                elif call._stream:
                    call.interrupt()  # type: ignore[attr-defined]
        elif kind == MSG_PING and len(msg) >= 2:
            nonce = msg[1]
            if type(nonce) is not int or nonce < 0:
                protocol_error(f"malformed ping: {msg!r:.200}")
            out.append(self._control.beat_frame(MSG_PONG, nonce, pack))
        elif kind == MSG_SHUTDOWN and len(msg) >= 2:
            grace_ms = msg[1]
            if grace_ms is None:
                grace = None
            elif type(grace_ms) is int and grace_ms >= 0:
                grace = grace_ms / 1000.0
            else:
                protocol_error(f"malformed shutdown: {msg!r:.200}")
            self._control.begin_shutdown(grace, requested=True)
        elif kind == MSG_CALL:
            protocol_error(f"a call has {len(msg)} elements instead of 8")
        elif kind == MSG_CALL_OPTIONS:
            protocol_error(f"a call_options has {len(msg)} elements instead of 9")
        elif kind == MSG_CREDIT:
            protocol_error(f"a credit has {len(msg)} elements instead of 3")
        else:
            protocol_error(f"unexpected message: {msg!r:.200}")
        return False
