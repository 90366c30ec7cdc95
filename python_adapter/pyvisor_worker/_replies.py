"""Replies: the frames the worker sends, and the one writer they all go through.

Owns the building of ``reply`` frames (``[2, id, attempt, ok, span, value_or_error]``) for
every outcome: a result, a raised exception, a value that cannot be encoded or is too large,
and the calls whose function never ran (unknown function, cancelled before it started,
refused because the worker is shutting down). And :class:`Writer`: one lock around
``sendall``, replies staged to go out with the next write, the ``served`` counter, and
``send_with_fds`` (capability ``oob``: an ``fds`` message and the frame that uses its fds, in
one ``sendmsg`` after everything staged, with nothing between them). A result sent out of band
(``_oob.Outbound``) is written at once by the thread that produced it; its frame is then
``b""``, which the batching paths write as nothing.

Does not decide when a function runs or which replies are staged (the inline executor's drain
loop does, with the writer's fields under its lock), and never reads from the socket.

Error kinds (``docs/protocol.md``; the parent acts on them): ``exception``,
``unknown_function``, ``cancelled``, ``reply_too_large``, ``unserializable``, ``internal``,
``stream_mismatch`` (a stream call to a function that is not a generator, or a plain call to
one that is: it did not run; type ``TypeError``), and
``refused``: the call arrived after shutdown began (``shutdown`` message or SIGTERM) and **did
not run** (type ``WorkerShuttingDown``), so the parent may send it to another worker.
"""

from __future__ import annotations

import socket
import sys
import threading
import traceback
from typing import Any, Callable, List, Optional, Sequence

from ._buffers import send_with_fds as _send_with_fds
from ._exits import parent_gone
from ._framing import (
    HEADER,
    KIND_CANCELLED,
    KIND_EXCEPTION,
    KIND_REFUSED,
    KIND_REPLY_TOO_LARGE,
    KIND_STREAM_MISMATCH,
    KIND_UNKNOWN_FUNCTION,
    KIND_UNSERIALIZABLE,
    MSG_REPLY,
    error_map,
    qualified_name,
)
from ._oob import BUFFER_TYPES, Outbound, buffer_bytes
from ._state import Call

__all__ = [
    "Pack",
    "Writer",
    "FLUSH_BYTES",
    "TICK",
    "error_frame",
    "result_frame",
    "exception_frame",
    "cancelled_frame",
    "refused_frame",
    "unknown_function_frame",
    "stream_mismatch_frame",
    "REFUSED_TYPE",
    "REFUSED_MESSAGE",
]

Pack = Callable[[Any], bytes]

#: Staged replies are written out at the latest once they reach this many bytes.
FLUSH_BYTES = 1 << 20

#: How long plain calls may execute before the sentinel takes the socket over; also when a
#: run of plain calls counts as slow (its replies then go out one by one), and how long a
#: stream's items may wait for a slow generator before the stream flusher writes them.
TICK = 0.005

#: The error of a call refused because the worker is shutting down (kind ``refused``).
REFUSED_TYPE = "WorkerShuttingDown"
REFUSED_MESSAGE = "the worker is shutting down; the call did not run"

_HEADER_PACK = HEADER.pack


# ---------------------------------------------------------------------- frames


def error_frame(
    call_id: int,
    attempt: int,
    kind: str,
    type_name: str,
    message: str,
    pack: Pack,
    max_frame: int,
    tb: Optional[str] = None,
    functions: Optional[Sequence[str]] = None,
    span: Optional[List[int]] = None,
) -> bytes:
    """A failed reply; a message or traceback too large for a frame is cut to fit."""
    err = error_map(kind, type_name, message, tb, functions)
    reply = [MSG_REPLY, call_id, attempt, False, span, err]
    try:
        body = pack(reply)
    except Exception:  # e.g. a message with lone surrogates
        err["message"] = message.encode("utf-8", "replace").decode("utf-8")
        err["traceback"] = None if tb is None else tb.encode("utf-8", "replace").decode("utf-8")
        body = pack(reply)
    if len(body) > max_frame:
        # Only a huge message or traceback gets here: keep their ends, which matter most.
        room = max(64, max_frame // 4)
        err["message"] = message[-room:]
        err["traceback"] = None if tb is None else tb[-room:]
        body = pack(reply)
        if len(body) > max_frame:
            err["message"] = message[:64]
            err["traceback"] = None
            body = pack(reply)
    return _HEADER_PACK(len(body)) + body


def result_frame(
    call: Call,
    result: Any,
    pack: Pack,
    max_frame: int,
    span: Optional[List[int]] = None,
    oob: Optional[Outbound] = None,
) -> bytes:
    """The reply carrying ``result``, or an ``unserializable``/``reply_too_large`` error.

    With ``oob`` (capability on), a top-level bytes-like result of at least its threshold is
    sent out of band at once (through the writer) and ``b""`` is returned: nothing is left to
    write. A buffer-protocol result MessagePack cannot encode (a numpy array) travels as
    ``bytes`` (in band, or out of band above the threshold)."""
    if oob is not None and type(result) in BUFFER_TYPES:
        return oob.reply(call, result, pack, span, result_frame, error_frame)
    try:
        body = pack([MSG_REPLY, call._call_id, call._attempt, True, span, result])
    except Exception as e:
        view = buffer_bytes(result)
        if view is not None:
            if oob is not None:
                return oob.reply(call, result, pack, span, result_frame, error_frame)
            return result_frame(call, view.tobytes(), pack, max_frame, span)
        return error_frame(
            call._call_id,
            call._attempt,
            KIND_UNSERIALIZABLE,
            qualified_name(type(e)),
            f"the return value of {call._spec.name!r} cannot be encoded: {e}",
            pack,
            max_frame,
            span=span,
        )
    n = len(body)
    if n > max_frame:
        return error_frame(
            call._call_id,
            call._attempt,
            KIND_REPLY_TOO_LARGE,
            "ValueError",
            f"the reply of {call._spec.name!r} is {n} bytes, over the maximum frame size "
            f"of {max_frame} bytes",
            pack,
            max_frame,
            span=span,
        )
    return _HEADER_PACK(n) + body


def _is_cancelled_error(exc: BaseException) -> bool:
    asyncio = sys.modules.get("asyncio")
    return asyncio is not None and isinstance(exc, asyncio.CancelledError)


def exception_frame(
    call: Call, exc: BaseException, pack: Pack, max_frame: int, span: Optional[List[int]] = None
) -> bytes:
    """The reply to a function that raised ``exc`` (kind ``cancelled`` if it was cancelled
    and raised ``CancelledError``, else ``exception``). The traceback leaves out its first
    frame: the adapter's frame that called the function."""
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
    return error_frame(
        call._call_id,
        call._attempt,
        kind,
        qualified_name(type(exc)),
        message,
        pack,
        max_frame,
        text,
        span=span,
    )


def cancelled_frame(call: Call, pack: Pack, max_frame: int) -> bytes:
    """The reply to a call cancelled before its function ran (no span: it never ran)."""
    return error_frame(
        call._call_id,
        call._attempt,
        KIND_CANCELLED,
        "asyncio.exceptions.CancelledError",
        "the call was cancelled",
        pack,
        max_frame,
    )


def refused_frame(call_id: int, attempt: int, pack: Pack, max_frame: int) -> bytes:
    """The reply to a call that arrived after shutdown began: kind ``refused``; it never
    ran (no span), so the parent may route it to another worker."""
    return error_frame(
        call_id, attempt, KIND_REFUSED, REFUSED_TYPE, REFUSED_MESSAGE, pack, max_frame
    )


def unknown_function_frame(
    call_id: int, attempt: int, name: str, names: Sequence[str], pack: Pack, max_frame: int
) -> bytes:
    return error_frame(
        call_id,
        attempt,
        KIND_UNKNOWN_FUNCTION,
        "LookupError",
        f"no function named {name!r} is exposed by this worker (exposed: {', '.join(names)})",
        pack,
        max_frame,
        functions=names,
    )


def stream_mismatch_frame(
    call_id: int, attempt: int, name: str, is_stream: bool, pack: Pack, max_frame: int
) -> bytes:
    """The reply to a stream call to a function that is not a generator function, or to a
    plain call to one that is: kind ``stream_mismatch``; the function did not run."""
    if is_stream:
        message = f"{name!r} is a generator function: call it as a stream (pool.stream)"
    else:
        message = f"{name!r} is not a generator function: call it with pool.call"
    return error_frame(
        call_id, attempt, KIND_STREAM_MISMATCH, "TypeError", message, pack, max_frame
    )


# ---------------------------------------------------------------------- writer


class Writer:
    """Every frame the worker sends goes through :attr:`lock` and :attr:`sendall`.

    ``staged`` holds replies kept back to go out with the next write (every holder of the
    lock sends them first); ``staged_bytes`` is their size. ``served`` counts replies
    written. A failed write means the parent is gone: the process exits 0.
    """

    __slots__ = ("lock", "sendall", "staged", "staged_bytes", "served", "_sock")

    def __init__(
        self, sendall: Callable[[bytes], None], sock: Optional[socket.socket] = None
    ) -> None:
        self.lock = threading.Lock()
        self.sendall = sendall
        #: The socket, for :meth:`send_with_fds` (out-of-band buffers).
        self._sock = sock
        self.staged: List[bytes] = []
        self.staged_bytes = 0
        self.served = 0

    def write(self, data: bytes, replies: int = 0) -> None:
        """Write ``data`` (one or more frames, ``replies`` of them replies), after anything
        staged."""
        with self.lock:
            self.served += replies
            staged = self.staged
            if staged:
                staged.append(data)
                data = b"".join(staged)
                staged.clear()
                self.staged_bytes = 0
            try:
                self.sendall(data)
            except OSError:
                parent_gone()

    def send_with_fds(
        self, data: bytes, fds: Sequence[int], pending: Optional[List[bytes]] = None
    ) -> None:
        """Write what is staged and ``pending`` (a stream's items, see :meth:`write_pending`),
        then ``data`` by one ``sendmsg`` carrying ``fds`` (an ``fds`` message and the frame
        that uses them), all under the lock: nothing else can come between. The fds stay
        open (the caller closes its copies)."""
        sock = self._sock
        if sock is None:  # pragma: no cover - the worker always gives it
            raise RuntimeError("this writer cannot send fds")
        with self.lock:
            parts = self._take(pending if pending is not None else [])
            try:
                if parts:
                    self.sendall(b"".join(parts))
                _send_with_fds(sock, data, fds)
            except OSError:
                parent_gone()

    def write_pending(self, pending: List[bytes]) -> None:
        """Write (after anything staged) and remove the frames in ``pending``: a stream's
        items, which its driver appends without the lock. Only lock holders remove from
        ``pending``, from the front: frames appended meanwhile stay for the next write."""
        with self.lock:
            if not pending:
                return
            parts = self._take(pending)
            try:
                self.sendall(b"".join(parts))
            except OSError:
                parent_gone()

    def _take(self, pending: List[bytes]) -> List[bytes]:
        """(Under the lock.) What is staged, then the frames now in ``pending`` (removed from
        its front: frames appended meanwhile stay); staged is emptied."""
        n = len(pending)
        parts = pending[:n]
        del pending[:n]
        staged = self.staged
        if staged:
            parts[:0] = staged
            staged.clear()
            self.staged_bytes = 0
        return parts

    def stage_pending(self, pending: List[bytes]) -> None:
        """Move the frames in ``pending`` to the staged ones (they go out with the next
        write: a stream's last items, with its reply)."""
        with self.lock:
            n = len(pending)
            if n:
                parts = pending[:n]
                del pending[:n]
                self.staged.extend(parts)
                self.staged_bytes += sum(map(len, parts))

    def flush(self) -> None:
        """Write what is staged."""
        with self.lock:
            staged = self.staged
            if not staged:
                return
            data = staged[0] if len(staged) == 1 else b"".join(staged)
            staged.clear()
            self.staged_bytes = 0
            try:
                self.sendall(data)
            except OSError:
                parent_gone()

    def try_flush(self) -> None:
        """Flush staged replies unless a write is in progress.

        Every holder of the lock sends what is staged, so if the lock is busy the staged
        replies go out with that write (and the sentinel never waits on a blocked
        ``sendall`` instead of taking over the socket).
        """
        if self.staged and self.lock.acquire(False):
            try:
                staged = self.staged
                if staged:
                    data = b"".join(staged)
                    staged.clear()
                    self.staged_bytes = 0
                    try:
                        self.sendall(data)
                    except OSError:
                        parent_gone()
            finally:
                self.lock.release()
